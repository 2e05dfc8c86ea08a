"""The trainer's log π(response): only response positions go through the LM head, the logsumexp form equals
log-softmax-then-gather, and a model whose forward has no `logits_to_keep` still works. Plus which ZeRO stage
a role really runs."""
import pytest
import torch

from openrlaif.batch import Batch
from openrlaif.config import ActorConfig
from openrlaif.workers.common import accepts_logits_to_keep, load_causal_lm, response_logprobs
from openrlaif.workers.engine import deepspeed_config, effective_zero_stage


def reference_logprobs(model, batch: Batch, temperature: float) -> torch.Tensor:
    """The plain formula over every position's logits."""
    mask = batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    response_len = batch["response_mask"].shape[1]
    logits = logits[:, -response_len - 1:-1] / temperature
    targets = batch["input_ids"][:, -response_len:]
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * batch["response_mask"]


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM wrapper whose forward does not take `logits_to_keep` (as some remote-code models)."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)


@pytest.fixture(scope="module")
def model_and_batch(tiny_model):
    model = load_causal_lm(tiny_model, "float32")
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (3, 12), generator=generator)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[0, :3] = 0           # a left-padded prompt
    attention_mask[1, 10:] = 0          # a response that ended early
    response_mask = torch.ones(3, 5)
    response_mask[1, 3:] = 0
    return model, Batch({"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask})


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_equal_the_full_log_softmax(model_and_batch, temperature):
    model, batch = model_and_batch
    assert accepts_logits_to_keep(model)
    expected = reference_logprobs(model, batch, temperature)
    got = response_logprobs(model, batch, temperature)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    with_entropy, entropy = response_logprobs(model, batch, temperature, with_entropy=True)
    assert torch.allclose(with_entropy, expected, atol=1e-5)
    assert bool((entropy[0] > 0).all()) and bool((entropy[1, 3:] == 0).all())
    wrapped = NoLogitsToKeep(model)
    assert not accepts_logits_to_keep(wrapped)
    assert torch.allclose(response_logprobs(wrapped, batch, temperature), expected, atol=1e-5)


def test_gradients_reach_the_weights_through_the_logsumexp_form(model_and_batch):
    model, batch = model_and_batch
    model.zero_grad()
    response_logprobs(model, batch).sum().backward()
    head = model.get_output_embeddings().weight.grad
    assert head is not None and float(head.abs().sum()) > 0


def test_one_worker_without_offload_runs_stage_0():
    assert effective_zero_stage(ActorConfig(zero_stage=2), world_size=1) == 0
    assert effective_zero_stage(ActorConfig(zero_stage=3), world_size=1) == 0
    assert effective_zero_stage(ActorConfig(zero_stage=3, offload=True), world_size=1) == 3   # offload needs ZeRO
    assert effective_zero_stage(ActorConfig(zero_stage=2), world_size=2) == 2
    config = deepspeed_config(ActorConfig(zero_stage=3, offload=True), 1, 2, 1, bf16=False)
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert deepspeed_config(ActorConfig(zero_stage=3), 1, 2, 1, bf16=False)["zero_optimization"] == {"stage": 0}


def test_dropout_is_switched_off_in_trained_models():
    """GPT-2 drops through nn.Dropout modules, Llama's attention through a float it reads each forward: both off,
    so two train-mode forwards agree (the on-policy ratio is 1, DPO's log-probs are not noisy)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from openrlaif.workers.engine import disable_dropout
    torch.manual_seed(0)
    models = [GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                         resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)),
              LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                           num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                           attention_dropout=0.5, attn_implementation="eager"))]
    ids = torch.randint(0, 64, (2, 12))
    for model in models:
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)   # dropout is live
        disable_dropout(model)
        assert torch.equal(model(ids).logits, model(ids).logits), type(model).__name__
        assert all(getattr(model.config, k) == 0.0 for k in vars(model.config) if "dropout" in k or k.endswith("pdrop")
                   if isinstance(getattr(model.config, k), float))


def test_offload_configs_name_the_optimizer_deepspeed_will_accept():
    """ZeRO-Offload with a client torch optimizer needs DeepSpeed's documented opt-out; its own CPU Adam does not."""
    offload = ActorConfig(zero_stage=2, offload=True)
    assert deepspeed_config(offload, 1, 2, 1, bf16=False)["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in deepspeed_config(offload, 1, 2, 1, bf16=False, cpu_adam=True)
    assert "zero_force_ds_cpu_optimizer" not in deepspeed_config(ActorConfig(zero_stage=2), 2, 2, 1, bf16=False)
