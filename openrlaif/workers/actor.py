"""The policy role: one DeepSpeed ZeRO engine per Ray worker, data parallel over the workers."""
from __future__ import annotations

import os
import time

import ray
import torch

from openrlaif.algorithms import POLICY_LOSSES, PREFERENCE_LOSSES
from openrlaif.batch import Batch
from openrlaif.config import ActorConfig, AlgorithmConfig
from openrlaif.workers.common import (batched_response_logprobs, load_causal_lm, response_logprobs,
                                      setup_process, trim_to_content)


def deepspeed_config(cfg: ActorConfig, world_size: int, micro_batch: int, accumulation: int, bf16: bool) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_distributed(backend: str):
    """Module-level on purpose: Ray pickles actor methods by value, and one that touches both `torch` and an
    attribute named `ops` makes cloudpickle try to pickle `torch.ops`."""
    if backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    # On CPU, init_distributed JIT-compiles a shared-memory comm op (~26 s, needs a compiler); gloo is enough.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)
    return deepspeed


@ray.remote
class ActorWorker:
    """Verbs: logprobs, train_step, full_state_dict, save_hf."""

    def __init__(self, model_path: str, cfg: ActorConfig, algo: AlgorithmConfig, *, rank: int, world_size: int,
                 master_addr: str, master_port: int, backend: str, dtype: str, step_batch_size: int,
                 temperature: float, threads: int, seed: int, trust_remote_code: bool = False) -> None:
        setup_process(threads, seed)
        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port))
        deepspeed = init_distributed(backend)

        self.cfg, self.algo, self.rank, self.world_size = cfg, algo, rank, world_size
        self.temperature = temperature
        self.bf16 = dtype == "bfloat16"
        model = load_causal_lm(model_path, "float32", trust_remote_code)  # fp32 master weights; bf16 via DeepSpeed
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        mini = cfg.mini_batch_size or step_batch_size
        self.per_rank_mini = mini // world_size
        self.accumulation = self.per_rank_mini // cfg.micro_batch_size
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer,
            config=deepspeed_config(cfg, world_size, cfg.micro_batch_size, self.accumulation, self.bf16))
        self.device = self.engine.device

    def ready(self) -> bool:
        return True

    def logprobs(self, batch: Batch) -> torch.Tensor:
        self.engine.eval()
        return batched_response_logprobs(self.engine, batch, self.cfg.micro_batch_size, self.device, self.temperature)

    def train_step(self, batch: Batch) -> dict[str, float]:
        """All epochs and optimizer steps on this worker's shard of one step's batch.

        `batch` holds advantages, sample_mask and ref_logprobs (when kl_coef > 0), and old_logprobs unless the
        update is on-policy (one epoch, one optimizer step), where log π_old = log π_θ detached exactly.
        """
        self.engine.train()
        loss_fn = POLICY_LOSSES[self.algo.policy_loss]
        start_time = time.perf_counter()
        sums = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0, "ratio": 0.0}
        algo = self.algo
        tokens_seen, grad_norm = 0, 0.0
        for _ in range(self.cfg.epochs):
            for mini in batch.chunks_of(self.per_rank_mini):
                mask = mini["response_mask"] * mini["sample_mask"].unsqueeze(-1)
                # Normaliser of the global mini-batch (#tokens, or #sequences), so the loss is the big-batch value.
                local = mask.sum() if algo.loss_agg == "token_mean" else (mask.sum(-1) > 0).sum()
                normalizer = _all_reduce_sum(local, self.device)
                for micro in mini.chunks_of(self.cfg.micro_batch_size):
                    micro = trim_to_content(micro).to(self.device)
                    entropy = None
                    if algo.entropy_coef > 0:
                        logprobs, entropy = response_logprobs(self.engine, micro, self.temperature, with_entropy=True)
                    else:
                        logprobs = response_logprobs(self.engine, micro, self.temperature)
                    old = micro["old_logprobs"] if "old_logprobs" in micro else logprobs.detach()
                    out = loss_fn(logprobs, old, micro["advantages"],
                                  micro["response_mask"] * micro["sample_mask"].unsqueeze(-1),
                                  clip_eps=algo.clip_eps, clip_eps_high=algo.clip_eps_high, dual_clip=algo.dual_clip,
                                  ref_logprobs=micro["ref_logprobs"] if "ref_logprobs" in micro else None,
                                  kl_coef=0.0 if algo.kl_in_reward else algo.kl_coef, kl_estimator=algo.kl_estimator,
                                  entropy=entropy, entropy_coef=algo.entropy_coef, loss_agg=algo.loss_agg,
                                  num_tokens=max(float(normalizer), 1.0))
                    # DeepSpeed divides by the accumulation steps and averages over ranks; undo both.
                    self.engine.backward(out.loss * self.accumulation * self.world_size)
                    self.engine.step()
                    micro_tokens = float(micro["response_mask"].sum())
                    tokens_seen += int(micro["attention_mask"].sum())
                    for key, value in (("loss", out.loss), ("policy_loss", out.policy_loss), ("kl", out.kl),
                                       ("entropy", out.entropy)):
                        sums[key] += float(value.detach())
                    sums["clip_fraction"] += float(out.clip_fraction) * micro_tokens
                    sums["ratio"] += float(out.ratio_mean) * micro_tokens
                norm = self.engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else 0.0
        response_tokens = float(batch["response_mask"].sum()) * self.cfg.epochs
        updates = self.cfg.epochs * len(batch.chunks_of(self.per_rank_mini))
        return {
            # Each micro-step's pieces are normalised by the global mini-batch token count: summed over
            # micro-steps and ranks they give the mini-batch value; averaged here over optimizer steps.
            "loss": sums["loss"] / updates,
            "policy_loss": sums["policy_loss"] / updates,
            "kl": sums["kl"] / updates,
            **({"entropy": sums["entropy"] / updates} if algo.entropy_coef > 0 else {}),
            "clip_fraction_x_tokens": sums["clip_fraction"],
            "ratio_x_tokens": sums["ratio"],
            "response_tokens": response_tokens,
            "tokens": float(tokens_seen),
            "grad_norm": grad_norm,
            "seconds": time.perf_counter() - start_time,
        }

    def preference_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer pass of a pairwise preference loss (DPO family) over this worker's shard of pairs.

        `batch` comes from data.pairs.pairs_to_batch: chosen_*/rejected_* model inputs and the precomputed
        ref_chosen_logps / ref_rejected_logps (zeros for reference-free losses).
        """
        from openrlaif.data.pairs import both_sides
        self.engine.train()
        loss_fn = PREFERENCE_LOSSES[self.algo.loss]
        start_time = time.perf_counter()
        sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}
        tokens_seen, grad_norm = 0, 0.0
        for _ in range(self.cfg.epochs):
            for mini in batch.chunks_of(self.per_rank_mini):
                num_pairs = float(_all_reduce_sum(torch.tensor(float(len(mini))), self.device))
                for micro in mini.chunks_of(self.cfg.micro_batch_size):
                    sides = trim_to_content(both_sides(micro)).to(self.device)
                    token_logprobs = response_logprobs(self.engine, sides)
                    sequence_logps = token_logprobs.sum(-1)
                    lengths = sides["response_mask"].sum(-1).clamp(min=1.0)
                    pairs = len(micro)
                    ref_chosen = micro["ref_chosen_logps"].to(self.device)
                    ref_rejected = micro["ref_rejected_logps"].to(self.device)
                    losses = loss_fn(chosen_logps=sequence_logps[:pairs], rejected_logps=sequence_logps[pairs:],
                                     ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
                                     chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:],
                                     beta=self.algo.beta, label_smoothing=self.algo.label_smoothing,
                                     gamma=self.algo.simpo_gamma)
                    loss = losses.sum() / num_pairs
                    self.engine.backward(loss * self.accumulation * self.world_size)
                    self.engine.step()
                    with torch.no_grad():   # implicit rewards β·log π/π_ref (β·log π for reference-free losses)
                        chosen_reward = self.algo.beta * (sequence_logps[:pairs] - ref_chosen)
                        rejected_reward = self.algo.beta * (sequence_logps[pairs:] - ref_rejected)
                    sums["loss"] += float(loss.detach())
                    sums["accuracy"] += float((chosen_reward > rejected_reward).float().sum())
                    sums["margin"] += float((chosen_reward - rejected_reward).sum())
                    sums["chosen_reward"] += float(chosen_reward.sum())
                    sums["rejected_reward"] += float(rejected_reward.sum())
                    tokens_seen += int(sides["attention_mask"].sum())
                norm = self.engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else 0.0
        updates = self.cfg.epochs * len(batch.chunks_of(self.per_rank_mini))
        seen = float(len(batch) * self.cfg.epochs)
        return {"loss": sums["loss"] / updates, "pairs": seen, "accuracy_x_pairs": sums["accuracy"],
                "margin_x_pairs": sums["margin"], "chosen_reward_x_pairs": sums["chosen_reward"],
                "rejected_reward_x_pairs": sums["rejected_reward"], "tokens": float(tokens_seen),
                "grad_norm": grad_norm, "seconds": time.perf_counter() - start_time}

    def sft_step(self, batch: Batch, pad_id: int, pack_length: int = 0) -> dict[str, float]:
        """Next-token cross-entropy on answer tokens only, exact mean over the global mini-batch's answer tokens.

        `batch.meta` holds prompt_ids / response_ids lists. Each micro-batch of examples is packed into rows of
        at most `pack_length` tokens (0: one per row) with a block-diagonal causal mask, so packed examples
        never attend to each other and keep their own position ids.
        """
        import torch.nn.functional as F

        from openrlaif.data.sft import block_causal_mask, pack_examples
        self.engine.train()
        start_time = time.perf_counter()
        loss_sum, tokens_seen, slots, grad_norm = 0.0, 0, 0, 0.0
        for _ in range(self.cfg.epochs):
            for mini in batch.chunks_of(self.per_rank_mini):
                answer_tokens = sum(len(r) for r in mini.meta["response_ids"])
                num_tokens = float(_all_reduce_sum(torch.tensor(float(answer_tokens)), self.device))
                for micro in mini.chunks_of(self.cfg.micro_batch_size):
                    packed = pack_examples(micro.meta["prompt_ids"], micro.meta["response_ids"], pad_id, pack_length)
                    packed = {k: v.to(self.device) for k, v in packed.items()}
                    logits = self.engine(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                         attention_mask=block_causal_mask(packed["segment_ids"]),
                                         use_cache=False).logits[:, :-1].float()
                    targets = packed["input_ids"][:, 1:]
                    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                    loss = (token_loss * packed["loss_mask"][:, :-1]).sum() / max(num_tokens, 1.0)
                    self.engine.backward(loss * self.accumulation * self.world_size)
                    self.engine.step()
                    loss_sum += float(loss.detach())
                    tokens_seen += int((packed["segment_ids"] > 0).sum())
                    slots += packed["input_ids"].numel()
                norm = self.engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else 0.0
        updates = self.cfg.epochs * len(batch.chunks_of(self.per_rank_mini))
        return {"loss": loss_sum / updates, "tokens": float(tokens_seen), "slots": float(slots),
                "grad_norm": grad_norm, "seconds": time.perf_counter() - start_time}

    def full_state_dict(self, dtype: str = "float32") -> dict[str, torch.Tensor] | None:
        """HF-named full weights on rank 0 (None elsewhere). Collective under ZeRO-3: call it on every rank."""
        import deepspeed
        target = getattr(torch, dtype)
        state = {}
        for name, param in self.engine.module.named_parameters():
            if self.cfg.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if self.rank == 0:
                        state[name] = param.data.detach().to("cpu", target).clone()
            elif self.rank == 0:
                state[name] = param.data.detach().to("cpu", target).clone()
        if self.rank != 0:
            return None
        # Tied weights (lm_head = embed_tokens) appear once in named_parameters; engines load them by either name.
        return state

    def save_hf(self, path: str, tokenizer_path: str) -> str | None:
        """Write an HF folder (config, safetensors, tokenizer) that transformers and vLLM load. Collective."""
        state = self.full_state_dict("float32")
        if self.rank != 0:
            return None
        from transformers import AutoTokenizer
        self.engine.module.save_pretrained(path, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
        return path


def _all_reduce_sum(value: torch.Tensor, device) -> torch.Tensor:
    import torch.distributed as dist
    value = value.detach().to(device, torch.float32).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return value.cpu()
