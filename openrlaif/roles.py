"""A run's roles: what it needs before Ray starts (`prepare_run`: model paths, tokenizer, prompts, the role plan),
which roles it starts and what each reserves (`role_plan`), starting them all in parallel in their placement
groups and waiting once (`start_roles`), the feedback they make up, and shutting them down (`Roles.shutdown`).
Every pipeline that samples or trains starts its roles through here."""
from __future__ import annotations

import os
import random
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import ray

from openrlaif.algorithms.advantages import CRITIC
from openrlaif.checkpointing import RunError
from openrlaif.config import (ONLINE_PIPELINES, Config, ConfigError, RoleResources, cache_dir, judge_engine, lora_sync,
                              reference_from_actor, response_budget, step_batch_size)
from openrlaif.data import load_prompts
from openrlaif.feedback import Feedback
from openrlaif.models import resolve_model_path
from openrlaif.pipelines.common import load_tokenizer, prepare_output_dir
from openrlaif.workers.group import SharedPlacement, WorkerGroup, check_cluster_fits, colocated_plan, reserved_cpus


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
    user_sim_path: str | None = None   # env.user_sim.model, resolved: a local model plays simulated_user's user
    teacher_path: str | None = None    # teacher.model, resolved (on-policy distillation)
    teacher_client: object | None = None   # or teacher.base_url's EndpointTeacher, probed


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
    # rollout.async_steps=k: (step launched at, PendingRollout) of the next steps' batches in flight, oldest first
    pending_rollouts: deque = field(default_factory=deque)
    eval: object | None = None             # evaluation.EvalRoles: the measuring feedback of eval.*
    user_sim: WorkerGroup | None = None    # env.user_sim.model: the local model playing the user
    user_backend: object | None = None     # its backend, handed to every simulated_user episode
    teacher: WorkerGroup | None = None     # on-policy distillation's teacher (algorithm.distill_coef > 0)
    teacher_client: object | None = None   # or its endpoint (teacher.base_url): feedback.teacher.EndpointTeacher
    sync_plan: list | None = None          # the weight sync's buckets of tensor names (rollout/weight_sync.py)
    sync_group_size: int = 0               # rollout.weight_sync=collective: members of the group, once joined

    def groups(self) -> dict[str, WorkerGroup]:
        named = {"actor": self.actor, "reference": self.reference, "rollout": self.rollout, "judge": self.judge,
                 "critic": self.critic, "reward_model": self.reward_model, "user_sim": self.user_sim,
                 "teacher": self.teacher}
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
    user_sim_path = None
    if cfg.env.name == "simulated_user" and cfg.env.user_sim.model:
        user_sim_path = resolve_model_path(cfg.env.user_sim.model, cache_dir(cfg.model), key="env.user_sim.model")
    if uses_judge and cfg.feedback.judge.backend == "http":
        http_backend(cfg.feedback.judge).probe()
    from openrlaif.models.registry import check_context, check_tensor_parallel
    check_tensor_parallel(model_path, cfg.rollout.tensor_parallel_size)
    if judge_path:
        check_tensor_parallel(judge_path, cfg.feedback.judge.tensor_parallel_size, "feedback.judge.tensor_parallel_size")
    for path, key in ((model_path, "model.path"), (reward_model_path, "feedback.reward_model.path")):
        if path:   # the policy's engines and trainers, and a reward model, see whole prompt + response sequences
            check_context(path, cfg.data.max_prompt_tokens + response_budget(cfg), key,
                          "data.max_prompt_tokens + " + ("env.max_total_tokens" if cfg.env.name
                                                         else "rollout.max_new_tokens"))
    tokenizer = load_tokenizer(model_path, cfg)
    teacher_path = teacher_client = None
    if cfg.pipeline == "online_rl" and cfg.algorithm.distill_coef > 0:
        if cfg.teacher.base_url:   # an endpoint: is it up, and does it return prompt log-probs?
            teacher_client = endpoint_teacher(cfg)
            teacher_client.probe()
        else:
            teacher_path = resolve_model_path(cfg.teacher.model, cache_dir(cfg.model), key="teacher.model")
            check_same_tokenizer(tokenizer, teacher_path)
    from openrlaif.envs import env_factory
    env = env_factory(cfg.env)   # its reset(row) gives each prompt's conversation
    if cfg.env.name:
        from openrlaif.rollout.multi_turn import TurnTemplate
        probe = getattr(env(), "probe", None) if env is not None else None
        if probe is not None:   # an environment behind an endpoint (simulated_user): is it up?
            probe()
        TurnTemplate(tokenizer)   # a template that cannot frame observations fails now
    prompts = load_prompts(cfg.data.prompts, tokenizer, cfg.data.max_prompt_tokens, cfg.data.system_prompt, env=env,
                           columns=cfg.data.columns, overlong=cfg.data.overlong)
    from openrlaif.pipelines.evaluation import eval_plan, prepare_eval
    evaluation = prepare_eval(cfg, tokenizer)
    out_dir = prepare_output_dir(cfg)
    plan = role_plan(cfg, judge_path) | eval_plan(cfg, evaluation)
    if user_sim_path:
        plan["user_sim"] = cfg.env.user_sim.resources
    if teacher_path:
        plan["teacher"] = cfg.teacher.resources
    colocated_plan(plan, cfg.cluster.colocate)   # unequal worker counts fail here, before Ray starts
    cpus = reserved_cpus(plan, cfg.cluster.colocate)
    return RunInputs(out_dir, model_path, judge_path, critic_path, reward_model_path, tokenizer, prompts, plan, cpus,
                     evaluation, user_sim_path, teacher_path, teacher_client)


def endpoint_teacher(cfg: Config):
    from openrlaif.feedback.teacher import EndpointTeacher
    teacher = cfg.teacher
    return EndpointTeacher(teacher.base_url, teacher.model, teacher.api_key_env, teacher.timeout_s,
                           teacher.max_retries, teacher.concurrency)


def check_same_tokenizer(tokenizer, teacher_path: str) -> None:
    """Distillation compares the teacher's and the student's log-probs of the same token ids: one vocabulary."""
    from transformers import AutoTokenizer
    teacher = AutoTokenizer.from_pretrained(teacher_path)
    if teacher.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"teacher.model={teacher_path!r} has another tokenizer than model.path ({len(teacher)} vs "
                          f"{len(tokenizer)} tokens, or the same count with other ids): on-policy distillation scores "
                          "the student's token ids with the teacher. Fix: a teacher of the same model family "
                          "(the same tokenizer).")


def role_plan(cfg: Config, judge_path: str | None) -> dict[str, RoleResources]:
    """The roles this run starts and what each reserves: an actor only where the policy trains, a reference only
    where the loss uses it, no judge for rules, a critic only for estimators that need values. A judge that follows
    the policy is the policy's weights in a group of its own."""
    plan = {"rollout": cfg.rollout.resources}
    if cfg.pipeline in ONLINE_PIPELINES:
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
    """A reference role: where the loss reads log π_ref and the actor cannot give it itself (with LoRA it does:
    its base model, reference.from_actor_base)."""
    from openrlaif.algorithms.preference import REFERENCE_FREE
    if reference_from_actor(cfg):
        return False
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
            max_tokens=cfg.data.max_prompt_tokens + response_budget(cfg), dtype=cfg.model.dtype,
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
    elif cfg.feedback.source == "env":
        from openrlaif.envs import EnvReward
        objectives["env"] = EnvReward()
    elif cfg.feedback.source == "none":   # distillation alone: the teacher is the signal
        from openrlaif.feedback.rules import NoReward
        objectives["none"] = NoReward()
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
    teacher = None
    if "teacher" in plan:   # on-policy distillation: a frozen model scoring the samples, the reference's worker
        teacher = keep(WorkerGroup("teacher", ReferenceWorker, cfg.teacher.resources, lambda rank: dict(
            model_path=run.teacher_path, dtype=cfg.model.dtype, micro_batch_size=cfg.teacher.micro_batch_size,
            temperature=temperature, threads=threads("teacher"), seed=cfg.seed, trust_remote_code=trust),
            shared=shared))
    user_sim = user_backend = None
    if "user_sim" in plan:
        user_sim, user_backend = start_user_sim(cfg, run.user_sim_path, threads("user_sim"), shared)
        keep(user_sim)
    wait_until_ready(started)
    return Roles(actor, reference, rollout, feedback, judge, critic, reward_model, judge_client, shared,
                 eval=evaluation, user_sim=user_sim, user_backend=user_backend, teacher=teacher,
                 teacher_client=run.teacher_client)


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
    for group in groups:   # where each worker runs, to name the node of one that dies later
        group.nodes = ray.get(group.call(lambda w: w.__ray_call__.remote(
            lambda _: ray.get_runtime_context().get_node_id())))


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
        kv_cache_gib=jc.kv_cache_gib, gpu_memory_utilization=jc.gpu_memory_utilization,
        tensor_parallel_size=jc.tensor_parallel_size), shared=shared)
    backend = LocalBackend(group, judge_path, cfg.model.dtype, jc.max_prompt_tokens, engine)
    return group, Judge(backend, jc, cache_path, model_name=jc.model or cfg.model.path)


def start_user_sim(cfg: Config, path: str, threads: int, shared: SharedPlacement | None = None):
    """(worker group, backend): env.user_sim's local model on the judge's worker and engines (it generates the
    user's turns: no verdicts, no cache), behind a backend that batches the concurrent episodes' requests."""
    from openrlaif.feedback.backends import Coalesced, LocalBackend
    from openrlaif.feedback.judge import JudgeWorker
    user = cfg.env.user_sim
    engine = user.engine or cfg.rollout.engine
    group = WorkerGroup("user_sim", JudgeWorker, user.resources, lambda rank: dict(
        model_path=path, dtype=cfg.model.dtype, threads=threads, seed=cfg.seed + 1,
        max_prompt_tokens=user.max_prompt_tokens, micro_batch_size=user.micro_batch_size,
        trust_remote_code=cfg.model.trust_remote_code, engine=engine,
        max_new_tokens=int(cfg.env.kwargs.get("max_tokens", 64)), kv_cache_gib=user.kv_cache_gib,
        gpu_memory_utilization=user.gpu_memory_utilization), shared=shared)
    return group, Coalesced(LocalBackend(group, path, cfg.model.dtype, user.max_prompt_tokens, engine))


def http_backend(jc):
    from openrlaif.feedback.backends import HTTPBackend
    return HTTPBackend(jc.base_url, jc.model, jc.api_key_env, jc.timeout_s, jc.max_retries, jc.backoff_s,
                       jc.concurrency, jc.top_logprobs, jc.requests_per_minute, jc.tokens_per_minute,
                       jc.max_rate_limit_waits)


def function_name(spec: str) -> str:
    """The objective's name in metrics: the callable's name ("openrlaif.feedback.rules:brevity" -> "brevity")."""
    return spec.partition(":")[2] or spec



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RAY_WORKER_PORTS_END = 20000   # Ray's workers listen on 10002-19999 by default


def rendezvous_port(address: str = "127.0.0.1") -> int:
    """A free port for a rendezvous that another process (rank 0) binds later. Not one the OS hands out (bind to
    port 0): those come from the ephemeral range that outgoing connections also take their local ports from, so in
    the seconds before rank 0 binds it, one of Ray's connections could take it (seen in CI: EADDRINUSE at rank 0's
    bind). Ports between Ray's worker ports and the ephemeral range are taken only by explicit binds."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_start = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_start = 32768
    if ephemeral_start - RAY_WORKER_PORTS_END < 1000:
        return free_port()
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        port = rng.randrange(RAY_WORKER_PORTS_END, ephemeral_start)
        with socket.socket() as sock:
            try:
                sock.bind((address, port))
            except OSError:
                continue
            return port
    return free_port()


def threads_per_worker(cfg: Config, num_workers: int) -> int:
    """Roles run one after another, so each may use every core unless the config says otherwise."""
    return cfg.cluster.threads_per_worker or max(1, (os.cpu_count() or 1) // num_workers)


def start_actor(cfg: Config, model_path: str, step_batch_size: int, temperature: float = 1.0,
                shared: SharedPlacement | None = None) -> WorkerGroup:
    """The DeepSpeed policy workers."""
    from openrlaif.workers.actor import ActorWorker
    return start_trainer(cfg, "actor", ActorWorker, cfg.actor, step_batch_size, model_path=model_path,
                         algo=cfg.algorithm, temperature=temperature, shared=shared)


def start_rollout(cfg: Config, model_path: str, threads: int, sampling: Config | None = None,
                  shared: SharedPlacement | None = None) -> WorkerGroup:
    """The rollout engines (`rollout.resources` workers) serving `model_path`, sampling as `sampling.rollout` says
    (default `cfg`'s own; `openrlaif eval` passes its greedy eval sampling)."""
    from openrlaif.workers.rollout import RolloutWorker
    rollout = (sampling or cfg).rollout
    return WorkerGroup("rollout", RolloutWorker, cfg.rollout.resources, lambda rank: dict(
        model_path=model_path, cfg=rollout,
        max_model_len=cfg.data.max_prompt_tokens + (response_budget(cfg) if sampling is None else rollout.max_new_tokens),
        threads=threads, seed=cfg.seed + rank, trust_remote_code=cfg.model.trust_remote_code,
        lora_rank=cfg.actor.lora.rank if lora_sync(cfg) == "adapter" else 0), shared=shared)


def start_trainer(cfg: Config, role: str, worker_class, train_cfg, step_batch_size: int,
                  shared: SharedPlacement | None = None, **kwargs) -> WorkerGroup:
    """A DeepSpeed-trained role (actor, critic, reward model) with its own torch.distributed rendezvous."""
    resources = train_cfg.resources
    backend = cfg.cluster.dist_backend if cfg.cluster.dist_backend != "auto" else (
        "nccl" if resources.num_gpus > 0 else "gloo")
    master_addr = "127.0.0.1"
    if cfg.cluster.address:   # multi-node: rank 0's node must be reachable by the others
        master_addr = ray.util.get_node_ip_address()
    master_port = rendezvous_port(master_addr)
    return WorkerGroup(role, worker_class, resources, lambda rank: dict(
        cfg=train_cfg, rank=rank, world_size=resources.num_workers, master_addr=master_addr,
        master_port=master_port, backend=backend, dtype=cfg.model.dtype, step_batch_size=step_batch_size,
        threads=threads_per_worker(cfg, resources.num_workers), seed=cfg.seed,
        trust_remote_code=cfg.model.trust_remote_code, **kwargs), shared=shared)
