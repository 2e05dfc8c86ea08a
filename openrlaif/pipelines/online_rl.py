"""Online RL with AI, reward-model or rule feedback (GRPO family, REINFORCE++, ReMax, PPO with a critic).
`train()` is the loop; the helpers below it do one phase each."""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace

import ray
import torch
from tqdm import tqdm

from openrlaif.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES
from openrlaif.algorithms.advantages import (CRITIC, GREEDY_BASELINE, GROUP_BASELINES, TOKEN_LEVEL,
                                             distillation_advantages, turn_advantages)
from openrlaif.algorithms.policy_loss import LOSS_AGGREGATIONS
from openrlaif.algorithms.rewards import overlong_penalty
from openrlaif.batch import Batch, concat_rollouts
from openrlaif.checkpointing import (Checkpointer, FailedSteps, RunError, dead_workers, non_finite_stop, resume_hint,
                                     role_died, stop_on_non_finite, truncate_metrics)
from openrlaif.config import (Config, ConfigError, check_choice, check_positive, reference_from_actor, step_batch_size,
                              validate_feedback_source, validate_trained)
from openrlaif.data import PromptStream
from openrlaif.envs import EnvReward
from openrlaif.feedback import Feedback, FeedbackResult
from openrlaif.metrics import MetricsLogger, feedback_metrics, summary_line, timer
from openrlaif.pipelines.common import finish, save_checkpoint
from openrlaif.pipelines.evaluation import InLoopEval
from openrlaif.roles import Roles, RunInputs, prepare_run, start_roles
from openrlaif.rollout.launch import collect_rollout, generate, launch_rollout, next_rollout
from openrlaif.rollout.weight_sync import sync_weights
from openrlaif.runtime import ray_session


def train(cfg: Config, step_fn=None) -> dict:
    """Run `cfg.steps` online steps; returns {"checkpoint": path | None, "metrics": last step's metrics}.
    `step_fn` is one step's work (default: `one_step`, policy gradient; online DPO passes its own)."""
    run = prepare_run(cfg)                     # paths, tokenizer, prompts: every input checked before Ray starts
    with ray_session(cfg.cluster, run.cpus_needed):
        roles = start_roles(cfg, run)
        try:
            checkpoint, metrics, log_path = train_loop(cfg, run, roles, step_fn)
        finally:
            roles.shutdown()       # frees the placement groups also when the cluster outlives the run
    return finish(checkpoint, log_path, metrics, run.out_dir)


def train_loop(cfg: Config, run: RunInputs, roles: Roles, step_fn=None) -> tuple[str | None, dict[str, float], str]:
    """Steps with resume, dead-worker reports, metrics and checkpoints around `step_fn` (default `one_step`:
    prompts -> rollout -> feedback -> reference log-probs -> advantages -> actor update -> weight sync)."""
    step_fn = step_fn or one_step
    stream = PromptStream(run.prompts, cfg.data.prompts_per_step, cfg.seed, cfg.data.shuffle)
    progress = Progress(cfg, run, roles, stream)
    first_step = progress.resume()
    logger = MetricsLogger(run.out_dir, cfg, first_step)
    failed_steps = FailedSteps(cfg.feedback.max_failed_steps)
    evaluation = InLoopEval(cfg, run, roles)   # eval.*: held-out prompts, measured before, every N steps, after
    metrics: dict[str, float] = {}
    if cfg.feedback.transform != "none" and first_step == 1:   # 0. per-prompt reference rewards (LSC)
        reference_metrics = calibrate_references(roles, run, cfg)
        tqdm.write("[openrlaif] reference rewards: " + ", ".join(f"{k}={v:.3g}" for k, v in reference_metrics.items()))
    try:
        if first_step == 1 and evaluation.due(0):   # the starting policy, as step 0
            start_metrics: dict[str, float] = {}
            with progress.step(0, start_metrics, phase="eval"):   # a dead worker is named, as in a step
                start_metrics |= evaluation.run_eval(0)
            logger.log(0, start_metrics)
        for step in tqdm(range(first_step, cfg.steps + 1), desc="openrlaif", unit="step", dynamic_ncols=True,
                         initial=first_step - 1, total=cfg.steps):
            metrics, step_start = {}, time.perf_counter()
            with progress.step(step, metrics):
                step_fn(cfg, run, roles, stream, step, metrics)
            metrics["time/step_s"] = time.perf_counter() - step_start
            if evaluation.due(step):   # after the step's update and weight sync: the policy it ends with
                with progress.step(step, metrics, phase="eval"):
                    metrics |= evaluation.run_eval(step)
            logger.log(step, metrics)
            tqdm.write(summary_line(step, metrics))
            if not math.isfinite(metrics.get("train/grad_norm", 0.0)):   # applied: these weights are lost
                raise non_finite_stop(step, f"the gradient norm was {metrics['train/grad_norm']}",
                                      progress.checkpointer)
            failed_steps.count(step, metrics, progress.checkpointer)
            progress.save_if_due(step)
            judge = roles.judge_client
            if judge is not None and judge.exhausted and step < cfg.steps:   # the run's judge budget is spent
                if not progress.checkpointer.due(step, cfg.steps):   # else it was just saved
                    progress.save(step)
                raise RunError(f"step {step}: the judge's total budget is spent ({judge.exhausted}; "
                               f"{judge.ledger['prompt_tokens'] + judge.ledger['completion_tokens']:.0f} tokens, "
                               f"cost {judge.ledger['cost']:.4g} so far). The run stopped after saving a checkpoint "
                               f"({progress.checkpointer.last_path}). To go on: raise {judge.exhausted} and rerun "
                               "the same command with resume=true.")
    finally:
        logger.close()      # also on a failed step: TensorBoard and W&B keep what was logged
    checkpoint = None
    if cfg.output.save_final:
        with stop_on_non_finite(cfg.steps, progress.checkpointer):
            checkpoint = save_checkpoint(roles.actor, run.out_dir, run.model_path, lora=cfg.actor.lora)
            if roles.critic is not None:
                save_checkpoint(roles.critic, run.out_dir, run.model_path, name="critic")
    return checkpoint, metrics, logger.path


def one_step(cfg: Config, run: RunInputs, roles: Roles, stream: PromptStream, step: int,
             metrics: dict[str, float]) -> None:
    with timer(metrics, "rollout"):        # 1. sample a group of responses per prompt (or take the prefetched group)
        batch = next_rollout(roles, stream, cfg, run.tokenizer, step, metrics)
    with timer(metrics, "feedback"):       # 2. judge / rule -> rewards; failed verdicts mask their sample
        feedback = score(roles, batch, per_turn=cfg.feedback.per_turn, compares=compares(cfg.feedback))
        if cfg.algorithm.dynamic_sampling:   # DAPO: refill past the groups whose rewards are all equal
            batch, feedback = refill_informative(roles, run, stream, cfg, step, batch, feedback, metrics)
        batch["rewards"], batch["sample_mask"] = shaped_rewards(batch, feedback, cfg, metrics)
    with timer(metrics, "logprobs"):       # 3. reference (and old-policy) log-probs, critic values, together
        add_logprobs(roles, batch, cfg)
    with timer(metrics, "advantage"):      # 4. advantages (group baselines, KL-shaped returns), on the driver
        batch["advantages"] = compute_advantages(batch, feedback.valid, cfg)
    if "teacher_logprobs" in batch:   # (the teacher's log-probs come with the reference's, after the rewards)
        metrics |= distill_metrics(batch)
    with timer(metrics, "update"):         # 5. DeepSpeed updates of the actor (and critic), side by side
        train_metrics = update_actor(roles, batch, cfg)
    with timer(metrics, "sync"):           # 6. push the new weights into the rollout engines
        metrics |= sync_weights(roles, cfg, step)
    metrics |= step_metrics(batch, feedback, train_metrics, metrics)


class Progress:
    """Resumable checkpoints (output.checkpoint_every, resume=true) and dead-worker reports of an online loop."""

    def __init__(self, cfg: Config, run: RunInputs, roles: Roles, stream: PromptStream) -> None:
        self.cfg, self.run, self.roles, self.stream = cfg, run, roles, stream
        self.checkpointer = Checkpointer(run.out_dir, cfg.output.checkpoint_every, cfg.output.keep_last)
        self.trained = {"actor": roles.actor} | ({"critic": roles.critic} if roles.critic is not None else {})
        if cfg.reference.update_every and roles.reference is not None:   # a refreshed reference is state too
            self.trained["reference"] = roles.reference

    def resume(self) -> int:
        """The first step to run: 1, or the step after the newest checkpoint (resume=true)."""
        if not self.cfg.resume:
            return 1
        found = self.checkpointer.latest(report=tqdm.write)   # checked at start-up: the newest intact one
        if found is None:
            raise RunError(f"resume=true: no intact checkpoint is left under {self.checkpointer.root}.")
        step, path = found
        state = self.checkpointer.load(path, self.trained)
        self.stream.position = state["stream_position"]
        if "references" in state:   # LSC reference rewards of the starting policy: not recomputed
            self.roles.feedback.references = state["references"]
        if "judge_run_id" in state and self.roles.judge_client is not None:   # a self-judge's verdicts are this run's
            self.roles.judge_client.run_id = state["judge_run_id"]
        if "judge_ledger" in state and self.roles.judge_client is not None:   # the budget counts the whole run
            self.roles.judge_client.ledger.update(state["judge_ledger"])
        sync_weights(self.roles, self.cfg, step)   # engines (and a self-judge) get the restored weights
        for name in ("metrics.jsonl", "eval_samples.jsonl"):   # rows a killed run logged after its checkpoint
            truncate_metrics(os.path.join(self.run.out_dir, name), step)
        self.checkpointer.last_path = path
        tqdm.write(f"[openrlaif] resumed from {path}; next step {step + 1} of {self.cfg.steps}")
        return step + 1

    def save_if_due(self, step: int) -> None:
        if self.checkpointer.due(step, self.cfg.steps):
            self.save(step)

    def save(self, step: int) -> None:
        # batches in flight (rollout.async_steps) are not trained yet: a resume samples their prompts again
        prefetched = self.cfg.data.prompts_per_step * len(self.roles.pending_rollouts)
        state = {"stream_position": self.stream.position - prefetched}
        if getattr(self.roles.feedback, "references", None) is not None:
            state["references"] = self.roles.feedback.references
        if self.roles.judge_client is not None:
            state["judge_run_id"] = self.roles.judge_client.run_id
            state["judge_ledger"] = dict(self.roles.judge_client.ledger)
        with self.step(step, {}, phase="checkpoint"):   # a worker may die while writing its shard, too
            path = self.checkpointer.save(step, self.trained, state)
        tqdm.write(f"[openrlaif] resumable checkpoint: {path}")

    @contextmanager
    def step(self, step: int, metrics: dict[str, float], phase: str | None = None):
        """Around one step (or its checkpoint): if a worker process died, stop with which role, which phase
        (`phase`, else the last one timed in `metrics`), and how to resume."""
        try:
            with stop_on_non_finite(step, self.checkpointer):
                yield
        except KeyboardInterrupt:
            raise RunError(f"interrupted during step {step} (Ctrl-C). {resume_hint(self.checkpointer)}") from None
        except ray.exceptions.RayError as err:
            dead = dead_workers(self.roles.groups())
            if not dead:
                raise
            phases = [key[len("time/"):-len("_s")] for key in metrics if key.startswith("time/")]
            raise role_died(dead, err, phase or (phases[-1] if phases else "first"), step, self.checkpointer) from err


# ----------------------------------------------------------------------------------------------------------- set-up

def calibrate_references(roles: Roles, run: RunInputs, cfg: Config) -> dict[str, float]:
    """Before the first update: `feedback.reference_samples` responses per prompt from the starting policy,
    scored by every objective; each keeps its per-prompt quantile as r_ref(x) for the LSC transform."""
    sampling = replace(cfg.rollout, samples_per_prompt=cfg.feedback.reference_samples)
    batch = generate(roles, run.prompts, replace(cfg, rollout=sampling), run.tokenizer, seed=cfg.seed * 10_000)
    return roles.feedback.calibrate(batch.meta["prompt"], batch.meta["response"], group_ids=batch["group_ids"].tolist(),
                                    conversations=batch.meta["conversation"])


# ----------------------------------------------------------------------------------------------------------- phases

def score(roles: Roles, batch: Batch, per_turn: bool = False, compares: bool = False) -> FeedbackResult:
    """The feedback phase: `score_batch` with the run's feedback (and, with feedback.per_turn, `score_turns`),
    each failure kind reported."""
    result = score_batch(roles.feedback, batch)
    if per_turn:
        result = score_turns(roles.feedback, batch, result, compares)
    return report_failures(result)


def informative_groups(batch: Batch, feedback: FeedbackResult) -> list[int]:
    """The groups (in order) with at least two valid samples whose rewards are not all equal."""
    rewards: dict[int, list[float]] = {}
    for row, group in enumerate(batch["group_ids"].tolist()):
        if feedback.valid[row]:
            rewards.setdefault(group, []).append(float(feedback.rewards[row]))
    return [group for group, values in rewards.items() if len(values) >= 2 and max(values) - min(values) > 1e-9]


def refill_informative(roles: Roles, run: RunInputs, stream: PromptStream, cfg: Config, step: int, batch: Batch,
                       feedback: FeedbackResult, metrics: dict[str, float]) -> tuple[Batch, FeedbackResult]:
    """DAPO's dynamic sampling (Yu et al. 2025, eq. 11): a group whose rewards are all equal has zero advantage
    under a group baseline and teaches nothing. While fewer than data.prompts_per_step groups are informative,
    sample and score data.prompts_per_step more prompts (at most algorithm.max_resample_rounds rounds); keep the
    first prompts_per_step informative groups, filling up with dropped ones if the rounds ran out (they weigh
    nothing), so every step trains on the same number of samples. The feedback/* metrics describe the first
    batch. Logged: rollout/resample_rounds, rollout/informative_groups (before refilling), rollout/dropped_groups."""
    needed = cfg.data.prompts_per_step
    batches, results = [batch], [feedback]
    found = informative_groups(batch, feedback)
    metrics["rollout/informative_groups"] = float(len(found))
    rounds = 0
    while len(found) < needed and rounds < cfg.algorithm.max_resample_rounds:
        rounds += 1
        seed = 10**8 + (cfg.seed * 10_000 + step) * 16 + rounds   # apart from every step's own seed
        extra = collect_rollout(launch_rollout(roles, stream.next_batch(), cfg, seed), run.tokenizer)
        extra["group_ids"] = extra["group_ids"] + int(batches[-1]["group_ids"].max()) + 1
        result = score(roles, extra, compares=compares(cfg.feedback))
        batches.append(extra)
        results.append(result)
        found += informative_groups(extra, result)
    merged = concat_rollouts(batches, run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None
                             else run.tokenizer.eos_token_id)
    groups = merged["group_ids"].tolist()
    kept = found[:needed]
    kept += [g for g in dict.fromkeys(groups) if g not in set(kept)][:needed - len(kept)]
    rows = [row for row, group in enumerate(groups) if group in set(kept)]
    metrics["rollout/resample_rounds"] = float(rounds)
    metrics["rollout/dropped_groups"] = float(len(set(groups)) - len(kept))
    failures = sum((r.failures for r in results), Counter())
    merged_result = FeedbackResult(torch.cat([r.rewards for r in results])[rows],
                                   torch.cat([r.valid for r in results])[rows], failures, results[0].metrics,
                                   {g: c for r in results for g, c in r.consistency.items() if g in set(kept)},
                                   {k: v for r in reversed(results) for k, v in r.details.items()})
    return merged.select(rows), merged_result


def compares(feedback_cfg) -> bool:
    """The feedback compares the samples of a group (a pairwise or listwise judge) rather than scoring each."""
    return feedback_cfg.source == "judge" and feedback_cfg.judge.mode != "pointwise"


def score_turns(feedback: Feedback, batch: Batch, result: FeedbackResult, compares: bool = False) -> FeedbackResult:
    """feedback.per_turn: every assistant turn but an episode's last is scored too, as the episode up to and
    including that turn (the last turn's reward is the whole trajectory's, `result`). The turns k of one rollout
    group form a group of their own, so a pairwise or listwise judge compares turn k with turn k; a turn that only
    one episode of its group reached is not shown to such a judge (no reward: its group advantage is 0).
    feedback.source=env takes the reward the environment gave with the turn's observation (None: 0). A failed
    verdict masks its sample, as a failed trajectory verdict does. Writes batch["turn_rewards"], ["turn_scored"]
    (B, K) and ["turn_of_token"] (B, T: the turn of each policy token, -1 for observation tokens)."""
    from openrlaif.rollout.multi_turn import turn_prefixes
    prefixes = turn_prefixes(batch)
    mask = batch["response_mask"]
    size, most = len(batch), 1 + max(len(p) for p in prefixes)
    rewards, scored = torch.zeros(size, most), torch.zeros(size, most, dtype=torch.bool)
    runs = ((mask > 0) & (torch.nn.functional.pad(mask, (1, 0))[:, :-1] == 0)).long().cumsum(-1) - 1
    turn_of_token = torch.where(mask > 0, runs, torch.full_like(runs, -1))
    for row, turns in enumerate(prefixes):
        rewards[row, len(turns)], scored[row, len(turns)] = result.rewards[row], result.valid[row]
        if not turns:   # scored once, as a whole
            turn_of_token[row] = torch.where(mask[row] > 0, 0, -1)
    groups = batch["group_ids"].tolist()
    asked = [(row, k) for row, turns in enumerate(prefixes) for k in range(len(turns))]
    if compares:   # a judge that compares needs two turns k of the group
        members = Counter((groups[row], k) for row, k in asked)
        asked = [(row, k) for row, k in asked if members[(groups[row], k)] > 1]
    if asked:
        turn_group = {key: max(groups) + 1 + i
                      for i, key in enumerate(dict.fromkeys((groups[row], k) for row, k in asked))}
        extra = {}
        if isinstance(feedback, EnvReward):
            extra = {"env_rewards": [prefixes[row][k][2] or 0.0 for row, k in asked]}
        part = feedback.score([batch.meta["prompt"][row] for row, _ in asked],
                              [prefixes[row][k][1] for row, k in asked],
                              group_ids=[turn_group[(groups[row], k)] for row, k in asked],
                              conversations=[batch.meta["conversation"][row] for row, _ in asked], **extra)
        for (row, k), reward, ok in zip(asked, part.rewards.tolist(), part.valid.tolist()):
            rewards[row, k], scored[row, k] = reward, ok
            if not ok:
                result.valid[row] = False
        result.failures.update(part.failures)
        for kind, detail in part.details.items():
            result.details.setdefault(kind, detail)
        for key in ("judge_prompt_tokens", "judge_generated_tokens"):   # the judge's cost counts every turn
            if key in part.metrics:
                result.metrics[key] = result.metrics.get(key, 0.0) + part.metrics[key]
        turn_scores = part.rewards[part.valid]
        result.metrics["turn_reward_mean"] = float(turn_scores.mean()) if len(turn_scores) else float("nan")
    result.metrics["turns_scored"] = float(len(asked))
    batch["turn_rewards"], batch["turn_scored"], batch["turn_of_token"] = rewards, scored, turn_of_token
    return result


def score_batch(feedback: Feedback, batch: Batch) -> FeedbackResult:
    """Rewards for the samples, with their rollout groups (a pairwise or listwise judge compares within a group,
    never across two groups of the same prompt text) and conversations (a judge sees every turn). Greedy baselines
    (ReMax), when there are any, are scored in the same call, each in its sample's group; a sample whose baseline
    verdict failed is masked too: its advantage would be undefined. Episodes whose environment raised are masked."""
    prompts, responses = batch.meta["prompt"], batch.meta["response"]
    groups, conversations = batch["group_ids"].tolist(), batch.meta.get("conversation")
    own = isinstance(feedback, EnvReward)   # feedback.source=env: each episode's own reward
    if "baseline_response" not in batch.meta:
        extra = {"env_rewards": batch.meta["env_reward"]} if own else {}
        return mask_env_errors(batch, feedback.score(prompts, responses, group_ids=groups,
                                                     conversations=conversations, **extra))
    first = {group: row for row, group in reversed(list(enumerate(groups)))}   # one baseline per prompt
    rows = sorted(first.values())
    extra = {"env_rewards": batch.meta["env_reward"] + [batch.meta["baseline_env_reward"][r] for r in rows]} if own \
        else {}
    result = feedback.score(prompts + [prompts[r] for r in rows],
                            responses + [batch.meta["baseline_response"][r] for r in rows],
                            group_ids=groups + [groups[r] for r in rows],
                            conversations=conversations + [conversations[r] for r in rows] if conversations
                            else None, **extra)
    size = len(batch)
    baseline_of = {groups[r]: size + k for k, r in enumerate(rows)}
    index = torch.tensor([baseline_of[g] for g in groups])
    batch["baseline_rewards"] = result.rewards[index]
    return mask_env_errors(batch, FeedbackResult(result.rewards[:size], result.valid[:size] & result.valid[index],
                                                 result.failures, result.metrics, result.consistency, result.details))


def mask_env_errors(batch: Batch, result: FeedbackResult) -> FeedbackResult:
    """Episodes whose environment raised are masked whatever their score, counted as `env_error` with the first
    one's words."""
    errors = batch.meta.get("env_error") or []
    failed = torch.tensor([bool(error) for error in errors], dtype=torch.bool)
    if not failed.any():
        return result
    result.valid = result.valid & ~failed
    result.failures["env_error"] += int(failed.sum())
    result.details.setdefault("env_error", next(error for error in errors if error))
    return result


def report_failures(result: FeedbackResult) -> FeedbackResult:
    """One line per failure kind this step, with the first failure's own words (connection refused, the
    function's error, ...): a run whose verdicts fail says why, not only how many."""
    for kind, count in sorted(result.failures.items()):
        detail = result.details.get(kind)
        tqdm.write(f"[openrlaif] feedback failed for {count} sample(s): {kind}" + (f": {detail}" if detail else ""))
    return result


def shaped_rewards(batch: Batch, feedback: FeedbackResult, cfg: Config,
                   metrics: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, sample mask): the feedback's, with DAPO's overlong shaping when asked (algorithm.overlong_buffer:
    a soft length penalty added; mask_truncated: samples cut off at max_new_tokens carry no loss)."""
    rewards, mask = feedback.rewards, feedback.valid.float()
    algo = cfg.algorithm
    if algo.overlong_buffer:
        penalty = overlong_penalty(batch["response_mask"].sum(-1), cfg.rollout.max_new_tokens, algo.overlong_buffer,
                                   algo.overlong_penalty)
        rewards = rewards + penalty * feedback.valid   # a failed verdict stays masked, unpenalised
        metrics["reward/overlong_penalty_mean"] = float(penalty.mean())
    if algo.mask_truncated:
        truncated = ~batch["finished"]
        mask = mask * (~truncated).float()
        metrics["reward/truncated_masked"] = float(truncated.sum())
        if bool(truncated.all()):   # nothing left to learn from: say so rather than train on nothing quietly
            tqdm.write("[openrlaif] every sample ran to rollout.max_new_tokens, and algorithm.mask_truncated=true "
                       "masks them all: this step learns nothing. Fix: raise rollout.max_new_tokens, or "
                       "algorithm.mask_truncated=false.")
    return rewards, mask


def compute_advantages(batch: Batch, valid: torch.Tensor, cfg: Config) -> torch.Tensor:
    algo = cfg.algorithm
    kl = None
    if algo.kl_in_reward:   # per-token KL of the sampling policy to the reference, a penalty in the reward
        kl = KL_ESTIMATORS[algo.kl_estimator](batch["old_logprobs"], batch["ref_logprobs"]) * batch["response_mask"]
    inputs = dict(group_ids=batch["group_ids"], valid=valid, token_mask=batch["response_mask"], kl=kl,
                  kl_coef=algo.kl_coef, normalize_std=algo.normalize_std, gamma=algo.gamma, lam=algo.lam,
                  baseline_rewards=batch["baseline_rewards"] if "baseline_rewards" in batch else None,
                  values=batch["values"] if "values" in batch else None)
    if "turn_rewards" in batch:   # feedback.per_turn: a reward on each turn's last token
        out = turn_advantages(algo.advantage, batch["turn_rewards"], batch["turn_scored"], batch["turn_of_token"],
                              **inputs)
    else:
        out = ADVANTAGE_ESTIMATORS[algo.advantage](rewards=batch["rewards"], **inputs)
    if algo.advantage in CRITIC:
        out, batch["returns"] = out
    if algo.distill_coef > 0:   # on-policy distillation: the teacher's per-token term on top
        out = distillation_advantages(out, batch["old_logprobs"], batch["teacher_logprobs"], batch["response_mask"],
                                      algo.distill_coef)
    return out


def distill_metrics(batch: Batch) -> dict[str, float]:
    """The student's reverse KL to the teacher on its own samples, Σ_t log π_old − log π_teacher per response
    (mean over the unmasked samples), and per token."""
    mask = batch["response_mask"] * batch["sample_mask"].unsqueeze(-1)
    gap = (batch["old_logprobs"] - batch["teacher_logprobs"]) * mask
    samples = float((batch["sample_mask"] > 0).sum())
    return {"distill/reverse_kl": float(gap.sum()) / max(samples, 1.0),
            "distill/reverse_kl_per_token": float(gap.sum()) / max(float(mask.sum()), 1.0),
            **({"distill/teacher_failures": float(batch.meta["teacher_failures"])}
               if "teacher_failures" in batch.meta else {})}


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
    elif reference_from_actor(cfg) and cfg.algorithm.kl_coef > 0:   # LoRA: the actor's base model, adapters off
        ref_refs = roles.actor.map(lambda w, shard: w.reference_logprobs.remote(shard),
                                   model_inputs.split(len(roles.actor)))
    old_refs = []
    # KL in the reward and distillation's per-token term need log π_old before the update
    if not on_policy(cfg) or cfg.algorithm.kl_in_reward or cfg.algorithm.distill_coef > 0:
        old_refs = roles.actor.map(lambda w, shard: w.logprobs.remote(shard), model_inputs.split(len(roles.actor)))
    value_refs = []
    if roles.critic is not None:
        value_refs = roles.critic.map(lambda w, shard: w.values.remote(shard), model_inputs.split(len(roles.critic)))
    teacher_refs = []
    if getattr(roles, "teacher", None) is not None:   # on-policy distillation: the teacher scores the samples
        teacher_refs = roles.teacher.map(lambda w, shard: w.logprobs.remote(shard),
                                         model_inputs.split(min(len(roles.teacher), len(batch))))
    endpoint = None
    if getattr(roles, "teacher_client", None) is not None:   # an endpoint teacher, asked while the workers run
        endpoint = roles.teacher_client.logprobs(model_inputs)
    results = iter(ray.get(ref_refs + old_refs + value_refs + teacher_refs))
    for key, refs in (("ref_logprobs", ref_refs), ("old_logprobs", old_refs), ("values", value_refs),
                      ("teacher_logprobs", teacher_refs)):
        if refs:
            batch[key] = torch.cat([next(results) for _ in refs])
    if endpoint is not None:   # a sample the endpoint could not score carries no loss
        batch["teacher_logprobs"], valid, error = endpoint
        batch["sample_mask"] = batch["sample_mask"] * valid.float()
        batch.meta["teacher_failures"] = int((~valid).sum())
        if error:
            tqdm.write(f"[openrlaif] the teacher endpoint failed for {int((~valid).sum())} sample(s): {error}")


def update_actor(roles: Roles, batch: Batch, cfg: Config) -> dict[str, float]:
    fields = ["input_ids", "attention_mask", "response_mask", "sample_mask", "advantages"]
    fields += [k for k in ("ref_logprobs", "old_logprobs") if k in batch]
    if cfg.rollout.async_steps:            # behaviour-policy log-probs for the importance weights
        fields.append("rollout_logprobs")
    train_batch = Batch({k: batch[k] for k in fields})
    if not cfg.rollout.async_steps and "rollout_logprobs" in batch:   # the trainer-engine gap: measured, and
        # corrected (algorithm.mismatch) where the engine's raw log-probs are the sampling distribution's
        comparable = cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0
        corrected = comparable and cfg.algorithm.mismatch != "none"
        train_batch["behaviour_logprobs" if corrected else "engine_logprobs"] = batch["rollout_logprobs"]
    actor_refs = roles.actor.map(lambda w, shard: w.train_step.remote(shard), train_batch.split(len(roles.actor)))
    critic_refs = []
    if roles.critic is not None:   # the critic trains on the same samples at the same time
        critic_batch = Batch({k: batch[k] for k in ("input_ids", "attention_mask", "response_mask", "sample_mask",
                                                    "values", "returns")})
        critic_refs = roles.critic.map(lambda w, shard: w.train_step.remote(shard),
                                       critic_batch.split(len(roles.critic)))
    results = ray.get(actor_refs + critic_refs)
    per_rank = results[:len(actor_refs)]
    total = {key: sum(r[key] for r in per_rank) for key in per_rank[0]}
    total["seconds"] = max(r["seconds"] for r in per_rank)
    total["grad_norm"] = per_rank[0]["grad_norm"]
    total["mismatch_max"] = max(r["mismatch_max"] for r in per_rank)
    if critic_refs:
        critic = results[len(actor_refs):]
        total["critic/value_loss"] = sum(r["value_loss"] for r in critic)
        total["critic/clip_fraction"] = (sum(r["value_clip_x_tokens"] for r in critic)
                                         / max(sum(r["valid_tokens"] for r in critic), 1.0))
        total["critic/grad_norm"] = critic[0]["grad_norm"]
    return total


def step_metrics(batch: Batch, feedback, train: dict[str, float], times: dict[str, float]) -> dict[str, float]:
    response_tokens = float(batch["response_mask"].sum())
    all_tokens = float(batch["attention_mask"].sum())
    out = {
        "response/length_mean": response_tokens / len(batch),
        "response/finished_fraction": float(batch["finished"].float().mean()),
        "train/loss": train["loss"], "train/policy_loss": train["policy_loss"], "train/kl": train["kl"],
        # means over the tokens they were summed over: the response tokens of unmasked samples
        "train/clip_fraction": train["clip_fraction_x_tokens"] / max(train["valid_tokens"], 1.0),
        "train/ratio_mean": train["ratio_x_tokens"] / max(train["valid_tokens"], 1.0),
        **({"train/is_weight_mean": train["is_weight_x_tokens"] / max(train["valid_tokens"], 1.0),
            "train/is_truncated_fraction": train["is_truncated_x_tokens"] / max(train["valid_tokens"], 1.0)}
           if train.get("is_weight_x_tokens") else {}),
        **({"train/mis_dropped_fraction": train["mis_dropped"] / train["behaviour_sequences"]}
           if train.get("behaviour_sequences") else {}),
        **({"train/behaviour_kl": train["behaviour_kl_x_tokens"] / max(train["valid_tokens"], 1.0)}
           if train.get("is_weight_x_tokens") or train.get("behaviour_sequences") else {}),
        "train/grad_norm": train["grad_norm"],
        **({"rollout/logprob_mismatch_mean": train["mismatch_abs_x_tokens"] / train["mismatch_tokens"],
            "rollout/logprob_mismatch_max": train["mismatch_max"],
            "rollout/logprob_mismatch_k3": train["mismatch_k3_x_tokens"] / train["mismatch_tokens"]}
           if train.get("mismatch_tokens") else {}),
        "throughput/rollout_tokens_per_s": response_tokens / max(times["time/rollout_s"], 1e-9),
        "throughput/logprobs_tokens_per_s": all_tokens / max(times["time/logprobs_s"], 1e-9),
        "throughput/update_tokens_per_s": train["tokens"] / max(times["time/update_s"], 1e-9),
    }
    if "entropy" in train:   # computed only when algorithm.entropy_coef > 0
        out["train/entropy"] = train["entropy"]
    if "values" in batch:    # PPO: the critic's fit to the GAE returns, before this step's update
        mask = batch["response_mask"] * batch["sample_mask"].unsqueeze(-1) > 0
        values, returns = batch["values"][mask], batch["returns"][mask]
        out["critic/values_mean"] = float(values.mean()) if len(values) else float("nan")
        out["critic/explained_variance"] = float(1 - (returns - values).var() / returns.var().clamp(min=1e-8))
        out |= {key: value for key, value in train.items() if key.startswith("critic/")}
    return out | feedback_metrics(feedback, response_tokens, times["time/feedback_s"])


# ----------------------------------------------------------------------------------------------------------- checks

def validate(cfg: Config) -> None:
    """pipeline=online_rl's own checks (config.validate runs them after the shared ones)."""
    algo = cfg.algorithm
    check_choice("algorithm.advantage", algo.advantage, ADVANTAGE_ESTIMATORS)
    check_choice("algorithm.policy_loss", algo.policy_loss, POLICY_LOSSES)
    check_choice("algorithm.kl_estimator", algo.kl_estimator, KL_ESTIMATORS)
    check_choice("algorithm.loss_agg", algo.loss_agg, LOSS_AGGREGATIONS)
    if algo.dual_clip is not None and algo.dual_clip <= 1:
        raise ConfigError(f"algorithm.dual_clip={algo.dual_clip} must be > 1 (the paper uses 3), or null.")
    if algo.kl_in_reward and algo.advantage not in TOKEN_LEVEL:
        raise ConfigError(f"algorithm.kl_in_reward=true needs a token-level estimator ({', '.join(sorted(TOKEN_LEVEL))}"
                          f"); algorithm.advantage={algo.advantage} uses one reward per sequence. Fix: "
                          "algorithm.kl_in_reward=false (KL in the loss) or algorithm=reinforce_pp.")
    if algo.kl_estimator == "k1" and algo.kl_coef > 0 and not algo.kl_in_reward:
        # ∇(log π − log π_ref) = ∇log π, whose expectation under π is 0: k1 in the loss regularises nothing.
        raise ConfigError("algorithm.kl_estimator=k1 in the loss has zero expected gradient (E[∇log π] = 0), so "
                          "the run would have no KL regularisation at all. Fix: algorithm.kl_estimator=k3 (GRPO's) "
                          "or k2 (its gradient is that of KL(π‖π_ref)) for the KL in the loss, or "
                          "algorithm.kl_in_reward=true to use k1 as a per-token reward penalty (REINFORCE++, PPO).")
    if algo.clip_eps_high is not None and algo.clip_eps_high < 0:
        raise ConfigError(f"algorithm.clip_eps_high={algo.clip_eps_high} must be >= 0, or null.")
    check_positive("algorithm.entropy_coef", algo.entropy_coef, allow_zero=True)
    check_positive("algorithm.distill_coef", algo.distill_coef, allow_zero=True)
    if algo.distill_coef > 0:
        teacher = cfg.teacher
        if not teacher.model and not teacher.base_url:
            raise ConfigError(f"algorithm.distill_coef={algo.distill_coef} distils a teacher into the policy, but "
                              "teacher.model is unset. Fix: teacher.model=<an HF folder or short name> that shares "
                              "the policy's tokenizer (or teacher.base_url=<endpoint>), or algorithm.distill_coef=0.")
        check_positive("teacher.micro_batch_size", teacher.micro_batch_size)
        if teacher.base_url:
            if not teacher.base_url.startswith(("http://", "https://")):
                raise ConfigError(f"teacher.base_url={teacher.base_url!r} must be an http(s) URL, e.g. "
                                  "http://127.0.0.1:8000/v1.")
            if cfg.rollout.temperature != 1.0:
                raise ConfigError(f"teacher.base_url: an endpoint gives untempered log-probs, but "
                                  f"rollout.temperature={cfg.rollout.temperature} scores the student at that "
                                  "temperature. Fix: rollout.temperature=1.0, or a local teacher (teacher.model).")
            check_positive("teacher.timeout_s", teacher.timeout_s)
            check_positive("teacher.max_retries", teacher.max_retries, allow_zero=True)
            check_positive("teacher.concurrency", teacher.concurrency)
        if cfg.feedback.per_turn or algo.advantage in GREEDY_BASELINE:
            raise ConfigError("algorithm.distill_coef > 0 adds the teacher's per-token term to the advantages; with "
                              "feedback.per_turn or a greedy baseline (ReMax) it is not built. Fix: turn one off.")
    elif cfg.teacher.model or cfg.teacher.base_url:
        raise ConfigError(f"teacher.model={cfg.teacher.model!r} / teacher.base_url={cfg.teacher.base_url!r} are read "
                          "only with algorithm.distill_coef > 0 (algorithm=distill). Fix: algorithm=distill, or "
                          "leave them unset.")
    check_positive("algorithm.kl_coef", algo.kl_coef, allow_zero=True)
    if not 0 < algo.clip_eps <= 1:
        raise ConfigError(f"algorithm.clip_eps={algo.clip_eps} must be in (0, 1]: the ratio is clipped to "
                          "[1 − ε, 1 + ε] (PPO's 0.2; 1 = no lower bound, as CISPO).")
    check_choice("algorithm.mismatch", algo.mismatch, {"tis", "mis", "none"})
    if algo.dynamic_sampling:
        check_positive("algorithm.max_resample_rounds", algo.max_resample_rounds)
        if algo.advantage not in GROUP_BASELINES:
            raise ConfigError(f"algorithm.dynamic_sampling=true drops groups whose rewards are all equal, which carry "
                              f"no signal under a group baseline; algorithm.advantage={algo.advantage} has none. "
                              f"Fix: one of {sorted(GROUP_BASELINES)}, or dynamic_sampling=false.")
        if cfg.rollout.async_steps or cfg.env.name or cfg.feedback.per_turn:
            raise ConfigError("algorithm.dynamic_sampling=true samples more prompts within a step; it is for "
                              "single-turn, synchronous runs (rollout.async_steps=0, no env.*, feedback.per_turn="
                              "false). Fix: turn one of them off.")
    if not 0 < algo.mis_low < 1 < algo.mis_high:
        raise ConfigError(f"algorithm.mis_low={algo.mis_low} and mis_high={algo.mis_high} must bracket 1 "
                          "(0 < mis_low < 1 < mis_high): the band of geometric-mean ratios a sequence keeps.")
    check_positive("algorithm.overlong_buffer", algo.overlong_buffer, allow_zero=True)
    check_positive("algorithm.overlong_penalty", algo.overlong_penalty, allow_zero=True)
    if algo.overlong_buffer >= cfg.rollout.max_new_tokens:
        raise ConfigError(f"algorithm.overlong_buffer={algo.overlong_buffer} must be below rollout.max_new_tokens="
                          f"{cfg.rollout.max_new_tokens}: the penalty ramps over the last overlong_buffer tokens "
                          "before it (DAPO: 4096 of 20480). Fix: a smaller buffer, or 0 to turn it off.")
    if (algo.overlong_buffer or algo.mask_truncated) and (cfg.env.name or cfg.feedback.per_turn):
        raise ConfigError("algorithm.overlong_buffer / mask_truncated measure one response against "
                          "rollout.max_new_tokens; an episode (env.*) or per-turn rewards have several. Fix: turn "
                          "them off for multi-turn runs.")
    if cfg.rollout.samples_per_prompt < 2 and algo.advantage in GROUP_BASELINES:
        raise ConfigError(f"rollout.samples_per_prompt={cfg.rollout.samples_per_prompt}: "
                          f"{algo.advantage} needs a group of at least 2 samples per prompt to form its "
                          "baseline. Fix: rollout.samples_per_prompt=4")
    what = "data.prompts_per_step × rollout.samples_per_prompt"
    validate_trained("actor", cfg.actor, step_batch_size(cfg), what)
    if algo.advantage in CRITIC:
        validate_trained("critic", cfg.critic, step_batch_size(cfg), what)
        if not (0 <= algo.gamma <= 1 and 0 <= algo.lam <= 1):
            raise ConfigError(f"algorithm.gamma={algo.gamma} and algorithm.lam={algo.lam} must be in [0, 1].")
        if cfg.critic.value_clip is not None and cfg.critic.value_clip <= 0:
            raise ConfigError(f"critic.value_clip={cfg.critic.value_clip} must be > 0, or null to turn it off.")
    validate_feedback_source(cfg)
    if cfg.env.name:
        validate_env(cfg)


def validate_env(cfg: Config) -> None:
    """env.*: the environment (or agent function) loads and takes its kwargs; budgets are positive; what multi-turn
    does not do yet."""
    from openrlaif.envs import make_env
    if cfg.env.name == "agent":
        validate_agent(cfg)
    else:
        make_env(cfg.env.name, cfg.env.kwargs)
        if cfg.env.agent:
            raise ConfigError(f"env.agent={cfg.env.agent!r} is called only with env.name=agent (here env.name="
                              f"{cfg.env.name!r}). Fix: env=agent, or env.agent=''.")
    check_positive("env.max_turns", cfg.env.max_turns)
    check_positive("env.max_total_tokens", cfg.env.max_total_tokens)
    validate_user_sim(cfg)
    fb = cfg.feedback
    if fb.source == "env" and (fb.extra_functions or fb.transform != "none" or fb.cascade.source):
        raise ConfigError("feedback.source=env is the episodes' own reward; feedback.extra_functions, "
                          "feedback.transform and feedback.cascade combine other sources and do not take it yet. "
                          "Fix: leave them unset.")
    if fb.per_turn:
        algo = cfg.algorithm.advantage
        if algo not in TOKEN_LEVEL | GROUP_BASELINES:
            raise ConfigError(f"feedback.per_turn=true: algorithm.advantage={algo} has no per-turn form (ReMax's "
                              "greedy baseline is one episode's reward). Fix: algorithm=grpo (or rloo, dr_grpo, "
                              "reinforce_pp, ppo), or feedback.per_turn=false.")
        if algo in TOKEN_LEVEL and compares(fb):
            raise ConfigError(f"feedback.per_turn=true with a {fb.judge.mode} judge and algorithm.advantage={algo}: "
                              "a turn that only one episode of its group reached has nobody to be compared with, "
                              "so it would have no reward, which a token-level return cannot do without. Fix: "
                              "feedback.judge.mode=pointwise, or algorithm=grpo (a lone turn's advantage is 0).")
        if fb.transform != "none" or fb.cascade.source:
            raise ConfigError("feedback.per_turn=true: feedback.transform and feedback.cascade calibrate and route "
                              "whole trajectories and do not score turns yet. Fix: leave them unset.")


def validate_user_sim(cfg: Config) -> None:
    """env=simulated_user: the user is a local model (env.user_sim.model) or an endpoint (env.kwargs.base_url),
    one of the two."""
    from openrlaif.config import _needs_vllm
    user, base_url = cfg.env.user_sim, cfg.env.kwargs.get("base_url", "")
    if cfg.env.name != "simulated_user":
        if user.model:
            raise ConfigError(f"env.user_sim.model={user.model!r} plays the user of env=simulated_user (here env.name"
                              f"={cfg.env.name!r}). Fix: env=simulated_user, or env.user_sim.model=''.")
        return
    if not user.model and not base_url:
        raise ConfigError("env=simulated_user needs env.kwargs.base_url (the OpenAI-compatible endpoint of the model "
                          "that plays the user) or env.user_sim.model (a local model in a group of its own). Fix: "
                          "env.kwargs.base_url=http://127.0.0.1:8000/v1, or env.user_sim.model=smollm2-135m-instruct.")
    if user.model and base_url:
        raise ConfigError(f"env.user_sim.model={user.model!r} and env.kwargs.base_url={base_url!r} both name the "
                          "user's model. Fix: keep one (env.kwargs.base_url='' for the local model).")
    if user.model:
        check_choice("env.user_sim.engine", user.engine, {"", "vllm", "hf"})
        if (user.engine or cfg.rollout.engine) == "vllm":
            _needs_vllm("env.user_sim.engine" if user.engine else "rollout.engine (which env.user_sim follows)")
        for key in ("max_prompt_tokens", "micro_batch_size", "kv_cache_gib"):
            check_positive(f"env.user_sim.{key}", getattr(user, key))


def validate_agent(cfg: Config) -> None:
    """env=agent: a callable agent_fn(client, row); sampling stays the rollout's own, step by step."""
    from openrlaif.feedback.rules import load_function
    if ":" not in cfg.env.agent:
        raise ConfigError(f"env.name=agent needs env.agent='package.module:function' (got {cfg.env.agent!r}), a "
                          "function agent_fn(client, row) -> reward or None. Fix: env.agent=my_pkg.agents:solve")
    try:
        load_function(cfg.env.agent)
    except ConfigError as err:
        raise ConfigError(str(err).replace("feedback.function", "env.agent")) from None
    if cfg.algorithm.advantage in GREEDY_BASELINE:
        raise ConfigError("env.name=agent: an agent makes its own requests, so there is no greedy baseline episode "
                          "(ReMax) to play beside it. Fix: algorithm=grpo (or rloo, reinforce_pp, ppo).")

