"""Multi-turn episodes with token-exact rows (env.*).

Each episode starts from the engines' first-turn samples (the same requests as a single-turn rollout: n per
prompt). After every assistant turn the environment answers; its messages are rendered with the chat template's
turn markers, tokenised once and appended as ids, and the next turn is sampled from the exact ids so far (prefix
caching reuses them on vLLM). The training row is those ids: the prompt, then every generated token and every
observation token in order; `response_mask` covers only the policy's own tokens, `rollout_logprobs` holds the
engine's log-prob of each of them. The decoded conversation is never re-tokenised.

An episode ends when the environment says so, after `env.max_turns` turns, or when a turn or the next observation
would pass `env.max_total_tokens` (it is cut there; counted as env/truncated). A turn cut at
`rollout.max_new_tokens` still goes to the environment, as verl's agent loop does (a tool call in it is run, no call
ends the episode); the template's end-of-turn marker is then appended with the observation."""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import ray
import torch

from openrlaif.batch import Batch, prompt_response_layout, split_evenly
from openrlaif.config import Config, ConfigError
from openrlaif.rollout.types import Completion, SamplingSpec

if TYPE_CHECKING:
    from openrlaif.envs import Environment
    from openrlaif.roles import Roles

_USER, _ASSISTANT = "\x01probe-user\x01", "\x01probe-assistant\x01"


@dataclass
class Episode:
    prompt_index: int
    env: Environment
    messages: list[dict]                  # the conversation so far, as the environment sees it
    ids: list[int] = field(default_factory=list)          # response ids: generated and observation tokens
    policy: list[float] = field(default_factory=list)     # 1 for a generated token, 0 for an observation token
    logprobs: list[float] = field(default_factory=list)   # the engine's log-prob per response id (0 off-policy)
    turns: int = 0
    done: bool = False
    ended_by_env: bool = False            # the environment ended it (not a budget)
    finished: bool = False                # its last turn ended with an end-of-turn token (not cut)
    truncated: bool = False
    reward: float | None = None
    turn_rewards: list = field(default_factory=list)      # per turn: the reward the environment gave with its
                                                          # observation, or None (feedback.per_turn, source=env)
    error: str = ""                       # the environment raised: the episode is masked (feedback/failures/env_error)
    prompt_ids: list[int] | None = None   # a black-box agent's own first request (else the dataset prompt's)
    prompt_messages: list[dict] | None = None
    counts: Counter = field(default_factory=Counter)


class TurnTemplate:
    """How the chat template frames what follows an assistant turn, found once by rendering a probe conversation:
    the text that closes an assistant turn after its content (ChatML: "<|im_end|>\\n"), and the rendering of any
    observation messages up to the next assistant generation prompt."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        probe = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}]
        self.base = tokenizer.apply_chat_template(probe, tokenize=False)
        if _ASSISTANT not in self.base:
            raise ConfigError("env.*: the chat template does not render an assistant turn's content, so "
                              "observations cannot be placed after it. Fix: a model whose template renders "
                              "assistant messages (any instruct model's).")
        close = self.base[self.base.rindex(_ASSISTANT) + len(_ASSISTANT):]
        self.close_ids = self.encode(close)
        self.probe = probe

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def observation_ids(self, observation: list[dict], turn_ids: list[int]) -> list[int]:
        """The ids to append after an assistant turn that ended with its end-of-turn token (`turn_ids`' last):
        the rest of the template's turn closing, the observation messages, the next generation prompt."""
        full = self.tokenizer.apply_chat_template(self.probe + observation, tokenize=False,
                                                  add_generation_prompt=True)
        if not full.startswith(self.base):
            raise ValueError("the chat template renders the earlier turns differently once an observation follows")
        close = self.close_ids
        if close and turn_ids and turn_ids[-1] == close[0]:   # the model wrote the template's own end token
            close = close[1:]                                  # (a cut turn gets the whole closing)
        return close + self.encode(full[len(self.base):])


def run_episodes(sample, prompts: list, first_turns: list[Completion], cfg: Config, tokenizer, seed: int,
                 user_backend=None) -> Batch:
    """Play every first-turn sample out as an episode; the rows, masks and per-episode env results as a Batch.
    `sample(contexts, spec)` answers each context once, in order (the engines: `engine_sampler(roles)`);
    `user_backend`: the run's local user model (env.user_sim), handed to each simulated_user episode."""
    from openrlaif.envs import make_env
    template = TurnTemplate(tokenizer)
    episodes = []
    for completion in first_turns:
        env = make_env(cfg.env.name, cfg.env.kwargs, user_backend)
        row = prompts[completion.prompt_index].row
        episode = Episode(completion.prompt_index, env, list(prompts[completion.prompt_index].messages))
        try:
            episode.messages = env.reset(row)
        except Exception as err:   # a user environment's bug: this episode is masked and counted, the run goes on
            fail(episode, err, "reset")
        episodes.append(episode)
    spec = SamplingSpec(n=1, max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                        top_p=cfg.rollout.top_p)
    turns = first_turns
    with ThreadPoolExecutor(max_workers=8) as pool:   # tools (subprocesses) of all episodes at once
        for turn in range(cfg.env.max_turns):
            active = [e for e in episodes if not e.done]
            list(pool.map(lambda pair: take_turn(pair[0], pair[1], template, cfg), zip(active, turns)))
            active = [e for e in episodes if not e.done]
            if not active or turn + 1 == cfg.env.max_turns:
                break
            turns = sample([prompts[e.prompt_index].token_ids + e.ids for e in active],
                           replace(spec, seed=seed + 7_919 * (turn + 1)))
    for episode in episodes:
        if not episode.done:   # out of turns with an observation pending: it ends where it is
            episode.done = episode.truncated = True
    return episodes_to_batch(prompts, episodes, tokenizer)


def greedy_baselines(sample, prompts: list, greedy_first_turns: list[Completion], cfg: Config, tokenizer, seed: int,
                     batch: Batch, user_backend=None) -> None:
    """ReMax over episodes: each prompt's greedy first turn played out as an episode at temperature 0; its rendering
    and environment reward become every sample's `baseline_response` / `baseline_env_reward` (by prompt)."""
    greedy_cfg = replace(cfg, rollout=replace(cfg.rollout, temperature=0.0, top_p=1.0))
    baselines = run_episodes(sample, prompts, greedy_first_turns, greedy_cfg, tokenizer, seed, user_backend)
    by_prompt = {int(group): row for row, group in enumerate(baselines["group_ids"].tolist())}
    rows = [by_prompt[int(group)] for group in batch["group_ids"].tolist()]
    batch.meta["baseline_response"] = [baselines.meta["response"][r] for r in rows]
    batch.meta["baseline_env_reward"] = [baselines.meta["env_reward"][r] for r in rows]


def take_turn(episode: Episode, completion: Completion, template: TurnTemplate, cfg: Config) -> None:
    """Append the turn's tokens; ask the environment for its answer unless the episode's budget is spent."""
    budget = cfg.env.max_total_tokens - len(episode.ids)
    tokens, logprobs = completion.token_ids[:budget], completion.logprobs[:budget]
    episode.ids += tokens
    episode.policy += [1.0] * len(tokens)
    episode.logprobs += logprobs
    episode.turns += 1
    episode.turn_rewards.append(None)
    episode.finished = completion.finished and len(tokens) == len(completion.token_ids)
    text = template.tokenizer.decode(tokens, skip_special_tokens=True)
    if len(tokens) < len(completion.token_ids):   # the episode's token budget is spent
        episode.messages.append({"role": "assistant", "content": text})
        episode.done = episode.truncated = True
        return
    if episode.error:   # its reset failed: the turn is kept for the row's shape, the episode ends masked
        episode.done = True
        return
    try:
        result = episode.env.step(episode.messages, text)
    except Exception as err:   # a user environment's (or agent's) bug: masked and counted, never a crashed run
        episode.messages.append({"role": "assistant", "content": text})
        fail(episode, err, "step")
        return
    episode.messages.append({"role": "assistant", "content": text})
    episode.counts.update(result.counts)
    if result.observation is None:
        episode.done, episode.ended_by_env, episode.reward = True, True, result.reward
        return
    try:
        observation = template.observation_ids(result.observation, tokens)
    except Exception as err:   # a template that cannot render the observation: counted, the episode ends
        episode.counts[f"observation_errors/{type(err).__name__}"] += 1
        episode.done = episode.truncated = True
        return
    if len(observation) >= cfg.env.max_total_tokens - len(episode.ids):   # no room left for another turn
        episode.done = episode.truncated = True
        return
    episode.messages += result.observation
    episode.turn_rewards[-1] = result.reward
    episode.ids += observation
    episode.policy += [0.0] * len(observation)
    episode.logprobs += [0.0] * len(observation)


def fail(episode: Episode, err: Exception, verb: str) -> None:
    episode.done, episode.error = True, f"env.{verb} raised {type(err).__name__}: {err}"[:300]
    episode.counts[f"env_errors/{type(err).__name__}"] += 1


def engine_sampler(roles: Roles):
    """`sample(contexts, spec)` over the rollout engines: one sample per context, spread over the engines, in
    context order."""
    def sample(contexts: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        spans = split_evenly(len(contexts), len(roles.rollout))
        refs = roles.rollout.map(lambda worker, span: worker.generate.remote(
            contexts[span], replace(spec, seed=spec.seed + span.start)), spans)
        out = []
        for span, shard in zip(spans, ray.get(refs)):
            for completion in shard:
                completion.prompt_index += span.start
                out.append(completion)
        return sorted(out, key=lambda c: c.prompt_index)
    return sample


def episodes_to_batch(prompts: list, episodes: list[Episode], tokenizer) -> Batch:
    def prompt_ids(e: Episode) -> list[int]:
        return e.prompt_ids if e.prompt_ids is not None else prompts[e.prompt_index].token_ids

    def prompt_messages(e: Episode) -> list[dict]:
        return e.prompt_messages if e.prompt_messages is not None else prompts[e.prompt_index].messages
    layout = prompt_response_layout([prompt_ids(e) for e in episodes], [e.ids for e in episodes],
                                    tokenizer.pad_token_id)
    width = layout["response_mask"].shape[1]

    def padded(values: list[float]) -> list[float]:
        return values + [0.0] * (width - len(values))
    layout["response_mask"] = torch.tensor([padded(e.policy) for e in episodes], dtype=torch.float32)
    batch = Batch(
        {**layout, "rollout_logprobs": torch.tensor([padded(e.logprobs) for e in episodes], dtype=torch.float32),
         "group_ids": torch.tensor([e.prompt_index for e in episodes], dtype=torch.long),
         "finished": torch.tensor([e.finished for e in episodes], dtype=torch.bool)},
        {"prompt": [prompts[e.prompt_index].text for e in episodes],
         "response": [render_episode(e.messages[len(prompt_messages(e)):]) for e in episodes],
         "conversation": [prompt_messages(e) for e in episodes],
         "trajectory": [e.messages for e in episodes],
         "env_reward": [e.reward for e in episodes],
         "env_turn_rewards": [e.turn_rewards for e in episodes],
         "env_turns": [e.turns for e in episodes],
         "env_truncated": [e.truncated for e in episodes],
         "env_ended": [e.ended_by_env for e in episodes],
         "env_error": [e.error for e in episodes],
         "env_counts": [e.counts for e in episodes]})
    return batch


def turn_prefixes(batch: Batch) -> list[list[tuple[int, str, float | None]]]:
    """feedback.per_turn: for each row, its assistant turns but the last, each as (the response position of the
    turn's last token, the episode rendered up to and including that turn, the reward its environment gave with
    the turn's observation or None). An assistant turn is a run of policy tokens in `response_mask`; a row whose
    runs do not pair one to one with its trajectory's assistant messages (an episode whose reset raised) gets []:
    its whole trajectory is scored once, as without per_turn."""
    out = []
    env_turn_rewards = batch.meta.get("env_turn_rewards") or [[] for _ in range(len(batch))]
    for row, mask in enumerate(batch["response_mask"].tolist()):
        ends = [t for t, m in enumerate(mask) if m > 0 and (t + 1 == len(mask) or mask[t + 1] == 0)]
        start = len(batch.meta["conversation"][row])
        trajectory = batch.meta["trajectory"][row]
        assistant = [i for i in range(start, len(trajectory)) if trajectory[i]["role"] == "assistant"]
        if len(ends) != len(assistant):
            out.append([])
            continue
        rewards = list(env_turn_rewards[row]) + [None] * len(ends)
        out.append([(ends[k], render_episode(trajectory[start:assistant[k] + 1]), rewards[k])
                    for k in range(len(ends) - 1)])
    return out


def render_episode(turns: list[dict]) -> str:
    """What a judge or a rule reads as the response: a single assistant turn as it is (as in a single-turn
    rollout); an episode as its turns in order, tool calls and results included ("Assistant: ...", "Tool: ...")."""
    if len(turns) == 1 and turns[0]["role"] == "assistant":
        return turns[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def env_metrics(batch: Batch) -> dict[str, float]:
    """env/*: turns and tokens per episode, the share cut by a budget, tool calls and errors by kind."""
    size = len(batch)
    policy_tokens = float(batch["response_mask"].sum())
    response_tokens = float(batch["attention_mask"][:, -batch["response_mask"].shape[1]:].sum())   # with observations
    totals = Counter()
    for counts in batch.meta["env_counts"]:
        totals.update(counts)
    out = {"env/turns_mean": sum(batch.meta["env_turns"]) / size,
           "env/truncated_fraction": sum(batch.meta["env_truncated"]) / size,
           "env/ended_by_env_fraction": sum(batch.meta["env_ended"]) / size,
           "env/policy_token_fraction": policy_tokens / max(response_tokens, 1.0),
           "env/policy_tokens_mean": policy_tokens / size,                      # tokens by source, per episode
           "env/env_tokens_mean": (response_tokens - policy_tokens) / size,
           "env/reward_missing": float(sum(r is None for r in batch.meta["env_reward"]))}
    for key, value in sorted(totals.items()):
        out[f"env/{key}"] = float(value)
    return out
