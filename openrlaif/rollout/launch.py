"""The driver's side of rollout: spread prompts over the engines and launch sampling (`launch_rollout`), collate
the answers into one Batch (`collect_rollout`), both at once (`generate`), or one-step-off with the next batch in
flight while this one trains (`next_rollout`)."""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import ray

from openrlaif.algorithms.advantages import GREEDY_BASELINE
from openrlaif.batch import Batch, split_evenly
from openrlaif.config import Config
from openrlaif.data import PromptStream
from openrlaif.rollout.collate import completions_to_batch
from openrlaif.rollout.types import SamplingSpec

if TYPE_CHECKING:
    from openrlaif.roles import Roles


def generate(roles: Roles, prompts: list, cfg: Config, tokenizer, seed: int) -> Batch:
    """Spread the prompts over the engines; every engine samples `samples_per_prompt` responses per prompt.
    Estimators with a greedy baseline (ReMax) also get one greedy response per prompt, launched alongside, in
    batch.meta["baseline_response"] (one per sample, repeated within its group)."""
    return collect_rollout(launch_rollout(roles, prompts, cfg, seed), tokenizer)


@dataclass
class PendingRollout:
    """Sampling requests in flight on the engines (ray refs), and what is needed to collate their answers."""
    prompts: list
    spans: list
    sample_refs: list
    greedy_refs: list
    episodes: tuple | None = None   # env.*: (roles, cfg, seed) to play each first turn out as an episode
    agents: Future | None = None    # env=agent one step ahead: the agents playing in a thread of their own


def launch_rollout(roles: Roles, prompts: list, cfg: Config, seed: int, tokenizer=None) -> PendingRollout:
    """Start sampling. Black-box agents (env=agent) make their own requests: they play when the batch is collected
    or, given the `tokenizer` (one-step-off), from now on in a thread of their own, beside the actor's update."""
    spec = SamplingSpec(n=cfg.rollout.samples_per_prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=seed)
    spans = split_evenly(len(prompts), len(roles.rollout))
    if cfg.env.name == "agent":
        if tokenizer is None:
            return PendingRollout(prompts, spans, [], [], (roles, cfg, seed))
        from openrlaif.rollout.agents import run_agents
        from openrlaif.rollout.multi_turn import engine_sampler
        future = Future()

        def play() -> None:
            try:
                future.set_result(run_agents(engine_sampler(roles), prompts, cfg, tokenizer, seed))
            except BaseException as err:   # noqa: BLE001 - raised where the batch is collected
                future.set_exception(err)
        threading.Thread(target=play, daemon=True, name="openrlaif-agents-ahead").start()
        return PendingRollout(prompts, spans, [], [], None, future)

    def launch(sampling: SamplingSpec) -> list:
        return roles.rollout.map(lambda worker, span: worker.generate.remote(
            [p.token_ids for p in prompts[span]], replace(sampling, seed=seed + span.start)), spans)

    wants_greedy = cfg.pipeline == "online_rl" and cfg.algorithm.advantage in GREEDY_BASELINE
    return PendingRollout(prompts, spans, launch(spec), launch(replace(spec, n=1, temperature=0.0)) if wants_greedy else [],
                          (roles, cfg, seed) if cfg.env.name else None)


def collect_rollout(pending: PendingRollout, tokenizer) -> Batch:
    if pending.agents is not None:
        return pending.agents.result()
    prompts, spans = pending.prompts, pending.spans
    shards = ray.get(pending.sample_refs + pending.greedy_refs)
    completions, greedy = [], {}
    for span, shard in zip(spans, shards[:len(spans)]):
        for completion in shard:
            completion.prompt_index += span.start
            completions.append(completion)
    for span, shard in zip(spans, shards[len(spans):]):
        for completion in shard:
            completion.prompt_index += span.start
            greedy[completion.prompt_index] = completion
    if pending.episodes is not None:   # env.*: the first turns go on as episodes
        from openrlaif.rollout.multi_turn import engine_sampler, greedy_baselines, run_episodes
        roles, cfg, seed = pending.episodes
        if cfg.env.name == "agent":
            from openrlaif.rollout.agents import run_agents
            return run_agents(engine_sampler(roles), prompts, cfg, tokenizer, seed)
        user = getattr(roles, "user_backend", None)   # env.user_sim's local model (any object with .rollout works)
        batch = run_episodes(engine_sampler(roles), prompts, completions, cfg, tokenizer, seed, user)
        if greedy:   # ReMax: each prompt's greedy episode, played out greedily, is its baseline
            greedy_baselines(engine_sampler(roles), prompts, [greedy[i] for i in range(len(prompts))], cfg,
                             tokenizer, seed, batch, user)
        return batch
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    batch = completions_to_batch([p.token_ids for p in prompts], [p.text for p in prompts], completions, texts,
                                 tokenizer.pad_token_id)
    batch.meta["conversation"] = [prompts[c.prompt_index].messages for c in completions]   # what a judge is shown
    if greedy:
        greedy_texts = tokenizer.batch_decode([greedy[i].token_ids for i in range(len(prompts))],
                                              skip_special_tokens=True)
        batch.meta["baseline_response"] = [greedy_texts[c.prompt_index] for c in completions]
    return batch


def next_rollout(roles: Roles, stream: PromptStream, cfg: Config, tokenizer, step: int,
                 metrics: dict[str, float]) -> Batch:
    """This step's samples. Asynchronous (rollout.async_steps=k >= 1): batches are launched up to k steps ahead, so
    the engines sample while the actor updates; this step takes the oldest in flight, launched at step j by the
    weights of then (after j - 1 updates), k or fewer updates stale (`rollout/staleness` = step - j), and tops the
    queue up to step + k. The actor corrects for the staleness with importance weights against each token's
    behaviour log-prob, the engine's (algorithm.mismatch, is_cap). Prompts and seeds are those of a synchronous run:
    batch t is the stream's t-th, seeded by t. Episodes (env.*): their first turns are what is launched ahead; the
    later turns are sampled when the batch is collected, by the weights of then, and every token's importance
    weight uses its own behaviour log-prob."""
    queue = roles.pending_rollouts   # (step launched at, PendingRollout) for steps step, step + 1, ..., oldest first
    if queue:
        launched, pending = queue.popleft()
    else:
        launched, pending = step, launch_rollout(roles, stream.next_batch(), cfg, cfg.seed * 10_000 + step)
    metrics["rollout/staleness"] = float(step - launched)
    for target in range(step + len(queue) + 1, min(step + cfg.rollout.async_steps, cfg.steps) + 1):
        queue.append((step, launch_rollout(roles, stream.next_batch(), cfg, cfg.seed * 10_000 + target, tokenizer)))
    batch = collect_rollout(pending, tokenizer)
    if cfg.rollout.sleep_between_steps:   # the engines' GPU memory to the trainers until the weight sync
        ray.get(roles.rollout.call(lambda w: w.sleep.remote()))
    if "env_turns" in batch.meta:
        from openrlaif.rollout.multi_turn import env_metrics
        metrics |= env_metrics(batch)
    return batch
