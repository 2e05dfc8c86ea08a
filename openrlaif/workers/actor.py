"""The policy role: one DeepSpeed ZeRO engine per Ray worker, data parallel over the workers."""
from __future__ import annotations

import time

import torch

from openrlaif.algorithms import POLICY_LOSSES, PREFERENCE_LOSSES
from openrlaif.algorithms.policy_loss import mismatch_weights
from openrlaif.batch import Batch
from openrlaif.config import ActorConfig, AlgorithmConfig
from openrlaif.workers.common import batched_response_logprobs, load_causal_lm, response_logprobs, trim_to_content
from openrlaif.workers.engine import DeepSpeedWorker, all_reduce_sum
from openrlaif.workers.weights import PackedWeights, weight_buckets
from openrlaif.workers.remote import remote


@remote
class ActorWorker(DeepSpeedWorker):
    """Verbs: logprobs, train_step, preference_step, listwise_step, sft_step, full_state_dict, save_hf."""

    def __init__(self, model_path: str, cfg: ActorConfig, algo: AlgorithmConfig, *, temperature: float,
                 trust_remote_code: bool = False, **engine_kwargs) -> None:
        super().__init__(cfg, **engine_kwargs)
        self.algo, self.temperature, self.model_path = algo, temperature, model_path
        model = load_causal_lm(model_path, "float32", trust_remote_code)
        if cfg.lora.rank:   # only the adapters train (actor.lora)
            from openrlaif.workers.lora import add_lora
            model = add_lora(model, cfg.lora)
        self.build_engine(model)

    def logprobs(self, batch: Batch) -> torch.Tensor:
        self.engine.eval()
        return batched_response_logprobs(self.engine, batch, self.cfg.micro_batch_size, self.device, self.temperature)

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """log π_ref from this actor's own base model, its LoRA adapters off for the pass
        (reference.from_actor_base): the starting policy without a reference role. Collective under ZeRO-3."""
        from openrlaif.workers.lora import adapters_off
        self.engine.eval()
        with adapters_off(self.engine.module):
            return batched_response_logprobs(self.engine, batch, self.cfg.micro_batch_size, self.device,
                                             self.temperature)

    def train_step(self, batch: Batch) -> dict[str, float]:
        """All epochs and optimizer steps on this worker's shard of one step's batch.

        `batch` holds advantages, sample_mask and ref_logprobs (when kl_coef > 0), and old_logprobs unless the
        update is on-policy (one epoch, one optimizer step), where log π_old = log π_θ detached exactly.
        """
        self.engine.train()
        loss_fn = POLICY_LOSSES[self.algo.policy_loss]
        start_time = time.perf_counter()
        sums = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0, "ratio": 0.0,
                "is_weight": 0.0, "is_truncated": 0.0, "behaviour_kl": 0.0, "valid_tokens": 0.0,
                "mismatch_abs": 0.0, "mismatch_k3": 0.0, "mismatch_tokens": 0.0, "mis_dropped": 0.0,
                "behaviour_sequences": 0.0}
        mismatch_max = 0.0
        algo = self.algo
        tokens_seen, grad_norm = 0, 0.0
        for epoch in range(self.cfg.epochs):
            for mini in batch.chunks_of(self.per_rank_mini):
                mask = mini["response_mask"] * mini["sample_mask"].unsqueeze(-1)
                # Normaliser of the global mini-batch (#tokens, or #sequences), so the loss is the big-batch value.
                local = mask.sum() if algo.loss_agg == "token_mean" else (mask.sum(-1) > 0).sum()
                normalizer = all_reduce_sum(local, self.device)
                for micro in mini.chunks_of(self.cfg.micro_batch_size):
                    micro = trim_to_content(micro).to(self.device)
                    entropy = None
                    if algo.entropy_coef > 0:
                        logprobs, entropy = response_logprobs(self.engine, micro, self.temperature, with_entropy=True)
                    else:
                        logprobs = response_logprobs(self.engine, micro, self.temperature)
                    old = micro["old_logprobs"] if "old_logprobs" in micro else logprobs.detach()
                    token_mask = micro["response_mask"] * micro["sample_mask"].unsqueeze(-1)
                    engine = next((micro[k] for k in ("engine_logprobs", "behaviour_logprobs", "rollout_logprobs")
                                   if k in micro), None)
                    # the engine's raw log-probs vs the trainer's log π_old (comparable at temperature 1 only)
                    if epoch == 0 and engine is not None and self.temperature == 1.0:
                        with torch.no_grad():
                            gap = (old.detach().float() - engine.float()) * token_mask
                            sums["mismatch_abs"] += float(gap.abs().sum())
                            sums["mismatch_k3"] += float(((gap.exp() - 1 - gap) * token_mask).sum())
                            sums["mismatch_tokens"] += float(token_mask.sum())
                            mismatch_max = max(mismatch_max, float(gap.abs().max()) if gap.numel() else 0.0)
                    is_weights = self.behaviour_weights(micro, old.detach(), token_mask, sums)
                    out = loss_fn(logprobs, old, micro["advantages"], token_mask,
                                  clip_eps=algo.clip_eps, clip_eps_high=algo.clip_eps_high, dual_clip=algo.dual_clip,
                                  ref_logprobs=micro["ref_logprobs"] if "ref_logprobs" in micro else None,
                                  kl_coef=0.0 if algo.kl_in_reward else algo.kl_coef, kl_estimator=algo.kl_estimator,
                                  entropy=entropy, entropy_coef=algo.entropy_coef, loss_agg=algo.loss_agg,
                                  num_tokens=max(float(normalizer), 1.0), is_weights=is_weights)
                    self.backward_and_step(out.loss)
                    # clip fraction and ratio are means over this micro-batch's valid tokens: weigh them by those
                    valid_tokens = float(token_mask.sum())
                    sums["valid_tokens"] += valid_tokens
                    tokens_seen += int(micro["attention_mask"].sum())
                    for key, value in (("loss", out.loss), ("policy_loss", out.policy_loss), ("kl", out.kl),
                                       ("entropy", out.entropy)):
                        sums[key] += float(value.detach())
                    sums["clip_fraction"] += float(out.clip_fraction) * valid_tokens
                    sums["ratio"] += float(out.ratio_mean) * valid_tokens
                grad_norm = self.grad_norm()
        updates = self.updates_per_step(batch)
        return {
            # Each micro-step's pieces are normalised by the global mini-batch token count: summed over
            # micro-steps and ranks they give the mini-batch value; averaged here over optimizer steps.
            "loss": sums["loss"] / updates,
            "policy_loss": sums["policy_loss"] / updates,
            "kl": sums["kl"] / updates,
            **({"entropy": sums["entropy"] / updates} if algo.entropy_coef > 0 else {}),
            "clip_fraction_x_tokens": sums["clip_fraction"],
            "is_weight_x_tokens": sums["is_weight"], "is_truncated_x_tokens": sums["is_truncated"],
            "behaviour_kl_x_tokens": sums["behaviour_kl"],
            "mis_dropped": sums["mis_dropped"], "behaviour_sequences": sums["behaviour_sequences"],
            "mismatch_abs_x_tokens": sums["mismatch_abs"], "mismatch_k3_x_tokens": sums["mismatch_k3"],
            "mismatch_tokens": sums["mismatch_tokens"], "mismatch_max": mismatch_max,
            "ratio_x_tokens": sums["ratio"],
            "valid_tokens": sums["valid_tokens"],   # response tokens of unmasked samples, over every epoch
            "tokens": float(tokens_seen),
            "grad_norm": grad_norm,
            "seconds": time.perf_counter() - start_time,
        }

    def behaviour_weights(self, micro: Batch, old: torch.Tensor, token_mask: torch.Tensor,
                          sums: dict[str, float]) -> torch.Tensor | None:
        """Weights for samples whose behaviour policy is not π_old: `rollout_logprobs` (one-step-off) or
        `behaviour_logprobs` (on-policy, the engine's own log-probs, sent by the driver where they are the
        sampling distribution's); algorithms.mismatch_weights. None when the batch has neither."""
        off_policy = "rollout_logprobs" in micro
        key = "rollout_logprobs" if off_policy else "behaviour_logprobs"
        if key not in micro:
            return None
        algo = self.algo
        weights, stats = mismatch_weights(old, micro[key], token_mask, algo.mismatch, off_policy, algo.is_cap,
                                          algo.mis_low, algo.mis_high)
        for name, value in stats.items():
            sums[name] += value
        return weights

    def preference_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer pass of a pairwise preference loss (DPO family) over this worker's shard of pairs.

        `batch` comes from data.pairs.pairs_to_batch: chosen_*/rejected_* model inputs and the precomputed
        ref_chosen_logps / ref_rejected_logps (zeros for reference-free losses).
        """
        self.engine.train()
        loss_fn = PREFERENCE_LOSSES[self.algo.loss]
        start_time = time.perf_counter()
        sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}
        tokens_seen = 0
        for micro, sides, num_pairs in self.pair_micro_batches(batch):
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
            weight = micro["pair_mask"].to(self.device)
            loss = (losses * weight).sum() / num_pairs
            self.backward_and_step(loss)
            with torch.no_grad():   # implicit rewards β·log π/π_ref (β·log π for reference-free losses)
                chosen_reward = self.algo.beta * (sequence_logps[:pairs] - ref_chosen)
                rejected_reward = self.algo.beta * (sequence_logps[pairs:] - ref_rejected)
            sums["loss"] += float(loss.detach())
            sums["accuracy"] += float(((chosen_reward > rejected_reward).float() * weight).sum())
            sums["margin"] += float(((chosen_reward - rejected_reward) * weight).sum())
            sums["chosen_reward"] += float((chosen_reward * weight).sum())
            sums["rejected_reward"] += float((rejected_reward * weight).sum())
            tokens_seen += int(sides["attention_mask"].sum())
        grad_norm = self.grad_norm()   # of the last optimizer step
        updates = self.updates_per_step(batch)
        seen = float(batch["pair_mask"].sum()) * self.cfg.epochs
        return {"loss": sums["loss"] / updates, "pairs": seen, "accuracy_x_pairs": sums["accuracy"],
                "margin_x_pairs": sums["margin"], "chosen_reward_x_pairs": sums["chosen_reward"],
                "rejected_reward_x_pairs": sums["rejected_reward"], "tokens": float(tokens_seen),
                "grad_norm": grad_norm, "seconds": time.perf_counter() - start_time}

    def listwise_step(self, batch: Batch, list_size: int) -> dict[str, float]:
        """KTO, BCO or LiPO-λ over this worker's shard of examples (data.lists.lists_to_batch): `list_size`
        consecutive rows per example, each with its label and precomputed Σ log π_ref."""
        from openrlaif.algorithms.preference import bco_loss, kto_loss, lipo_lambda_loss
        from openrlaif.data.lists import MISMATCHED
        self.engine.train()
        algo, k = self.algo, list_size
        start_time = time.perf_counter()
        sums = {"loss": 0.0, "accuracy": 0.0, "good_reward": 0.0, "good": 0.0, "bad_reward": 0.0, "bad": 0.0}
        tokens_seen, grad_norm = 0, 0.0
        for _ in range(self.cfg.epochs):
            for mini in batch.chunks_of(self.per_rank_mini * k):
                num_examples = float(all_reduce_sum(torch.tensor(len(mini) / k), self.device))
                for micro in mini.chunks_of(self.cfg.micro_batch_size * k):
                    rows = trim_to_content(micro).to(self.device)
                    logps = response_logprobs(self.engine, rows).sum(-1).view(-1, k)
                    ref = rows["ref_logps"].view(-1, k)
                    labels = rows["labels"].view(-1, k)
                    if algo.loss == "kto":   # column 1 holds the mismatched (x, y') row for z₀
                        assert bool((labels[:, 1] == MISMATCHED).all())
                        kl = (logps[:, 1] - ref[:, 1]).detach()   # z₀ over the micro-batch of every rank
                        kl_mean = (all_reduce_sum(kl.sum(), self.device)
                                   / all_reduce_sum(torch.tensor(float(len(kl))), self.device))
                        losses = kto_loss(logps[:, 0], ref[:, 0], labels[:, 0] > 0, logps[:, 1], ref[:, 1],
                                          beta=algo.beta, desirable_weight=algo.desirable_weight,
                                          undesirable_weight=algo.undesirable_weight, kl_mean=kl_mean.to(self.device))
                    elif algo.loss == "bco":
                        rewards = (algo.beta * (logps[:, 0] - ref[:, 0])).detach()
                        batch_mean = all_reduce_sum(rewards.sum(), self.device) / all_reduce_sum(
                            torch.tensor(float(len(rewards))), self.device)
                        self.bco_delta = (float(batch_mean) if getattr(self, "bco_delta", None) is None else
                                          algo.bco_delta_momentum * self.bco_delta
                                          + (1 - algo.bco_delta_momentum) * float(batch_mean))
                        losses = bco_loss(logps[:, 0], ref[:, 0], labels[:, 0] > 0, self.bco_delta, beta=algo.beta)
                    else:
                        losses = lipo_lambda_loss(logps, ref, labels, beta=algo.beta)
                    loss = losses.sum() / num_examples
                    self.backward_and_step(loss)
                    with torch.no_grad():
                        rewards = algo.beta * (logps - ref)
                        if algo.loss == "lipo":   # pairs the implicit reward orders like the labels
                            better = labels.unsqueeze(-1) > labels.unsqueeze(-2)
                            agree = (rewards.unsqueeze(-1) > rewards.unsqueeze(-2)) & better
                            sums["accuracy"] += float(agree.sum() / better.sum().clamp(min=1)) * len(labels)
                        good = labels[:, 0] > 0
                        sums["good_reward"] += float(rewards[:, 0][good].sum())
                        sums["good"] += float(good.sum())
                        sums["bad_reward"] += float(rewards[:, 0][~good].sum())
                        sums["bad"] += float((~good).sum())
                    sums["loss"] += float(loss.detach())
                    tokens_seen += int(rows["attention_mask"].sum())
                grad_norm = self.grad_norm()
        out = {key: value for key, value in sums.items() if key != "loss" and (key != "accuracy" or algo.loss == "lipo")}
        return out | {"loss": sums["loss"] / self.updates_per_step(batch, k), "examples": len(batch) / k *
                      self.cfg.epochs, "tokens": float(tokens_seen), "grad_norm": grad_norm,
                      "seconds": time.perf_counter() - start_time}

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
        for epoch in range(self.cfg.epochs):
            for mini in batch.chunks_of(self.per_rank_mini):
                answer_tokens = sum(len(r) for r in mini.meta["response_ids"])
                num_tokens = float(all_reduce_sum(torch.tensor(float(answer_tokens)), self.device))
                for micro in mini.chunks_of(self.cfg.micro_batch_size):
                    packed = pack_examples(micro.meta["prompt_ids"], micro.meta["response_ids"], pad_id, pack_length)
                    packed = {k: v.to(self.device) for k, v in packed.items()}
                    logits = self.engine(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                         attention_mask=block_causal_mask(packed["segment_ids"]),
                                         use_cache=False).logits[:, :-1].float()
                    targets = packed["input_ids"][:, 1:]
                    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                    loss = (token_loss * packed["loss_mask"][:, :-1]).sum() / max(num_tokens, 1.0)
                    self.backward_and_step(loss)
                    loss_sum += float(loss.detach())
                    tokens_seen += int((packed["segment_ids"] > 0).sum())
                    slots += packed["input_ids"].numel()
                grad_norm = self.grad_norm()
        updates = self.updates_per_step(batch)
        return {"loss": loss_sum / updates, "tokens": float(tokens_seen), "slots": float(slots),
                "grad_norm": grad_norm, "seconds": time.perf_counter() - start_time}

    def full_state_dict(self, dtype: str = "float32") -> dict[str, torch.Tensor] | None:
        """HF-named full weights on rank 0 (None elsewhere). Collective under ZeRO-3: call it on every rank."""
        return self.gathered_state_dict(self.engine.module, dtype)

    def packed_weights(self, dtype: str = "float32", names=None) -> PackedWeights | None:
        """full_state_dict (or the `names` of one sync bucket) for the engines, as byte arrays that Ray's object
        store passes without pickling (workers/weights.py). Collective under ZeRO-3. Records the largest number of
        gathered bytes rank 0 has held at once and the bytes sent (take_sync_bytes)."""
        state = self.gathered_state_dict(self.engine.module, dtype, names)
        if state is None:
            return None
        self.count_sync_bytes(state)
        return PackedWeights(state)

    def packed_adapter(self, dtype: str = "float32") -> tuple[PackedWeights, dict] | None:
        """The LoRA adapters alone (peft's names) and their adapter_config, for engines that take adapters
        (actor.lora.sync=adapter): rank 0's, None elsewhere. Collective under ZeRO-3."""
        from openrlaif.workers.lora import adapter_config, adapter_weights
        state = dict(adapter_weights(self.engine.module, self.gathered, getattr(torch, dtype)))
        if self.rank != 0:
            return None
        self.count_sync_bytes(state)
        return PackedWeights(state), adapter_config(self.engine.module, self.model_path)

    def sync_plan(self, dtype: str, bucket_mb: float) -> list[list[str]]:
        """The weight sync's buckets: whole decoder layers, about rollout.sync_bucket_mb each (0: one bucket)."""
        return weight_buckets(self.weight_sizes(self.engine.module, dtype), int(bucket_mb * 2 ** 20))

    def open_weight_sync(self) -> tuple[str, int]:
        """Rank 0, rollout.weight_sync=collective: listen for the weight-sync group on this node's address; the
        (address, port) that the engines join."""
        from openrlaif.rollout.collective import listen
        import ray
        self.sync_listener = listen(ray.util.get_node_ip_address())
        return self.sync_listener.getsockname()[:2]

    def join_weight_sync(self, world_size: int, device: str = "cpu") -> bool:
        """Rank 0 joins as the group's rank 0 (with every engine worker joining at the same time)."""
        from openrlaif.rollout.collective import SyncGroup
        address, port = self.sync_listener.getsockname()[:2]
        self.sync_group = SyncGroup(address, port, 0, world_size, device=device, listener=self.sync_listener)
        return True

    def broadcast_weights(self, dtype: str, names: list[str]) -> int:
        """One sync bucket: gathered by every rank (a collective under ZeRO-3), broadcast by rank 0 to the engines
        of the weight-sync group; the bytes sent (0 on other ranks)."""
        state = self.gathered_state_dict(self.engine.module, dtype, names)
        if state is None:
            return 0
        self.count_sync_bytes(state)
        return self.sync_group.send(list(state.items()))

    def count_sync_bytes(self, state: dict[str, torch.Tensor]) -> None:
        held = sum(t.numel() * t.element_size() for t in state.values())
        self.sync_peak_bytes = max(getattr(self, "sync_peak_bytes", 0), held)
        self.sync_sent_bytes = getattr(self, "sync_sent_bytes", 0) + held

    def take_sync_bytes(self) -> tuple[int, int]:
        """Rank 0, since the last call: the most gathered bytes held at once, and the bytes sent in all (0, 0
        elsewhere)."""
        taken = getattr(self, "sync_peak_bytes", 0), getattr(self, "sync_sent_bytes", 0)
        self.sync_peak_bytes = self.sync_sent_bytes = 0
        return taken

    def save_hf(self, path: str, tokenizer_path: str, merged: bool = True) -> str | None:
        """Write an HF folder (config, safetensors, tokenizer) that transformers and vLLM load; with LoRA and
        `merged=False`, a peft adapter folder (adapter_config.json, adapter_model.safetensors, the tokenizer)
        over the starting model instead. Collective."""
        from transformers import AutoTokenizer

        from openrlaif.workers.lora import adapter_config, adapter_weights, has_lora, write_adapter
        module = self.engine.module
        self.check_weights_finite()   # a final checkpoint is never written from NaN weights
        if has_lora(module) and not merged:
            weights = list(adapter_weights(module, self.gathered))
            if self.rank == 0:
                write_adapter(path, weights, adapter_config(module, self.model_path))
                AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
            return path if self.rank == 0 else None
        state = self.full_state_dict("float32")
        if self.rank != 0:
            return None
        if has_lora(module):   # merged weights under the base model's names: a shell of the base model writes them
            from openrlaif.workers.lora import base_model_shell
            module = base_model_shell(module)
        module.save_pretrained(path, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
        return path
