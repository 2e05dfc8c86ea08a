"""The local judge's engines: HF (the fallback) and vLLM (prefix caching on). Both answer in token ids:

    next_token_logprobs(prompts, wanted)      log P(token | prompt) for the wanted ids at the next position
    score_continuations(prompts, candidates)  teacher-forced log P(continuation | prompt) of each candidate
    generate(prompts, max_tokens, temperatures, seeds)  sampled or greedy continuations

`score_continuations` is what makes labels of any length readable ("10" = "1" "0", "(A)", "Summary 1"): it walks
the candidates' token trie one depth at a time, so each depth is one batched call of `next_token_logprobs` on the
prompts extended by the distinct prefixes of that depth. Single-token labels are depth 0 only: one position read
per prompt. On vLLM the extended prompts share the judge prompt's cached KV blocks; its `prompt_logprobs` (the
other teacher-forcing route) never reads the prefix cache, so it is not used. Both engines return raw log-probs
(no temperature), which agree to ~5e-5 in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from openrlaif.batch import left_pad


@dataclass
class Generated:
    tokens: list[int]
    cached_tokens: int = 0          # prompt tokens read from vLLM's prefix cache (0 on HF)


class JudgeEngine:
    cached: list[int] = []          # per prompt of the last call: prompt tokens read from the prefix cache

    def next_token_logprobs(self, prompts: list[list[int]], wanted: list[list[int]]) -> list[dict[int, float]]:
        raise NotImplementedError

    def score_continuations(self, prompts: list[list[int]],
                            candidates: list[list[tuple[int, ...]]]) -> list[list[float]]:
        """log P(candidate | prompt) for every candidate token sequence of every prompt (teacher forcing)."""
        totals = [[0.0] * len(c) for c in candidates]
        cached = [0] * len(prompts)
        depth = 0
        while True:
            # (prompt index, prefix of length depth) -> next token ids wanted after it
            wanted: dict[tuple[int, tuple[int, ...]], set[int]] = {}
            for i, options in enumerate(candidates):
                for sequence in options:
                    if len(sequence) > depth:
                        wanted.setdefault((i, tuple(sequence[:depth])), set()).add(sequence[depth])
            if not wanted:
                self.cached = cached
                return totals
            keys = list(wanted)
            logprobs = self.next_token_logprobs([prompts[i] + list(prefix) for i, prefix in keys],
                                                [sorted(wanted[key]) for key in keys])
            for (i, _), hit in zip(keys, self.cached):
                cached[i] += hit
            found = dict(zip(keys, logprobs))
            for i, options in enumerate(candidates):
                for k, sequence in enumerate(options):
                    if len(sequence) > depth:
                        totals[i][k] += found[(i, tuple(sequence[:depth]))][sequence[depth]]
            depth += 1


class HFJudgeEngine(JudgeEngine):
    """An HF causal LM. Reads logits at the last position only (`logits_to_keep=1` where the model takes it);
    generates with HF `generate`, one micro-batch at a time."""

    def __init__(self, model_path: str, dtype: str, pad_id: int, micro_batch_size: int = 8,
                 trust_remote_code: bool = False) -> None:
        from openrlaif.workers.common import accepts_logits_to_keep, load_causal_lm
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_path, dtype, trust_remote_code).to(self.device).eval()
        self.pad_id, self.micro_batch_size = pad_id, micro_batch_size
        self.last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(self.model) else {}

    @torch.no_grad()
    def next_token_logprobs(self, prompts: list[list[int]], wanted: list[list[int]]) -> list[dict[int, float]]:
        out: list[dict[int, float]] = []
        for lo in range(0, len(prompts), self.micro_batch_size):
            ids, mask = (t.to(self.device) for t in left_pad(prompts[lo:lo + self.micro_batch_size], self.pad_id))
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                **self.last_only).logits[:, -1]
            logprobs = logits.float().log_softmax(-1).cpu()
            for row, tokens in enumerate(wanted[lo:lo + self.micro_batch_size]):
                out.append({t: float(logprobs[row, t]) for t in tokens})
        self.cached = [0] * len(prompts)
        return out

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_tokens: list[int], temperatures: list[float],
                 seeds: list[int]) -> list[Generated]:
        """One micro-batch shares its first request's budget, temperature and seed (HF samples a batch at once)."""
        out: list[Generated] = []
        for lo in range(0, len(prompts), self.micro_batch_size):
            ids, mask = (t.to(self.device) for t in left_pad(prompts[lo:lo + self.micro_batch_size], self.pad_id))
            torch.manual_seed(seeds[lo])
            sample = temperatures[lo] > 0
            sequences = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens[lo],
                                            do_sample=sample, temperature=temperatures[lo] if sample else None,
                                            top_p=None, top_k=None, pad_token_id=self.pad_id)
            for row in sequences[:, ids.shape[1]:].tolist():
                out.append(Generated([t for t in row if t != self.pad_id]))
        self.cached = [0] * len(prompts)
        return out

    @torch.no_grad()
    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        unknown = [name for name, _ in named_tensors if name not in params]
        if unknown:
            raise ValueError(f"judge: weights {unknown[:3]} are not in the judge model; feedback.judge.follow_policy "
                             "needs the judge to be the policy's own architecture.")
        for name, tensor in named_tensors:
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


class VLLMJudgeEngine(JudgeEngine):
    """An in-process vLLM engine with prefix caching: a group's requests (the same rubric and prompt, several
    responses; both orders of a pair) reuse the KV blocks of their shared prefix, also within one call.
    Label log-probs come from `logprob_token_ids` of the first generated token (raw, before temperature)."""

    MAX_IDS = 128      # vLLM's per-request bound on logprob_token_ids

    def __init__(self, model_path: str, dtype: str, max_model_len: int, seed: int, kv_cache_gib: float,
                 gpu_memory_utilization: float, trust_remote_code: bool = False, tensor_parallel_size: int = 1) -> None:
        from openrlaif.rollout.vllm_engine import VLLMEngine
        # CPU: vLLM's default KV block is 128 tokens and only full blocks are cached, more than a judge prompt's
        # shared part (rubric + prompt: ~70 tokens on SmolLM2); 32 is the smallest the CPU attention takes.
        self.engine = VLLMEngine(model_path, dtype, max_model_len, seed, kv_cache_gib, gpu_memory_utilization,
                                 trust_remote_code=trust_remote_code, cpu_kv={"block_size": 32},
                                 tensor_parallel_size=tensor_parallel_size,
                                 enable_prefix_caching=True, max_logprobs=self.MAX_IDS)
        self.llm = self.engine.llm

    def _run(self, prompts: list[list[int]], params: list) -> list:
        from vllm.inputs import TokensPrompt
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        self.cached = [int(getattr(o, "num_cached_tokens", 0) or 0) for o in outputs]
        return outputs

    def next_token_logprobs(self, prompts: list[list[int]], wanted: list[list[int]]) -> list[dict[int, float]]:
        from vllm import SamplingParams
        jobs = [(i, tokens[lo:lo + self.MAX_IDS]) for i, tokens in enumerate(wanted)
                for lo in range(0, len(tokens), self.MAX_IDS)]
        params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(chunk)) for _, chunk in jobs]
        outputs = self._run([prompts[i] for i, _ in jobs], params)
        out: list[dict[int, float]] = [{} for _ in prompts]
        cached = [0] * len(prompts)
        for (i, chunk), output, hit in zip(jobs, outputs, self.cached):
            step = output.outputs[0].logprobs[0]
            out[i].update({t: float(step[t].logprob) for t in chunk})
            cached[i] += hit
        self.cached = cached
        return out

    def generate(self, prompts: list[list[int]], max_tokens: list[int], temperatures: list[float],
                 seeds: list[int]) -> list[Generated]:
        from vllm import SamplingParams
        params = [SamplingParams(max_tokens=m, temperature=t, seed=s) for m, t, s in zip(max_tokens, temperatures,
                                                                                        seeds)]
        outputs = self._run(prompts, params)
        return [Generated(list(o.outputs[0].token_ids), hit) for o, hit in zip(outputs, self.cached)]

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.engine.update_weights(named_tensors)   # the rollout engine's reload, then a prefix-cache reset
