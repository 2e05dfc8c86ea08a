"""The environment interface. One instance per episode (a trajectory): `reset(row)` gives the conversation the
policy answers first; `step(messages, assistant_turn)` reads the policy's turn and answers with the messages to
append (a tool's result, a simulated user's reply) or ends the episode, with a reward or None (None: the run's
`feedback` scores the trajectory)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from openrlaif.feedback.base import FeedbackResult


@dataclass
class EnvStep:
    observation: list[dict] | None      # messages to append after the assistant's turn; None: the episode is done
    reward: float | None = None         # the episode's reward when it is done, or None
    info: dict = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)   # env/<key> metrics, e.g. tool_errors/timeout: 1


class Environment(Protocol):
    def reset(self, row: dict) -> list[dict]: ...

    def step(self, messages: list[dict], assistant_turn: str) -> EnvStep: ...


class SingleTurn:
    """Today's rollouts as an environment: the row's conversation, one answer, done."""

    def reset(self, row: dict) -> list[dict]:
        return list(row["messages"])

    def step(self, messages: list[dict], assistant_turn: str) -> EnvStep:
        return EnvStep(None)


class EnvReward:
    """feedback.source=env: each episode's reward as its environment gave it; an episode that ended without one
    (cut by a budget, or an environment that leaves scoring to a judge) is masked and counted as `no_env_reward`."""

    def score(self, prompts: list[str], responses: list[str], group_ids: list[int] | None = None,
              conversations: list[list[dict]] | None = None, env_rewards: list[float | None] | None = None
              ) -> FeedbackResult:
        if env_rewards is None:
            raise ValueError("feedback.source=env scores episodes: the batch has no env rewards (env.name unset?)")
        return FeedbackResult.from_scores(env_rewards, [None if r is not None else "no_env_reward"
                                                        for r in env_rewards])
