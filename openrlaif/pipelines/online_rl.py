"""Online RL with AI or rule feedback (GRPO). `train()` is the loop; the helpers below it do one phase each."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import ray
import torch
from tqdm import tqdm

from openrlaif.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS
from openrlaif.algorithms.advantages import GREEDY_BASELINE
from openrlaif.batch import Batch, split_evenly
from openrlaif.config import Config, RoleResources, cache_dir
from openrlaif.data import PromptStream, load_prompts
from openrlaif.feedback import Feedback, FeedbackResult
from openrlaif.metrics import MetricsLogger, summary_line, timer
from openrlaif.models import resolve_model_path
from openrlaif.rollout.collate import completions_to_batch
from openrlaif.rollout.types import SamplingSpec
from openrlaif.pipelines.common import (finish, load_tokenizer, prepare_output_dir, save_checkpoint,
                                        start_actor, threads_per_worker)
from openrlaif.runtime import ray_session
from openrlaif.workers.group import WorkerGroup, check_cluster_fits


def train(cfg: Config) -> dict:
    """Run `cfg.steps` online steps; returns {"checkpoint": path | None, "metrics": last step's metrics}."""
    run = prepare_run(cfg)                     # paths, tokenizer, prompts: every input checked before Ray starts
    with ray_session(cfg.cluster, run.cpus_needed):
        roles = start_roles(cfg, run)
        try:
            checkpoint, metrics, log_path = train_loop(cfg, run, roles)
        finally:
            roles.shutdown()       # frees the placement groups also when the cluster outlives the run
    return finish(checkpoint, log_path, metrics, run.out_dir)


def train_loop(cfg: Config, run: RunInputs, roles: Roles) -> tuple[str | None, dict[str, float], str]:
    """prompts -> rollout -> feedback -> reference log-probs -> advantages -> actor update -> weight sync."""
    stream = PromptStream(run.prompts, cfg.data.prompts_per_step, cfg.seed, cfg.data.shuffle)
    logger = MetricsLogger(run.out_dir)
    metrics: dict[str, float] = {}
    for step in tqdm(range(1, cfg.steps + 1), desc="openrlaif", unit="step", dynamic_ncols=True):
        metrics, step_start = {}, time.perf_counter()
        prompts = stream.next_batch()
        with timer(metrics, "rollout"):        # 1. sample a group of responses per prompt
            batch = generate(roles, prompts, cfg, run.tokenizer, seed=cfg.seed * 10_000 + step)
        with timer(metrics, "feedback"):       # 2. judge / rule -> rewards; failed verdicts mask their sample
            feedback = score(roles, batch)
            batch["rewards"], batch["sample_mask"] = feedback.rewards, feedback.valid.float()
        with timer(metrics, "logprobs"):       # 3. reference (and old-policy) log-probs, launched together
            add_logprobs(roles, batch, cfg)
        with timer(metrics, "advantage"):      # 4. advantages (group baselines, KL-shaped returns), on the driver
            batch["advantages"] = compute_advantages(batch, feedback.valid, cfg)
        with timer(metrics, "update"):         # 5. DeepSpeed update on the actor workers
            train_metrics = update_actor(roles, batch)
        with timer(metrics, "sync"):           # 6. push the new weights into the rollout engines
            metrics["sync/engine_s"] = sync_weights(roles, cfg)
        metrics["time/step_s"] = time.perf_counter() - step_start
        metrics |= step_metrics(batch, feedback, train_metrics, metrics)
        logger.log(step, metrics)
        tqdm.write(summary_line(step, metrics))
    logger.close()
    checkpoint = save_checkpoint(roles.actor, run.out_dir, run.model_path) if cfg.output.save_final else None
    return checkpoint, metrics, logger.path


# ---------------------------------------------------------------------------------------------------- set-up

@dataclass
class RunInputs:
    out_dir: str
    model_path: str
    judge_path: str | None
    tokenizer: object
    prompts: list
    plan: dict[str, RoleResources]
    cpus_needed: float


@dataclass
class Roles:
    actor: WorkerGroup
    reference: WorkerGroup | None
    rollout: WorkerGroup
    feedback: Feedback
    judge: WorkerGroup | None

    def shutdown(self) -> None:
        for group in (self.actor, self.reference, self.rollout, self.judge):
            if group is not None:
                group.shutdown()


def prepare_run(cfg: Config) -> RunInputs:
    model_path = resolve_model_path(cfg.model.path, cache_dir(cfg.model))
    judge_path = None
    if cfg.feedback.source == "judge":
        judge_path = resolve_model_path(cfg.feedback.judge.model or cfg.model.path, cache_dir(cfg.model),
                                        key="feedback.judge.model")
    else:
        from openrlaif.feedback.rules import load_function
        load_function(cfg.feedback.function)   # fail now on a bad name, not after the models are loaded
    tokenizer = load_tokenizer(model_path, cfg)
    prompts = load_prompts(cfg.data.prompts, tokenizer, cfg.data.max_prompt_tokens, cfg.data.system_prompt)
    out_dir = prepare_output_dir(cfg)
    plan = role_plan(cfg, judge_path)
    cpus = sum(r.num_cpus * r.num_workers for r in plan.values())
    return RunInputs(out_dir, model_path, judge_path, tokenizer, prompts, plan, cpus)


def role_plan(cfg: Config, judge_path: str | None) -> dict[str, RoleResources]:
    """The roles this run starts and what each reserves: no reference without a KL term, no judge for rules."""
    plan = {"actor": cfg.actor.resources, "rollout": cfg.rollout.resources}
    if cfg.algorithm.kl_coef > 0:
        plan["reference"] = cfg.reference.resources
    if judge_path:
        plan["judge"] = cfg.feedback.judge.resources
    return plan


def start_roles(cfg: Config, run: RunInputs) -> Roles:
    """Each role in its own placement group; all models load in parallel, then we wait once."""
    from openrlaif.feedback.judge import JudgeFeedback, JudgeWorker
    from openrlaif.feedback.rules import FunctionFeedback
    from openrlaif.workers.reference import ReferenceWorker
    from openrlaif.workers.rollout import RolloutWorker

    plan = run.plan
    check_cluster_fits(plan)

    def threads(role: str) -> int:
        return threads_per_worker(cfg, plan[role].num_workers)

    step_batch = cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
    trust = cfg.model.trust_remote_code
    temperature = cfg.rollout.temperature
    actor = start_actor(cfg, run.model_path, step_batch, temperature)
    rollout = WorkerGroup("rollout", RolloutWorker, cfg.rollout.resources, lambda rank: dict(
        model_path=run.model_path, cfg=cfg.rollout,
        max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
        threads=threads("rollout"), seed=cfg.seed + rank, trust_remote_code=trust))
    reference = None
    if "reference" in plan:
        reference = WorkerGroup("reference", ReferenceWorker, cfg.reference.resources, lambda rank: dict(
            model_path=run.model_path, dtype=cfg.model.dtype, micro_batch_size=cfg.reference.micro_batch_size,
            temperature=temperature, threads=threads("reference"), seed=cfg.seed, trust_remote_code=trust))
    judge = None
    if "judge" in plan:
        judge = WorkerGroup("judge", JudgeWorker, cfg.feedback.judge.resources, lambda rank: dict(
            model_path=run.judge_path, cfg=cfg.feedback.judge, dtype=cfg.model.dtype, threads=threads("judge"),
            seed=cfg.seed, trust_remote_code=trust))
        feedback = JudgeFeedback(judge)
    else:
        feedback = FunctionFeedback(cfg.feedback.function, cfg.feedback.function_kwargs)
    groups = [g for g in (actor, rollout, reference, judge) if g is not None]
    ray.get([ref for g in groups for ref in g.call(lambda w: w.ready.remote())])
    return Roles(actor, reference, rollout, feedback, judge)


# ---------------------------------------------------------------------------------------------------- phases

def generate(roles: Roles, prompts: list, cfg: Config, tokenizer, seed: int) -> Batch:
    """Spread the prompts over the engines; every engine samples `samples_per_prompt` responses per prompt.
    Estimators with a greedy baseline (ReMax) also get one greedy response per prompt, launched alongside, in
    batch.meta["baseline_response"] (one per sample, repeated within its group)."""
    spec = SamplingSpec(n=cfg.rollout.samples_per_prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=seed)
    spans = split_evenly(len(prompts), len(roles.rollout))

    def launch(sampling: SamplingSpec) -> list:
        return roles.rollout.map(lambda worker, span: worker.generate.remote(
            [p.token_ids for p in prompts[span]], replace(sampling, seed=seed + span.start)), spans)

    sample_refs = launch(spec)
    greedy_refs = launch(replace(spec, n=1, temperature=0.0)) if cfg.algorithm.advantage in GREEDY_BASELINE else []
    shards = ray.get(sample_refs + greedy_refs)
    completions, greedy = [], {}
    for span, shard in zip(spans, shards[:len(spans)]):
        for completion in shard:
            completion.prompt_index += span.start
            completions.append(completion)
    for span, shard in zip(spans, shards[len(spans):]):
        for completion in shard:
            greedy[completion.prompt_index + span.start] = completion.token_ids
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    batch = completions_to_batch([p.token_ids for p in prompts], [p.text for p in prompts], completions, texts,
                                 tokenizer.pad_token_id)
    if greedy:
        greedy_texts = tokenizer.batch_decode([greedy[i] for i in range(len(prompts))], skip_special_tokens=True)
        batch.meta["baseline_response"] = [greedy_texts[c.prompt_index] for c in completions]
    return batch


def score(roles: Roles, batch: Batch) -> FeedbackResult:
    """Rewards for the samples, in one feedback call together with the greedy baselines when there are any.
    A sample whose baseline verdict failed is masked too: its advantage would be undefined."""
    prompts, responses = batch.meta["prompt"], batch.meta["response"]
    if "baseline_response" not in batch.meta:
        return roles.feedback.score(prompts, responses)
    groups = batch["group_ids"].tolist()
    first = {group: row for row, group in reversed(list(enumerate(groups)))}   # one baseline per prompt
    rows = sorted(first.values())
    result = roles.feedback.score(prompts + [prompts[r] for r in rows],
                                  responses + [batch.meta["baseline_response"][r] for r in rows])
    size = len(batch)
    baseline_of = {groups[r]: size + k for k, r in enumerate(rows)}
    index = torch.tensor([baseline_of[g] for g in groups])
    batch["baseline_rewards"] = result.rewards[index]
    return FeedbackResult(result.rewards[:size], result.valid[:size] & result.valid[index], result.failures,
                          result.metrics)


def compute_advantages(batch: Batch, valid: torch.Tensor, cfg: Config) -> torch.Tensor:
    algo = cfg.algorithm
    kl = None
    if algo.kl_in_reward:   # per-token KL of the sampling policy to the reference, a penalty in the reward
        kl = KL_ESTIMATORS[algo.kl_estimator](batch["old_logprobs"], batch["ref_logprobs"]) * batch["response_mask"]
    return ADVANTAGE_ESTIMATORS[algo.advantage](
        rewards=batch["rewards"], group_ids=batch["group_ids"], valid=valid, token_mask=batch["response_mask"],
        kl=kl, kl_coef=algo.kl_coef, normalize_std=algo.normalize_std,
        baseline_rewards=batch["baseline_rewards"] if "baseline_rewards" in batch else None)


def on_policy(cfg: Config) -> bool:
    """One epoch with one optimizer step: log π_old equals log π_θ, no separate pass needed."""
    step_batch = cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
    return cfg.actor.epochs == 1 and (cfg.actor.mini_batch_size in (0, step_batch))


def add_logprobs(roles: Roles, batch: Batch, cfg: Config) -> None:
    model_inputs = Batch({k: batch[k] for k in ("input_ids", "attention_mask", "response_mask")})
    ref_refs = []
    if roles.reference is not None:
        ref_refs = roles.reference.map(lambda w, shard: w.logprobs.remote(shard),
                                       model_inputs.split(min(len(roles.reference), len(batch))))
    old_refs = []
    if not on_policy(cfg) or cfg.algorithm.kl_in_reward:   # KL in the reward needs log π_old before the update
        old_refs = roles.actor.map(lambda w, shard: w.logprobs.remote(shard), model_inputs.split(len(roles.actor)))
    results = ray.get(ref_refs + old_refs)
    if ref_refs:
        batch["ref_logprobs"] = torch.cat(results[:len(ref_refs)])
    if old_refs:
        batch["old_logprobs"] = torch.cat(results[len(ref_refs):])


def update_actor(roles: Roles, batch: Batch) -> dict[str, float]:
    fields = ["input_ids", "attention_mask", "response_mask", "sample_mask", "advantages"]
    fields += [k for k in ("ref_logprobs", "old_logprobs") if k in batch]
    train_batch = Batch({k: batch[k] for k in fields})
    per_rank = ray.get(roles.actor.map(lambda w, shard: w.train_step.remote(shard),
                                       train_batch.split(len(roles.actor))))
    total = {key: sum(r[key] for r in per_rank) for key in per_rank[0]}
    total["seconds"] = max(r["seconds"] for r in per_rank)
    total["grad_norm"] = per_rank[0]["grad_norm"]
    return total


def sync_weights(roles: Roles, cfg: Config) -> float:
    """Rank 0 gathers full weights (a collective under ZeRO-3), the engines load them from the object store."""
    state_refs = roles.actor.call(lambda w: w.full_state_dict.remote(cfg.rollout.dtype))
    load_refs = roles.rollout.call(lambda w: w.update_weights.remote(state_refs[0]))
    results = ray.get(state_refs[1:] + load_refs)   # ranks > 0 return None; engines return their load time
    return max(results[len(state_refs) - 1:])


def step_metrics(batch: Batch, feedback, train: dict[str, float], times: dict[str, float]) -> dict[str, float]:
    valid = feedback.valid
    rewards = feedback.rewards[valid]
    response_tokens = float(batch["response_mask"].sum())
    all_tokens = float(batch["attention_mask"].sum())
    out = {
        "reward/mean": float(rewards.mean()) if len(rewards) else float("nan"),
        "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "feedback/failures": float((~valid).sum()),
        "feedback/failure_rate": float((~valid).float().mean()),
        "response/length_mean": response_tokens / len(batch),
        "response/finished_fraction": float(batch["finished"].float().mean()),
        "train/loss": train["loss"], "train/policy_loss": train["policy_loss"], "train/kl": train["kl"],
        "train/clip_fraction": train["clip_fraction_x_tokens"] / max(train["response_tokens"], 1.0),
        "train/ratio_mean": train["ratio_x_tokens"] / max(train["response_tokens"], 1.0),
        "train/grad_norm": train["grad_norm"],
        "throughput/rollout_tokens_per_s": response_tokens / max(times["time/rollout_s"], 1e-9),
        "throughput/logprobs_tokens_per_s": all_tokens / max(times["time/logprobs_s"], 1e-9),
        "throughput/update_tokens_per_s": train["tokens"] / max(times["time/update_s"], 1e-9),
    }
    if "entropy" in train:   # computed only when algorithm.entropy_coef > 0
        out["train/entropy"] = train["entropy"]
    for kind, count in feedback.failures.items():
        out[f"feedback/failures/{kind}"] = float(count)
    for key, value in feedback.metrics.items():
        out[f"feedback/{key}"] = value
    if "judge_prompt_tokens" in feedback.metrics:
        judge_tokens = feedback.metrics["judge_prompt_tokens"] + feedback.metrics["judge_generated_tokens"]
        out["throughput/feedback_tokens_per_s"] = judge_tokens / max(times["time/feedback_s"], 1e-9)
        out["feedback/judge_tokens_per_policy_token"] = judge_tokens / max(response_tokens, 1.0)
    return out
