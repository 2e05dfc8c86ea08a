"""Evaluation: in the loop of the online pipelines (eval.*), and `openrlaif eval <model>` (pipeline=eval).

In the loop, before the first step, every `eval.every` steps and after the last, the policy answers the held-out
`eval.prompts` (greedy by default) and the answers are scored twice: by the training feedback (`eval/train_reward`,
what the policy is optimised for) and by `eval.feedback` (`eval/<name>_reward`, what it should get better at: a
gold rule, a stronger judge, a reward model, an endpoint). Their gap, the answers' length and the policy's KL to
the reference on them are logged too, so reward hacking shows as the train reward rising while the measured one
does not (Gao et al. 2022). `openrlaif plot` draws both on one panel.

`openrlaif eval <model> eval.prompts=... eval.feedback...=...` scores any model folder (a checkpoint of any
pipeline); with `eval.baseline=<model>` it also compares each of its answers with the baseline's answer to the
same prompt and reports the win rate with a 95% Wilson interval (ties count one half): a judge compares the two
in both orders (swap-debiased, as the RLAIF papers report win rates), a rule or reward model by their scores.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from openrlaif.config import ONLINE_PIPELINES, Config, ConfigError, RoleResources, cache_dir
from openrlaif.models import resolve_model_path


@dataclass
class EvalInputs:
    prompts: list
    judge_path: str | None = None          # a local measuring judge
    reward_model_path: str | None = None   # a measuring reward model
    baseline_path: str | None = None       # pipeline=eval: the model to compare against


@dataclass
class EvalRoles:
    feedback: object | None                # the measuring feedback (None: only the training feedback is used)
    groups: dict = field(default_factory=dict)   # name -> WorkerGroup of a local measuring judge / reward model
    judge: object | None = None            # its Judge, when it is one (win rates compare pairs with it)


def prepare_eval(cfg: Config, tokenizer) -> EvalInputs | None:
    """Every eval input checked at start-up (files, model paths, the function's signature), or None when off."""
    ev = cfg.eval
    if not ev.prompts:
        return None
    from openrlaif.data import load_prompts
    from openrlaif.envs import env_factory
    prompts = load_prompts(ev.prompts, tokenizer, cfg.data.max_prompt_tokens, cfg.data.system_prompt,
                           key="eval.prompts", env=env_factory(cfg.env), columns=cfg.data.columns,
                           overlong=cfg.data.overlong)   # env.*: held-out episodes
    inputs = EvalInputs(prompts)
    fb = ev.feedback
    if fb.source == "function":
        from openrlaif.feedback.rules import load_function
        load_function(fb.function, fb.function_kwargs)
    elif fb.source == "judge" and fb.judge.backend == "local":
        inputs.judge_path = resolve_model_path(fb.judge.model or cfg.model.path, cache_dir(cfg.model),
                                               key="eval.feedback.judge.model")
    elif fb.source == "judge":
        from openrlaif.roles import http_backend
        http_backend(fb.judge).probe()
    elif fb.source == "reward_model":
        inputs.reward_model_path = resolve_model_path(fb.reward_model.path, cache_dir(cfg.model),
                                                      key="eval.feedback.reward_model.path")
    if ev.baseline:
        inputs.baseline_path = resolve_model_path(ev.baseline, cache_dir(cfg.model), key="eval.baseline")
    return inputs


def eval_plan(cfg: Config, inputs: EvalInputs | None) -> dict[str, RoleResources]:
    """The worker groups the measuring feedback needs (an HTTP judge or a rule needs none)."""
    if inputs is None:
        return {}
    plan = {}
    if inputs.judge_path:
        plan["eval_judge"] = cfg.eval.feedback.judge.resources
    if inputs.reward_model_path:
        plan["eval_reward_model"] = cfg.eval.feedback.reward_model.resources
    return plan


def start_eval(cfg: Config, inputs: EvalInputs | None, out_dir: str, threads, shared=None) -> EvalRoles | None:
    """The measuring feedback; its worker groups are started, not waited for (the caller waits once for all)."""
    if inputs is None:
        return None
    fb = cfg.eval.feedback
    if fb.source == "":
        return EvalRoles(None)
    if fb.source == "function":
        from openrlaif.feedback.rules import FunctionFeedback
        return EvalRoles(FunctionFeedback(fb.function, fb.function_kwargs))
    if fb.source == "judge":
        from openrlaif.roles import start_judge
        group, judge = start_judge(replace(cfg, feedback=fb), inputs.judge_path, out_dir,
                                   threads("eval_judge") if inputs.judge_path else 1, shared, name="eval_judge")
        return EvalRoles(judge, {"eval_judge": group} if group is not None else {}, judge)
    from openrlaif.feedback.reward_model import RewardModelFeedback, RewardModelWorker
    from openrlaif.workers.group import WorkerGroup
    rm = fb.reward_model
    group = WorkerGroup("eval_reward_model", RewardModelWorker, rm.resources, lambda rank: dict(
        model_path=inputs.reward_model_path, micro_batch_size=rm.micro_batch_size,
        max_tokens=cfg.data.max_prompt_tokens + (cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens),
        dtype=cfg.model.dtype, threads=threads("eval_reward_model"), seed=cfg.seed,
        trust_remote_code=cfg.model.trust_remote_code), shared=shared)
    return EvalRoles(RewardModelFeedback(group), {"eval_reward_model": group})


def eval_sampling(cfg: Config) -> Config:
    """The config `generate` samples the eval answers with: greedy (or the rollout's temperature), no baselines."""
    ev = cfg.eval
    rollout = replace(cfg.rollout, samples_per_prompt=ev.samples_per_prompt,
                      max_new_tokens=ev.max_new_tokens or cfg.rollout.max_new_tokens,
                      temperature=0.0 if ev.greedy else cfg.rollout.temperature,
                      top_p=1.0 if ev.greedy else cfg.rollout.top_p)
    return replace(cfg, pipeline="eval", rollout=rollout)


EVAL_SEED_OFFSET = 7_777_777   # every evaluation of a run samples with the same seed: the steps are comparable


def eval_due(cfg: Config, step: int) -> bool:
    """Whether eval.* measures after `step`: before the first (0), every `eval.every` steps, after the last."""
    every = cfg.eval.every
    return step == 0 or step == cfg.steps or (every > 0 and step % every == 0)


class InLoopEval:
    """eval.* in an online loop: `due(step)` and `run(roles, step)` -> the eval/* metrics of that step."""

    def __init__(self, cfg: Config, run, roles) -> None:
        self.cfg, self.run, self.roles = cfg, run, roles
        self.on = run.eval is not None
        # a pairwise or listwise training judge ranks answers within a group: one answer per prompt has no score
        relative = cfg.feedback.source == "judge" and cfg.feedback.judge.mode in ("pairwise", "listwise")
        self.train_scored = not (relative and cfg.eval.samples_per_prompt < 2)
        if self.on and not self.train_scored:
            tqdm.write(f"[openrlaif] eval: the training judge (mode={cfg.feedback.judge.mode}) compares answers "
                       "within a group, so eval/train_reward is not logged with one answer per prompt (set "
                       "eval.greedy=false eval.samples_per_prompt=4 for it)")

    def due(self, step: int) -> bool:
        return self.on and eval_due(self.cfg, step)

    def run_eval(self, step: int) -> dict[str, float]:
        from openrlaif.batch import Batch
        from openrlaif.rollout.launch import generate
        cfg, roles, name = self.cfg, self.roles, self.cfg.eval.name
        start = time.perf_counter()
        batch = generate(roles, self.run.eval.prompts, eval_sampling(cfg), self.run.tokenizer,
                         seed=cfg.seed * 10_000 + EVAL_SEED_OFFSET)
        generated = time.perf_counter()
        prompts, responses = batch.meta["prompt"], batch.meta["response"]
        groups, conversations = batch["group_ids"].tolist(), batch.meta["conversation"]
        out = {"eval/response_length": float(batch["response_mask"].sum()) / len(batch),
               "eval/finished_fraction": float(batch["finished"].float().mean())}
        train = gold = None
        if self.train_scored:
            from openrlaif.pipelines.online_rl import score_batch
            train = score_batch(roles.feedback, batch)   # as the training step scores (env rewards, errors masked)
            out["eval/train_reward"] = train.mean()
            out["eval/train_failure_rate"] = float((~train.valid).float().mean())
        measuring = roles.eval.feedback if roles.eval is not None else None
        if measuring is not None:
            gold = measuring.score(prompts, responses, group_ids=groups, conversations=conversations)
            out[f"eval/{name}_reward"] = gold.mean()
            out[f"eval/{name}_reward_sem"] = gold.sem()   # of the mean over the eval answers
            out[f"eval/{name}_failure_rate"] = float((~gold.valid).float().mean())
            if "eval/train_reward" in out:
                out["eval/reward_gap"] = out["eval/train_reward"] - out[f"eval/{name}_reward"]
        if roles.reference is not None and roles.actor is not None:
            out["eval/kl"] = sequence_kl(roles, Batch({k: batch[k] for k in
                                                       ("input_ids", "attention_mask", "response_mask")}))
        self.write_samples(step, prompts, responses, train, gold)
        out["time/eval_s"] = time.perf_counter() - start
        out["time/eval_generate_s"] = generated - start
        tqdm.write(f"[openrlaif] eval at step {step}: " + " | ".join(
            f"{key[len('eval/'):]} {value:.4g}" for key, value in out.items() if key.startswith("eval/")))
        return out


    def write_samples(self, step: int, prompts: list[str], responses: list[str], train, gold) -> None:
        """<output.dir>/eval_samples.jsonl: every eval answer with its scores (None = no verdict), one row each,
        so a run's answers can be read and compared prompt by prompt across steps."""
        def scores(result):
            return [float(r) if bool(v) else None for r, v in zip(result.rewards, result.valid)] if result else None
        train_scores, gold_scores = scores(train), scores(gold)
        with open(os.path.join(self.run.out_dir, "eval_samples.jsonl"), "a") as handle:
            for i, (prompt, response) in enumerate(zip(prompts, responses)):
                row = {"step": step, "prompt": prompt, "response": response,
                       "train_reward": train_scores[i] if train_scores else None}
                if gold_scores is not None:
                    row[f"{self.cfg.eval.name}_reward"] = gold_scores[i]
                handle.write(json.dumps(row) + "\n")


def sequence_kl(roles, batch) -> float:
    """Mean over the eval answers of Σ_t (log π − log π_ref) on their tokens: KL(π ‖ π_ref) per answer when the
    answers are sampled from π (eval.greedy=false); on greedy answers, the same sum as a measure of drift."""
    import ray
    actor = roles.actor.map(lambda w, shard: w.logprobs.remote(shard), batch.split(min(len(roles.actor), len(batch))))
    ref = roles.reference.map(lambda w, shard: w.logprobs.remote(shard),
                              batch.split(min(len(roles.reference), len(batch))))
    results = ray.get(actor + ref)
    policy, reference = torch.cat(results[:len(actor)]), torch.cat(results[len(actor):])
    return float(((policy - reference) * batch["response_mask"]).sum(-1).mean())


# --------------------------------------------------------------------------------------------------------- win rate

def wilson_interval(wins: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion `wins / n` (wins may hold halves for ties)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = wins / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (0.0 if wins <= 0 else max(0.0, centre - half)), (1.0 if wins >= n else min(1.0, centre + half))


def win_rate(outcomes: list[float | None]) -> dict[str, float]:
    """Outcomes per comparison: 1 (policy wins), 0.5 (tie), 0 (baseline wins), None (not judged: left out)."""
    judged = [o for o in outcomes if o is not None]
    n = len(judged)
    wins, ties = sum(o == 1.0 for o in judged), sum(o == 0.5 for o in judged)
    score = wins + 0.5 * ties
    low, high = wilson_interval(score, n)
    return {"win_rate": score / n if n else float("nan"), "ci95_low": low, "ci95_high": high,
            "wins": float(wins), "ties": float(ties), "losses": float(n - wins - ties), "compared": float(n),
            "not_judged": float(len(outcomes) - n)}


def outcome(p_policy: float | None, tie: float = 1e-9) -> float | None:
    if p_policy is None or not math.isfinite(p_policy):
        return None
    return 0.5 if abs(p_policy - 0.5) <= tie else float(p_policy > 0.5)


# --------------------------------------------------------------------------------------------------- openrlaif eval

def train(cfg: Config) -> dict:
    """pipeline=eval: sample the model's (and the baseline's) answers on eval.prompts, score them with
    eval.feedback, compare them. Writes <output.dir>/eval.json and eval_samples.jsonl."""
    from openrlaif.pipelines.common import load_tokenizer, prepare_output_dir, release
    from openrlaif.roles import Roles, start_rollout, threads_per_worker, wait_until_ready
    from openrlaif.rollout.launch import generate
    from openrlaif.runtime import ray_session

    model_path = resolve_model_path(cfg.model.path, cache_dir(cfg.model))
    tokenizer = load_tokenizer(model_path, cfg)
    inputs = prepare_eval(cfg, tokenizer)
    out_dir = prepare_output_dir(cfg)
    plan = {"rollout": cfg.rollout.resources} | eval_plan(cfg, inputs)
    cpus = sum(r.num_cpus * r.num_workers for r in plan.values())
    sampling = eval_sampling(cfg)
    answers = {}
    with ray_session(cfg.cluster, cpus):
        for who, path in (("policy", model_path), ("baseline", inputs.baseline_path)):
            if path is None:
                continue
            group = start_rollout(cfg, path, threads_per_worker(cfg, cfg.rollout.resources.num_workers), sampling)
            try:
                wait_until_ready([group])
                roles = Roles(None, None, group, None, None)
                batch = generate(roles, inputs.prompts, sampling, tokenizer, seed=cfg.seed * 10_000 + EVAL_SEED_OFFSET)
            finally:
                group.shutdown()   # one engine at a time: the baseline's loads after the policy's is gone
            answers[who] = batch
        evaluation = start_eval(cfg, inputs, out_dir, lambda role: threads_per_worker(cfg, plan[role].num_workers))
        try:
            wait_until_ready(list(evaluation.groups.values()))
            report = score_answers(cfg, evaluation, answers)
        finally:
            for group in evaluation.groups.values():
                group.shutdown()
    write_report(out_dir, cfg, answers, report)
    release(out_dir)
    return {"checkpoint": None, "metrics": report, "out_dir": out_dir}


def score_answers(cfg: Config, evaluation: EvalRoles, answers: dict) -> dict[str, float]:
    name = cfg.eval.name
    policy = answers["policy"]
    prompts, conversations = policy.meta["prompt"], policy.meta["conversation"]
    groups = policy["group_ids"].tolist()
    report: dict[str, float] = {"prompts": float(len(set(groups))), "answers": float(len(policy)),
                                "response_length": float(policy["response_mask"].sum()) / len(policy)}
    scored = {}
    for who, batch in answers.items():
        result = evaluation.feedback.score(batch.meta["prompt"], batch.meta["response"],
                                           group_ids=batch["group_ids"].tolist(),
                                           conversations=batch.meta["conversation"])
        scored[who] = result
        batch.meta["measured"] = [float(r) if ok else None   # per answer, for eval_samples.jsonl
                                  for r, ok in zip(result.rewards.tolist(), result.valid.tolist())]
        prefix = "" if who == "policy" else "baseline_"
        report[f"{prefix}{name}_reward"] = result.mean()
        report[f"{prefix}failure_rate"] = float((~result.valid).float().mean())
    if "baseline" in answers:
        baseline = answers["baseline"].meta["response"]
        if answers["baseline"].meta["prompt"] != prompts:   # both sampled the same prompts in the same order
            raise RuntimeError("the baseline's answers are not to the same prompts as the policy's")
        if evaluation.judge is not None:   # the measuring judge compares the two answers, both orders
            judge_cfg = evaluation.judge.cfg
            evaluation.judge.cfg = replace(judge_cfg, swap=True)
            try:
                comparisons = evaluation.judge.compare(prompts, policy.meta["response"], baseline, conversations)
            finally:
                evaluation.judge.cfg = judge_cfg
            outcomes = [outcome(p) for p in comparisons.prob]
            report["win_rate_by"] = "judge"
        else:
            mine, theirs = scored["policy"], scored["baseline"]
            outcomes = [None if not (mine.valid[i] and theirs.valid[i]) else
                        outcome(0.5 + 0.5 * float(torch.sign(mine.rewards[i] - theirs.rewards[i])))
                        for i in range(len(policy))]
            report["win_rate_by"] = "score"
        report |= win_rate(outcomes)
    return report


def write_report(out_dir: str, cfg: Config, answers: dict, report: dict) -> None:
    with open(os.path.join(out_dir, "eval.json"), "w") as handle:
        json.dump({"model": cfg.model.path, "baseline": cfg.eval.baseline or None, **report}, handle, indent=2)
    with open(os.path.join(out_dir, "eval_samples.jsonl"), "w") as handle:
        for i, prompt in enumerate(answers["policy"].meta["prompt"]):
            row = {"prompt": prompt, "response": answers["policy"].meta["response"][i],
                   f"{cfg.eval.name}_reward": answers["policy"].meta["measured"][i]}   # None: not scored
            if "baseline" in answers:
                row["baseline_response"] = answers["baseline"].meta["response"][i]
                row[f"baseline_{cfg.eval.name}_reward"] = answers["baseline"].meta["measured"][i]
            handle.write(json.dumps(row) + "\n")
    name = cfg.eval.name
    print(f"[openrlaif] eval report: {os.path.join(out_dir, 'eval.json')}")
    line = f"{name} reward {report[f'{name}_reward']:.4f} over {int(report['answers'])} answers"
    if "win_rate" in report:
        line += (f" | baseline {report[f'baseline_{name}_reward']:.4f} | win rate {report['win_rate']:.3f} "
                 f"[{report['ci95_low']:.3f}, {report['ci95_high']:.3f}] ({int(report['wins'])} wins, "
                 f"{int(report['ties'])} ties, {int(report['losses'])} losses; by {report['win_rate_by']})")
    print(line)


NAME = re.compile(r"^[A-Za-z0-9_]+$")


def validate_eval(cfg: Config) -> None:
    """eval.* at start-up, with the keys named."""
    ev = cfg.eval
    if ev.every < 0:
        raise ConfigError(f"eval.every={ev.every} must be >= 0 (0 = before the first step and after the last).")
    if ev.samples_per_prompt < 1 or ev.max_new_tokens < 0:
        raise ConfigError("eval.samples_per_prompt must be >= 1 and eval.max_new_tokens >= 0 (0 = "
                          "rollout.max_new_tokens).")
    if ev.greedy and ev.samples_per_prompt > 1:
        raise ConfigError(f"eval.samples_per_prompt={ev.samples_per_prompt} with eval.greedy=true would be the same "
                          "answer repeated. Fix: eval.greedy=false to sample, or eval.samples_per_prompt=1.")
    if not NAME.match(ev.name):
        raise ConfigError(f"eval.name={ev.name!r}: letters, digits and _ only (it names eval/<name>_reward).")
    fb = ev.feedback
    if fb.source not in ("", "function", "judge", "reward_model"):
        raise ConfigError(f"eval.feedback.source={fb.source!r} must be one of '', function, judge, reward_model.")
    if fb.source == "function" and ":" not in fb.function:
        raise ConfigError(f"eval.feedback.function={fb.function!r} must name a callable as 'package.module:name'. "
                          "Fix: e.g. eval.feedback.function=openrlaif.feedback.gold:concise")
    if fb.source == "reward_model" and not fb.reward_model.path:
        raise ConfigError("eval.feedback.source=reward_model needs eval.feedback.reward_model.path.")
    if fb.source == "judge":
        if fb.judge.backend == "http" and not fb.judge.base_url:
            raise ConfigError("eval.feedback.judge.backend=http needs eval.feedback.judge.base_url.")
        if fb.judge.follow_policy:
            raise ConfigError("eval.feedback.judge.follow_policy=true would measure the policy with itself. Fix: "
                              "a fixed judge (a model folder or an endpoint).")
        if fb.judge.mode == "listwise":
            raise ConfigError("eval.feedback.judge.mode=listwise gives ranks within a group, not a score per answer. "
                              "Fix: pointwise or pairwise.")
    if ev.pairs:
        from openrlaif.algorithms.preference import PREFERENCE_LOSSES
        if cfg.pipeline != "preference" or cfg.algorithm.loss not in PREFERENCE_LOSSES:
            raise ConfigError(f"eval.pairs measures a pairwise preference loss's implicit reward on held-out pairs "
                              f"(pipeline=preference with algorithm.loss in {sorted(PREFERENCE_LOSSES)}); here "
                              f"pipeline={cfg.pipeline}, algorithm.loss={cfg.algorithm.loss}. Fix: eval.pairs=\"\" "
                              "(for a reward model, data.eval_fraction holds pairs out).")
    if cfg.pipeline == "eval":   # its own checks are `validate`'s
        return
    if ev.baseline:
        raise ConfigError("eval.baseline is for `openrlaif eval <model> eval.baseline=<model>` (pipeline=eval); in a "
                          "training run the policy is measured against its own start at step 0.")
    if (ev.prompts or fb.source) and cfg.pipeline not in ONLINE_PIPELINES:
        raise ConfigError("eval.* runs in the loop of pipeline=online_rl, online_dpo and rejection_sampling; "
                          f"pipeline={cfg.pipeline} "
                          "has none. Fix: score its checkpoint with `openrlaif eval <checkpoint> eval.prompts=...`.")
    if fb.source and not ev.prompts:
        raise ConfigError("eval.feedback is set but eval.prompts is empty: nothing would be evaluated. Fix: "
                          "eval.prompts=<held-out prompts jsonl> (or demo).")


def validate(cfg: Config) -> None:
    """pipeline=eval's own checks (`validate_eval` checks eval.* for every pipeline): prompts, and what measures."""
    if not cfg.eval.prompts:
        raise ConfigError("openrlaif eval needs eval.prompts (a jsonl of {\"prompt\": ...} rows, or demo).")
    if not cfg.eval.feedback.source:
        raise ConfigError("openrlaif eval needs eval.feedback.source (function, judge or reward_model): what "
                          "measures the answers. Fix: e.g. eval.feedback.source=function "
                          "eval.feedback.function=openrlaif.feedback.gold:concise")
