"""Scalar-head trainers: the critic role (PPO's value model) and pipeline=reward_model's Bradley–Terry model.
Both are the backbone with a one-label head, trained with DeepSpeed like the actor."""
from __future__ import annotations

import time

import torch

from openrlaif.batch import Batch
from openrlaif.config import CriticConfig
from openrlaif.models.value import TokenValues, load_scalar_model, response_values, sequence_scores
from openrlaif.workers.common import trim_to_content
from openrlaif.workers.engine import DeepSpeedWorker, all_reduce_sum
from openrlaif.workers.remote import remote


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None, num_tokens: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO2 value loss ½·max((V − R)², (clip(V, V_old ± c) − R)²), summed over `mask` and divided by num_tokens
    (the global mini-batch's token count). Returns (loss, fraction of tokens where the clipped term wins)."""
    squared = (values - returns) ** 2
    clip_fraction = torch.zeros(())
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        clipped_squared = (clipped - returns) ** 2
        clip_fraction = ((clipped_squared > squared).float() * mask).sum() / mask.sum().clamp(min=1.0)
        squared = torch.maximum(squared, clipped_squared)
    return 0.5 * (squared * mask).sum() / num_tokens, clip_fraction.detach()


@remote
class CriticWorker(DeepSpeedWorker):
    """Verbs: values, train_step (critic); reward_model_step, pair_scores (reward model); save_hf."""

    def __init__(self, model_path: str, cfg: CriticConfig, *, pad_token_id: int, trust_remote_code: bool = False,
                 **engine_kwargs) -> None:
        super().__init__(cfg, **engine_kwargs)
        self.backbone = load_scalar_model(model_path, "float32", trust_remote_code, pad_token_id)
        if cfg.lora.rank:   # adapters on the backbone; the value head trains whole
            from openrlaif.workers.lora import add_lora
            self.backbone = add_lora(self.backbone, cfg.lora, keep_trainable=("score",))
        self.build_engine(TokenValues(self.backbone))

    @torch.no_grad()
    def values(self, batch: Batch) -> torch.Tensor:
        """V(s_t) at every response token, (B, R) on the CPU."""
        self.engine.eval()
        out = torch.zeros_like(batch["response_mask"])
        for start in range(0, len(batch), self.cfg.micro_batch_size):
            index = list(range(start, min(start + self.cfg.micro_batch_size, len(batch))))
            micro = trim_to_content(batch.select(index)).to(self.device)
            values = response_values(self.engine, micro).float().cpu()
            out[start:start + len(index), :values.shape[1]] = values
        return out

    def train_step(self, batch: Batch) -> dict[str, float]:
        """Regress V on the GAE returns over this worker's shard: `returns`, `values` (V_old), masks."""
        self.engine.train()
        start_time = time.perf_counter()
        loss_sum, clip_sum, valid_tokens, grad_norm = 0.0, 0.0, 0.0, 0.0
        for _ in range(self.cfg.epochs):
            for mini in batch.chunks_of(self.per_rank_mini):
                mask = mini["response_mask"] * mini["sample_mask"].unsqueeze(-1)
                num_tokens = max(float(all_reduce_sum(mask.sum(), self.device)), 1.0)
                for micro in mini.chunks_of(self.cfg.micro_batch_size):
                    micro = trim_to_content(micro).to(self.device)
                    values = response_values(self.engine, micro)
                    token_mask = micro["response_mask"] * micro["sample_mask"].unsqueeze(-1)
                    loss, clip_fraction = value_loss(values, micro["values"], micro["returns"], token_mask,
                                                     self.cfg.value_clip, num_tokens)
                    self.backward_and_step(loss)
                    loss_sum += float(loss.detach())
                    # the clip fraction is a mean over this micro-batch's valid tokens: weigh it by those
                    clip_sum += float(clip_fraction) * float(token_mask.sum())
                    valid_tokens += float(token_mask.sum())
                grad_norm = self.grad_norm()
        return {"value_loss": loss_sum / self.updates_per_step(batch), "value_clip_x_tokens": clip_sum,
                "valid_tokens": valid_tokens, "grad_norm": grad_norm,
                "seconds": time.perf_counter() - start_time}

    def reward_model_step(self, batch: Batch) -> dict[str, float]:
        """Bradley–Terry updates on this worker's shard of pairs (data.pairs.pairs_to_batch, plus `margin`)."""
        from openrlaif.algorithms.preference import bradley_terry_loss
        self.engine.train()
        start_time = time.perf_counter()
        sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        tokens_seen = 0
        for micro, sides, num_pairs in self.pair_micro_batches(batch):
            scores = sequence_scores(self.engine, sides["input_ids"], sides["attention_mask"])
            chosen, rejected = scores[:len(micro)], scores[len(micro):]
            loss = bradley_terry_loss(chosen, rejected, micro["margin"].to(self.device)).sum() / num_pairs
            self.backward_and_step(loss)
            sums["loss"] += float(loss.detach())
            sums["accuracy"] += float((chosen > rejected).float().sum())
            sums["margin"] += float((chosen - rejected).detach().sum())
            tokens_seen += int(sides["attention_mask"].sum())
        grad_norm = self.grad_norm()   # of the last optimizer step
        return {"loss": sums["loss"] / self.updates_per_step(batch), "pairs": float(len(batch) * self.cfg.epochs),
                "accuracy_x_pairs": sums["accuracy"], "margin_x_pairs": sums["margin"], "tokens": float(tokens_seen),
                "grad_norm": grad_norm, "seconds": time.perf_counter() - start_time}

    @torch.no_grad()
    def pair_scores(self, batch: Batch) -> torch.Tensor:
        """(P, 2) scores of each pair's chosen and rejected answer: held-out evaluation."""
        from openrlaif.data.pairs import both_sides
        self.engine.eval()
        out = []
        for micro in batch.chunks_of(self.cfg.micro_batch_size):
            sides = trim_to_content(both_sides(micro)).to(self.device)
            scores = sequence_scores(self.engine, sides["input_ids"], sides["attention_mask"]).float().cpu()
            out.append(torch.stack([scores[:len(micro)], scores[len(micro):]], dim=-1))
        return torch.cat(out)

    def save_hf(self, path: str, tokenizer_path: str, merged: bool = True) -> str | None:
        """The critic as a one-label SequenceClassification folder (loads as a reward model too); with LoRA, its
        adapters merged (a reward model is always written whole). Collective."""
        state = self.gathered_state_dict(self.engine.module.model)
        self.check_weights_finite()   # a final checkpoint is never written from NaN weights
        if self.rank != 0:
            return None
        from transformers import AutoTokenizer

        from openrlaif.workers.lora import base_model_shell, has_lora
        model = base_model_shell(self.backbone) if has_lora(self.backbone) else self.backbone
        model.save_pretrained(path, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
        return path
