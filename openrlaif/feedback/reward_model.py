"""The reward-model role: a trained one-label SequenceClassification model (pipeline=reward_model, TRL's
RewardTrainer, OpenRLHF) that scores each (prompt, response) rendered with its own chat template."""
from __future__ import annotations

import ray
import torch

from openrlaif.batch import left_pad, split_evenly
from openrlaif.data.pairs import encode_response
from openrlaif.feedback.base import FeedbackResult
from openrlaif.models.value import TokenValues, load_scalar_model, sequence_scores
from openrlaif.workers.common import setup_process


def render_conversation(tokenizer, prompt: str, response: str, messages: list[dict] | None = None) -> list[int]:
    """Tokens exactly as pipeline=reward_model trained on them: the templated prompt (the whole conversation when
    there is one), the answer, end-of-turn."""
    prompt_ids, response_ids = encode_response(tokenizer, messages or [{"role": "user", "content": prompt}], response)
    return prompt_ids + response_ids


@ray.remote
class RewardModelWorker:
    """Verb: score(prompts, responses) -> list of floats (the head at the last token)."""

    def __init__(self, model_path: str, *, micro_batch_size: int, max_tokens: int, dtype: str, threads: int,
                 seed: int, trust_remote_code: bool = False) -> None:
        setup_process(threads, seed)
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = TokenValues(load_scalar_model(model_path, dtype, trust_remote_code)).to(self.device).eval()
        self.micro_batch_size, self.max_tokens = micro_batch_size, max_tokens

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], conversations: list | None = None) -> list[float]:
        conversations = conversations or [None] * len(prompts)
        rows = [render_conversation(self.tokenizer, p, r, c)[-self.max_tokens:]
                for p, r, c in zip(prompts, responses, conversations)]
        scores: list[float] = []
        for lo in range(0, len(rows), self.micro_batch_size):
            ids, mask = (t.to(self.device) for t in left_pad(rows[lo:lo + self.micro_batch_size], self.pad_id))
            scores += sequence_scores(self.model, ids, mask).float().cpu().tolist()
        return scores


class RewardModelFeedback:
    def __init__(self, group) -> None:
        self.group = group

    def score(self, prompts: list[str], responses: list[str], group_ids: list[int] | None = None,
              conversations: list[list[dict]] | None = None) -> FeedbackResult:
        shards = split_evenly(len(prompts), len(self.group))
        refs = self.group.map(lambda worker, span: worker.score.remote(
            prompts[span], responses[span], conversations[span] if conversations else None), shards)
        return FeedbackResult.from_scores([s for shard in ray.get(refs) for s in shard])
