"""Test environments whose turns do not depend on what the (random) tiny model writes."""
from openrlaif.envs import EnvStep


class GoOn:
    """Asks for more after every assistant turn; on turn `turns` it ends the episode with a reward: the share of
    the episode's assistant characters that are not spaces (dense, so GRPO's groups differ)."""

    def __init__(self, turns: int = 3) -> None:
        self.turns, self.seen = turns, []

    def reset(self, row: dict) -> list[dict]:
        return list(row["messages"])

    def step(self, messages: list[dict], assistant_turn: str) -> EnvStep:
        self.seen.append(assistant_turn)
        if len(self.seen) == self.turns:
            text = "".join(self.seen)
            return EnvStep(None, sum(not c.isspace() for c in text) / max(len(text), 1))
        return EnvStep([{"role": "user", "content": f"Go on ({len(self.seen)})."}], counts={"asked_more": 1})


def non_space_share(prompts: list[str], responses: list[str]) -> list[float]:
    """A dense rule for the random tiny model (as GoOn's reward): the share of a response's characters that are
    not spaces."""
    return [sum(not c.isspace() for c in text) / max(len(text), 1) for text in responses]
