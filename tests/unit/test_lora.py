"""LoRA helpers (workers/lora.py) against peft's own: merged weights equal merge_and_unload's, the adapters carry
peft's saved names, the reference pass switches them off without touching what trains."""
from contextlib import nullcontext

import torch

from openrlaif.config import LoraSettings


def lora_model(tiny_model, rank=4):
    from transformers import AutoModelForCausalLM

    from openrlaif.workers.lora import add_lora
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model), LoraSettings(rank=rank, alpha=8.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():   # B starts at 0 (the adapter is a no-op): give it something to merge
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def no_gather(params):
    return nullcontext()


def test_merged_weights_and_adapter_names_are_peft_s(tiny_model, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from openrlaif.workers.lora import adapter_config, adapter_weights, merged_weights, write_adapter
    model = lora_model(tiny_model)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)   # the base is frozen
    merged = dict(merged_weights(model, no_gather))
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert merged.keys() == base.keys()   # the base model's own names (the tiny model's head is untied)
    folder = write_adapter(str(tmp_path / "adapter"), list(adapter_weights(model, no_gather)),
                           adapter_config(model, tiny_model))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), folder)
    assert set(get_peft_model_state_dict(loaded)) == {name for name, _ in adapter_weights(model, no_gather)}
    reference = loaded.merge_and_unload().state_dict()
    moved = 0
    for name, tensor in merged.items():
        assert torch.allclose(tensor, reference[name], atol=1e-6), name
        moved += not torch.equal(tensor, base[name])
    assert moved == 2 * 7   # every adapted linear layer, nothing else


def test_adapters_off_is_the_base_model_and_leaves_requires_grad_alone(tiny_model):
    from transformers import AutoModelForCausalLM

    from openrlaif.workers.lora import adapters_off
    model = lora_model(tiny_model)
    ids = torch.tensor([[1, 5, 6, 7, 9]])
    with torch.no_grad():
        adapted = model(ids).logits
        with adapters_off(model):
            off = model(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
        again = model(ids).logits
    assert torch.allclose(off, base, atol=1e-6) and not torch.allclose(adapted, base, atol=1e-3)
    assert torch.equal(again, adapted)
    assert all(param.requires_grad == (".lora_" in name) for name, param in model.named_parameters())
