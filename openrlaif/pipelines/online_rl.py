"""Online RL with AI, reward-model or rule feedback (GRPO family, REINFORCE++, ReMax, PPO with a critic).
`train()` is the loop; the helpers below it do one phase each."""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import ray
import torch
from tqdm import tqdm

from openrlaif.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS
from openrlaif.algorithms.advantages import CRITIC, GREEDY_BASELINE
from openrlaif.batch import Batch, split_evenly
from openrlaif.checkpointing import (Checkpointer, RunError, dead_workers, non_finite_stop, resume_hint,
                                     role_died, stop_on_non_finite, truncate_metrics)
from openrlaif.config import Config, RoleResources, cache_dir, judge_engine, step_batch_size
from openrlaif.data import PromptStream, load_prompts
from openrlaif.feedback import Feedback, FeedbackResult
from openrlaif.metrics import MetricsLogger, summary_line, timer
from openrlaif.models import resolve_model_path
from openrlaif.rollout.collate import completions_to_batch
from openrlaif.rollout.types import SamplingSpec
from openrlaif.pipelines.evaluation import InLoopEval
from openrlaif.pipelines.common import (finish, load_tokenizer, prepare_output_dir, save_checkpoint,
                                        start_actor, start_rollout, start_trainer, threads_per_worker)
from openrlaif.runtime import ray_session
from openrlaif.workers.group import SharedPlacement, WorkerGroup, check_cluster_fits, colocated_plan, reserved_cpus


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
            checkpoint = save_checkpoint(roles.actor, run.out_dir, run.model_path)
            if roles.critic is not None:
                save_checkpoint(roles.critic, run.out_dir, run.model_path, name="critic")
    return checkpoint, metrics, logger.path


def one_step(cfg: Config, run: RunInputs, roles: Roles, stream: PromptStream, step: int,
             metrics: dict[str, float]) -> None:
    with timer(metrics, "rollout"):        # 1. sample a group of responses per prompt (or take the prefetched group)
        batch = next_rollout(roles, stream, cfg, run.tokenizer, step, metrics)
    with timer(metrics, "feedback"):       # 2. judge / rule -> rewards; failed verdicts mask their sample
        feedback = score(roles, batch)
        batch["rewards"], batch["sample_mask"] = feedback.rewards, feedback.valid.float()
    with timer(metrics, "logprobs"):       # 3. reference (and old-policy) log-probs, critic values, together
        add_logprobs(roles, batch, cfg)
    with timer(metrics, "advantage"):      # 4. advantages (group baselines, KL-shaped returns), on the driver
        batch["advantages"] = compute_advantages(batch, feedback.valid, cfg)
    with timer(metrics, "update"):         # 5. DeepSpeed updates of the actor (and critic), side by side
        train_metrics = update_actor(roles, batch, cfg)
    with timer(metrics, "sync"):           # 6. push the new weights into the rollout engines
        metrics["sync/engine_s"] = sync_weights(roles, cfg, step)
    metrics |= step_metrics(batch, feedback, train_metrics, metrics)


class FailedSteps:
    """Counts consecutive steps in which every sample's feedback failed; at `limit` the run stops (RunError, exit 1,
    no final checkpoint): it would exit 0 having learned nothing."""

    def __init__(self, limit: int) -> None:
        self.limit, self.run = limit, 0

    def count(self, step: int, metrics: dict[str, float], checkpointer: Checkpointer | None = None) -> None:
        kinds = {key for key in metrics if key.startswith("feedback/failures/")}
        # a strict pairwise consistency filter that kept nothing is the user's setting working, not a failure
        filtered = kinds == {"feedback/failures/no_kept_comparison"} and not any(
            key.startswith("feedback/comparison_failures/") for key in metrics)
        self.run = self.run + 1 if metrics.get("feedback/failure_rate") == 1.0 and not filtered else 0
        if not self.limit or self.run < self.limit:
            return
        kinds = ", ".join(f"{key.rsplit('/', 1)[-1]} ×{int(value)}" for key, value in sorted(metrics.items())
                          if key.startswith("feedback/failures/"))
        raise RunError(f"step {step}: every sample's feedback failed in each of the last {self.run} steps ({kinds}; "
                       "the lines above give each kind's cause), so the run learned nothing from them. It stopped "
                       f"without writing a final checkpoint. {resume_hint(checkpointer)} Fix: what the failures "
                       "name (the judge endpoint, the judge model, the reward function), or "
                       "feedback.max_failed_steps=0 to go on regardless.")


class Progress:
    """Resumable checkpoints (output.checkpoint_every, resume=true) and dead-worker reports of an online loop."""

    def __init__(self, cfg: Config, run: RunInputs, roles: Roles, stream: PromptStream) -> None:
        self.cfg, self.run, self.roles, self.stream = cfg, run, roles, stream
        self.checkpointer = Checkpointer(run.out_dir, cfg.output.checkpoint_every, cfg.output.keep_last)
        self.trained = {"actor": roles.actor} | ({"critic": roles.critic} if roles.critic is not None else {})

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
        # a prefetched batch (one-step-off) is not trained yet: a resume samples it again
        prefetched = self.cfg.data.prompts_per_step if self.roles.pending_rollout is not None else 0
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


# ---------------------------------------------------------------------------------------------------- set-up

@dataclass
class RunInputs:
    out_dir: str
    model_path: str
    judge_path: str | None
    critic_path: str | None
    reward_model_path: str | None
    tokenizer: object
    prompts: list
    plan: dict[str, RoleResources]
    cpus_needed: float
    eval: object | None = None         # evaluation.EvalInputs when eval.prompts is set


@dataclass
class Roles:
    actor: WorkerGroup | None          # None where nothing trains (pipeline=label, constitutional)
    reference: WorkerGroup | None
    rollout: WorkerGroup
    feedback: Feedback
    judge: WorkerGroup | None
    critic: WorkerGroup | None = None
    reward_model: WorkerGroup | None = None
    judge_client: object | None = None   # the Judge (every backend) when the feedback or pipeline uses one
    shared: SharedPlacement | None = None  # the placement group of cluster.colocate's roles
    pending_rollout: object | None = None  # rollout.async_steps=1: the next step's PendingRollout, in flight
    eval: object | None = None             # evaluation.EvalRoles: the measuring feedback of eval.*

    def groups(self) -> dict[str, WorkerGroup]:
        named = {"actor": self.actor, "reference": self.reference, "rollout": self.rollout, "judge": self.judge,
                 "critic": self.critic, "reward_model": self.reward_model}
        named |= self.eval.groups if self.eval is not None else {}
        return {name: group for name, group in named.items() if group is not None}

    def shutdown(self) -> None:
        for group in self.groups().values():
            group.shutdown()
        if self.shared is not None:
            self.shared.shutdown()


def prepare_run(cfg: Config) -> RunInputs:
    model_path = resolve_model_path(cfg.model.path, cache_dir(cfg.model))
    judge_path = critic_path = reward_model_path = None
    uses_judge = cfg.feedback.source == "judge" or cfg.pipeline == "constitutional"
    if uses_judge and cfg.feedback.judge.follow_policy:
        judge_path = model_path
    elif uses_judge and cfg.feedback.judge.backend == "local":
        judge_path = resolve_model_path(cfg.feedback.judge.model or cfg.model.path, cache_dir(cfg.model),
                                        key="feedback.judge.model")
    if (cfg.feedback.source == "reward_model" or cfg.feedback.cascade.source == "reward_model") and \
            cfg.pipeline != "constitutional":
        reward_model_path = resolve_model_path(cfg.feedback.reward_model.path, cache_dir(cfg.model),
                                               key="feedback.reward_model.path")
    from openrlaif.feedback.rules import load_function
    if cfg.pipeline != "constitutional":   # fail now on a bad name or signature, not after the models are loaded
        if cfg.feedback.source == "function":
            load_function(cfg.feedback.function, cfg.feedback.function_kwargs)
        if cfg.feedback.cascade.source == "function":
            load_function(cfg.feedback.cascade.function, cfg.feedback.cascade.function_kwargs)
        for spec in cfg.feedback.extra_functions:
            load_function(spec)
    if cfg.pipeline == "online_rl" and cfg.algorithm.advantage in CRITIC:
        critic_path = resolve_model_path(cfg.critic.model or cfg.model.path, cache_dir(cfg.model), key="critic.model")
    if uses_judge and cfg.feedback.judge.backend == "http":
        http_backend(cfg.feedback.judge).probe()
    from openrlaif.models.registry import check_context
    for path, key in ((model_path, "model.path"), (reward_model_path, "feedback.reward_model.path")):
        if path:   # the policy's engines and trainers, and a reward model, see whole prompt + response sequences
            check_context(path, cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens, key,
                          "data.max_prompt_tokens + rollout.max_new_tokens")
    tokenizer = load_tokenizer(model_path, cfg)
    prompts = load_prompts(cfg.data.prompts, tokenizer, cfg.data.max_prompt_tokens, cfg.data.system_prompt)
    from openrlaif.pipelines.evaluation import eval_plan, prepare_eval
    evaluation = prepare_eval(cfg, tokenizer)
    out_dir = prepare_output_dir(cfg)
    plan = role_plan(cfg, judge_path) | eval_plan(cfg, evaluation)
    colocated_plan(plan, cfg.cluster.colocate)   # unequal worker counts fail here, before Ray starts
    cpus = reserved_cpus(plan, cfg.cluster.colocate)
    return RunInputs(out_dir, model_path, judge_path, critic_path, reward_model_path, tokenizer, prompts, plan, cpus,
                     evaluation)


def role_plan(cfg: Config, judge_path: str | None) -> dict[str, RoleResources]:
    """The roles this run starts and what each reserves: an actor only where the policy trains, a reference only
    where the loss uses it, no judge for rules, a critic only for estimators that need values. A judge that follows
    the policy is the policy's weights in a group of its own."""
    plan = {"rollout": cfg.rollout.resources}
    if cfg.pipeline in ("online_rl", "online_dpo"):
        plan["actor"] = cfg.actor.resources
    if needs_reference(cfg):
        plan["reference"] = cfg.reference.resources
    if judge_path:   # a local judge model; an HTTP judge reserves nothing
        plan["judge"] = cfg.feedback.judge.resources
    if "reward_model" in (cfg.feedback.source, cfg.feedback.cascade.source) and cfg.pipeline != "constitutional":
        plan["reward_model"] = cfg.feedback.reward_model.resources
    if cfg.pipeline == "online_rl" and cfg.algorithm.advantage in CRITIC:
        plan["critic"] = cfg.critic.resources
    return plan


def needs_reference(cfg: Config) -> bool:
    from openrlaif.algorithms.preference import REFERENCE_FREE
    if cfg.pipeline == "online_rl":
        return cfg.algorithm.kl_coef > 0
    return cfg.pipeline == "online_dpo" and cfg.algorithm.loss not in REFERENCE_FREE


def start_roles(cfg: Config, run: RunInputs) -> Roles:
    """Each role in its own placement group (cluster.colocate's roles in one shared group); all models load in
    parallel, then we wait once. If any role fails to start, the roles already started and their placement groups
    are freed before the error is raised, so a cluster that outlives the run (a notebook, `ray job submit` against
    a long-lived head) is left as it was."""
    plan = run.plan
    check_cluster_fits(plan, cfg.cluster.colocate)
    started: list[WorkerGroup] = []
    shared = None
    try:
        if "colocated" in colocated_plan(plan, cfg.cluster.colocate):
            shared = SharedPlacement(plan, cfg.cluster.colocate)
        return launch_roles(cfg, run, shared, started)
    except BaseException:
        for group in started:
            group.shutdown()
        if shared is not None:
            shared.shutdown()
        raise


def launch_roles(cfg: Config, run: RunInputs, shared: SharedPlacement | None, started: list[WorkerGroup]) -> Roles:
    """start_roles' work; every group is appended to `started` as soon as it exists."""
    from openrlaif.feedback.combine import CombinedFeedback
    from openrlaif.feedback.reward_model import RewardModelFeedback, RewardModelWorker
    from openrlaif.feedback.rules import FunctionFeedback
    from openrlaif.workers.critic import CriticWorker
    from openrlaif.workers.reference import ReferenceWorker

    plan = run.plan

    def keep(group: WorkerGroup | None) -> WorkerGroup | None:
        if group is not None:
            started.append(group)
        return group

    def threads(role: str) -> int:
        return threads_per_worker(cfg, plan[role].num_workers)

    step_batch = step_batch_size(cfg)
    trust = cfg.model.trust_remote_code
    # Log-probs for a policy-gradient ratio use the sampling temperature; DPO's log-ratios use the model itself.
    temperature = cfg.rollout.temperature if cfg.pipeline == "online_rl" else 1.0
    actor = keep(start_actor(cfg, run.model_path, step_batch, temperature, shared)) if "actor" in plan else None
    rollout = keep(start_rollout(cfg, run.model_path, threads("rollout"), shared=shared))
    reference = None
    if "reference" in plan:
        reference = keep(WorkerGroup("reference", ReferenceWorker, cfg.reference.resources, lambda rank: dict(
            model_path=run.model_path, dtype=cfg.model.dtype, micro_batch_size=cfg.reference.micro_batch_size,
            temperature=temperature, threads=threads("reference"), seed=cfg.seed, trust_remote_code=trust),
            shared=shared))
    judge = reward_model = critic = judge_client = None
    objectives = {}
    if "reward_model" in plan:
        rm = cfg.feedback.reward_model
        reward_model = keep(WorkerGroup("reward_model", RewardModelWorker, rm.resources, lambda rank: dict(
            model_path=run.reward_model_path, micro_batch_size=rm.micro_batch_size,
            max_tokens=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens, dtype=cfg.model.dtype,
            threads=threads("reward_model"), seed=cfg.seed, trust_remote_code=trust), shared=shared))
    if cfg.feedback.source == "judge" or cfg.pipeline == "constitutional":
        judge, judge_client = start_judge(cfg, run.judge_path, run.out_dir,
                                          threads("judge") if "judge" in plan else 1, shared)
        objectives["judge"] = judge_client
        keep(judge)
        cascade = cfg.feedback.cascade
        if cascade.source and cfg.pipeline != "constitutional":   # 2b. a cheap source first, the judge where unsure
            from openrlaif.feedback.cascade import CascadeFeedback
            cheap = (RewardModelFeedback(reward_model) if cascade.source == "reward_model"
                     else FunctionFeedback(cascade.function, cascade.function_kwargs))
            objectives["judge"] = CascadeFeedback(cheap, objectives["judge"], cfg.feedback.judge.mode,
                                                  list(cascade.band), cascade.delta)
    elif reward_model is not None:
        objectives["reward_model"] = RewardModelFeedback(reward_model)
    else:
        objectives[function_name(cfg.feedback.function)] = FunctionFeedback(cfg.feedback.function,
                                                                            cfg.feedback.function_kwargs)
    for spec in cfg.feedback.extra_functions if cfg.pipeline != "constitutional" else []:
        objectives[function_name(spec)] = FunctionFeedback(spec, {})
    feedback = next(iter(objectives.values()))
    if len(objectives) > 1 or cfg.feedback.transform != "none":
        feedback = CombinedFeedback(objectives, cfg.feedback.weights, cfg.feedback.transform,
                                    cfg.feedback.reference_quantile)
    if "critic" in plan:
        critic = keep(start_trainer(cfg, "critic", CriticWorker, cfg.critic, step_batch, model_path=run.critic_path,
                                    pad_token_id=run.tokenizer.pad_token_id, shared=shared))
    from openrlaif.pipelines.evaluation import start_eval
    evaluation = start_eval(cfg, run.eval, run.out_dir, threads, shared)   # eval.feedback: measures, never trains
    for group in evaluation.groups.values() if evaluation is not None else []:
        keep(group)
    wait_until_ready(started)
    return Roles(actor, reference, rollout, feedback, judge, critic, reward_model, judge_client, shared,
                 eval=evaluation)


def wait_until_ready(groups: list[WorkerGroup]) -> None:
    """Wait for every worker's constructor (model loads run in parallel). A worker that fails to start is
    reported by role and rank with its own error, e.g. a model folder whose weights cannot be read."""
    pending = {ref: (group.name, rank) for group in groups
               for rank, ref in enumerate(group.call(lambda w: w.ready.remote()))}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        name, rank = pending.pop(done[0])
        try:
            ray.get(done[0])
        except ray.exceptions.RayError as err:
            raise RunError(f"role {name!r} (worker {rank}) failed to start: {startup_error(err)}\n"
                           "Nothing was trained and no checkpoint was touched. Fix: correct what the error names "
                           "(often the role's model path or its resources) and run again.") from err


def startup_error(err: Exception) -> str:
    """The loader's own exception, `Type: message` and up to two lines of its detail, out of a worker's traceback
    (its last line may be no more than a documentation URL, as pydantic's are)."""
    import re
    lines = str(getattr(err, "cause", None) or err).strip().splitlines()
    heads = [i for i, line in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*", line.strip())]
    if not heads:
        return lines[-1].strip() if lines else type(err).__name__
    head = heads[-1]
    return " ".join(line.strip() for line in lines[head:head + 3] if line.strip())[:600]


def start_judge(cfg: Config, judge_path: str | None, out_dir: str, threads: int,
                shared: SharedPlacement | None = None, name: str = "judge"):
    """(worker group or None, Judge): a local judge model in its own group, or an HTTP endpoint client. `name`:
    the group's role name and its verdict cache's (<out_dir>/<name>_cache.jsonl)."""
    from openrlaif.feedback.backends import LocalBackend
    from openrlaif.feedback.judge import Judge, JudgeWorker
    jc = cfg.feedback.judge
    cache_path = os.path.join(out_dir, f"{name}_cache.jsonl")
    if jc.backend == "http":
        return None, Judge(http_backend(jc), jc, cache_path, model_name=jc.model)
    engine = judge_engine(jc, cfg.rollout.engine)
    group = WorkerGroup(name, JudgeWorker, jc.resources, lambda rank: dict(
        model_path=judge_path, dtype=cfg.model.dtype, threads=threads, seed=cfg.seed,
        max_prompt_tokens=jc.max_prompt_tokens, micro_batch_size=jc.micro_batch_size,
        trust_remote_code=cfg.model.trust_remote_code, engine=engine, max_new_tokens=jc.max_new_tokens,
        kv_cache_gib=jc.kv_cache_gib, gpu_memory_utilization=jc.gpu_memory_utilization), shared=shared)
    backend = LocalBackend(group, judge_path, cfg.model.dtype, jc.max_prompt_tokens, engine)
    return group, Judge(backend, jc, cache_path, model_name=jc.model or cfg.model.path)


def http_backend(jc):
    from openrlaif.feedback.backends import HTTPBackend
    return HTTPBackend(jc.base_url, jc.model, jc.api_key_env, jc.timeout_s, jc.max_retries, jc.backoff_s,
                       jc.concurrency, jc.top_logprobs, jc.requests_per_minute, jc.tokens_per_minute,
                       jc.max_rate_limit_waits)


def function_name(spec: str) -> str:
    """The objective's name in metrics: the callable's name ("openrlaif.feedback.rules:brevity" -> "brevity")."""
    return spec.partition(":")[2] or spec


def calibrate_references(roles: Roles, run: RunInputs, cfg: Config) -> dict[str, float]:
    """Before the first update: `feedback.reference_samples` responses per prompt from the starting policy,
    scored by every objective; each keeps its per-prompt quantile as r_ref(x) for the LSC transform."""
    sampling = replace(cfg.rollout, samples_per_prompt=cfg.feedback.reference_samples)
    batch = generate(roles, run.prompts, replace(cfg, rollout=sampling), run.tokenizer, seed=cfg.seed * 10_000)
    return roles.feedback.calibrate(batch.meta["prompt"], batch.meta["response"], group_ids=batch["group_ids"].tolist(),
                                    conversations=batch.meta["conversation"])


# ---------------------------------------------------------------------------------------------------- phases

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


def launch_rollout(roles: Roles, prompts: list, cfg: Config, seed: int) -> PendingRollout:
    spec = SamplingSpec(n=cfg.rollout.samples_per_prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=seed)
    spans = split_evenly(len(prompts), len(roles.rollout))

    def launch(sampling: SamplingSpec) -> list:
        return roles.rollout.map(lambda worker, span: worker.generate.remote(
            [p.token_ids for p in prompts[span]], replace(sampling, seed=seed + span.start)), spans)

    wants_greedy = cfg.pipeline == "online_rl" and cfg.algorithm.advantage in GREEDY_BASELINE
    return PendingRollout(prompts, spans, launch(spec), launch(replace(spec, n=1, temperature=0.0)) if wants_greedy else [])


def collect_rollout(pending: PendingRollout, tokenizer) -> Batch:
    prompts, spans = pending.prompts, pending.spans
    shards = ray.get(pending.sample_refs + pending.greedy_refs)
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
    batch.meta["conversation"] = [prompts[c.prompt_index].messages for c in completions]   # what a judge is shown
    if greedy:
        greedy_texts = tokenizer.batch_decode([greedy[i] for i in range(len(prompts))], skip_special_tokens=True)
        batch.meta["baseline_response"] = [greedy_texts[c.prompt_index] for c in completions]
    return batch


def next_rollout(roles: Roles, stream: PromptStream, cfg: Config, tokenizer, step: int,
                 metrics: dict[str, float]) -> Batch:
    """This step's samples. One-step-off (rollout.async_steps=1): take the batch launched during the previous step
    and launch the next one before this one trains, so the engines sample while the actor updates. That batch
    comes from the weights before this step's update (one update stale); the actor corrects for it with
    truncated importance weights against the engine's log-probs (algorithm.is_cap)."""
    pending, roles.pending_rollout = roles.pending_rollout, None
    metrics["rollout/staleness"] = float(pending is not None)
    if pending is None:
        pending = launch_rollout(roles, stream.next_batch(), cfg, cfg.seed * 10_000 + step)
    if cfg.rollout.async_steps and step < cfg.steps:
        roles.pending_rollout = launch_rollout(roles, stream.next_batch(), cfg, cfg.seed * 10_000 + step + 1)
    return collect_rollout(pending, tokenizer)


def score(roles: Roles, batch: Batch) -> FeedbackResult:
    """Rewards for the samples, with their rollout groups (a pairwise or listwise judge compares within a group,
    never across two groups of the same prompt text) and conversations (a judge sees every turn). Greedy baselines
    (ReMax), when there are any, are scored in the same call, each in its sample's group; a sample whose baseline
    verdict failed is masked too: its advantage would be undefined."""
    prompts, responses = batch.meta["prompt"], batch.meta["response"]
    groups, conversations = batch["group_ids"].tolist(), batch.meta.get("conversation")
    if "baseline_response" not in batch.meta:
        return report_failures(roles.feedback.score(prompts, responses, group_ids=groups, conversations=conversations))
    first = {group: row for row, group in reversed(list(enumerate(groups)))}   # one baseline per prompt
    rows = sorted(first.values())
    result = roles.feedback.score(prompts + [prompts[r] for r in rows],
                                  responses + [batch.meta["baseline_response"][r] for r in rows],
                                  group_ids=groups + [groups[r] for r in rows],
                                  conversations=conversations + [conversations[r] for r in rows] if conversations
                                  else None)
    size = len(batch)
    baseline_of = {groups[r]: size + k for k, r in enumerate(rows)}
    index = torch.tensor([baseline_of[g] for g in groups])
    batch["baseline_rewards"] = result.rewards[index]
    return report_failures(FeedbackResult(result.rewards[:size], result.valid[:size] & result.valid[index],
                                          result.failures, result.metrics, result.consistency, result.details))


def report_failures(result: FeedbackResult) -> FeedbackResult:
    """One line per failure kind this step, with the first failure's own words (connection refused, the
    function's error, ...): a run whose verdicts fail says why, not only how many."""
    for kind, count in sorted(result.failures.items()):
        detail = result.details.get(kind)
        tqdm.write(f"[openrlaif] feedback failed for {count} sample(s): {kind}" + (f": {detail}" if detail else ""))
    return result


def compute_advantages(batch: Batch, valid: torch.Tensor, cfg: Config) -> torch.Tensor:
    algo = cfg.algorithm
    kl = None
    if algo.kl_in_reward:   # per-token KL of the sampling policy to the reference, a penalty in the reward
        kl = KL_ESTIMATORS[algo.kl_estimator](batch["old_logprobs"], batch["ref_logprobs"]) * batch["response_mask"]
    out = ADVANTAGE_ESTIMATORS[algo.advantage](
        rewards=batch["rewards"], group_ids=batch["group_ids"], valid=valid, token_mask=batch["response_mask"],
        kl=kl, kl_coef=algo.kl_coef, normalize_std=algo.normalize_std, gamma=algo.gamma, lam=algo.lam,
        baseline_rewards=batch["baseline_rewards"] if "baseline_rewards" in batch else None,
        values=batch["values"] if "values" in batch else None)
    if algo.advantage in CRITIC:
        out, batch["returns"] = out
    return out


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
    value_refs = []
    if roles.critic is not None:
        value_refs = roles.critic.map(lambda w, shard: w.values.remote(shard), model_inputs.split(len(roles.critic)))
    results = ray.get(ref_refs + old_refs + value_refs)
    if ref_refs:
        batch["ref_logprobs"] = torch.cat(results[:len(ref_refs)])
    if old_refs:
        batch["old_logprobs"] = torch.cat(results[len(ref_refs):len(ref_refs) + len(old_refs)])
    if value_refs:
        batch["values"] = torch.cat(results[len(ref_refs) + len(old_refs):])


def update_actor(roles: Roles, batch: Batch, cfg: Config) -> dict[str, float]:
    fields = ["input_ids", "attention_mask", "response_mask", "sample_mask", "advantages"]
    fields += [k for k in ("ref_logprobs", "old_logprobs") if k in batch]
    if cfg.rollout.async_steps:            # behaviour-policy log-probs for the importance weights
        fields.append("rollout_logprobs")
    train_batch = Batch({k: batch[k] for k in fields})
    if not cfg.rollout.async_steps and "rollout_logprobs" in batch:   # only measured: the trainer-engine gap
        train_batch["engine_logprobs"] = batch["rollout_logprobs"]
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


def sync_weights(roles: Roles, cfg: Config, step: int) -> float:
    """Rank 0 gathers full weights (a collective under ZeRO-3), the engines load them from the object store. A
    judge that follows the policy (self-rewarding) loads them too, and its verdicts are cached per policy version."""
    state_refs = roles.actor.call(lambda w: w.packed_weights.remote(cfg.rollout.dtype))
    targets = [roles.rollout]
    if cfg.feedback.judge.follow_policy and roles.judge is not None:
        targets.append(roles.judge)
    load_refs = [ref for group in targets for ref in group.call(lambda w: w.update_weights.remote(state_refs[0]))]
    results = ray.get(state_refs[1:] + load_refs)   # ranks > 0 return None; engines return their load time
    if len(targets) > 1:
        roles.judge_client.set_policy_version(step)
    return max(results[len(state_refs) - 1:])


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
            "train/is_truncated_fraction": train["is_truncated_x_tokens"] / max(train["valid_tokens"], 1.0),
            "train/behaviour_kl": train["behaviour_kl_x_tokens"] / max(train["valid_tokens"], 1.0)}
           if train.get("is_weight_x_tokens") else {}),
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


def feedback_metrics(feedback: FeedbackResult, response_tokens: float, seconds: float) -> dict[str, float]:
    """Rewards, failures by kind, and what the judge reported (flip rate, kept fraction, tokens, seconds)."""
    valid = feedback.valid
    rewards = feedback.rewards[valid]
    out = {"reward/mean": feedback.mean(),
           "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
           "feedback/failures": float((~valid).sum()),
           "feedback/failure_rate": float((~valid).float().mean())}
    for kind, count in feedback.failures.items():
        out[f"feedback/failures/{kind}"] = float(count)
    for key, value in feedback.metrics.items():
        out[f"feedback/{key}"] = value
    if "judge_prompt_tokens" in feedback.metrics:
        judge_tokens = feedback.metrics["judge_prompt_tokens"] + feedback.metrics["judge_generated_tokens"]
        out["throughput/feedback_tokens_per_s"] = judge_tokens / max(seconds, 1e-9)
        out["feedback/judge_tokens_per_policy_token"] = judge_tokens / max(response_tokens, 1.0)
    return out
