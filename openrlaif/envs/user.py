"""A simulated user: another model plays the user for up to `env.max_turns` turns, from a persona and a goal
(the row's "persona" / "goal", else the defaults), behind any OpenAI-compatible endpoint (`vllm serve`, a hosted
API, `tests/judge_server.py` in the tests) or as a local model in the run's `user_sim` worker group
(`env.user_sim.model`; the run hands every episode the group's `backend`, which gathers the concurrent episodes'
requests into one batch). It sees the conversation with the roles swapped (the policy's turns as
its "user" turns) and replies as the user; a reply holding `done_marker`, an empty reply or an endpoint failure
ends the episode (the failure counted as env/user_sim_errors/<kind>). The episode's reward is None: the run's
`feedback` (e.g. feedback=judge_trajectory) scores the whole conversation."""
from __future__ import annotations

from openrlaif.envs.base import EnvStep

PERSONA = ("You are a user talking to an AI assistant. Stay in character, write only your next message (one or two "
           "sentences), and when your goal is met or the assistant cannot help, reply with {done}.")


class SimulatedUser:
    def __init__(self, base_url: str = "", model: str = "user", api_key_env: str = "", max_tokens: int = 64,
                 temperature: float = 0.7, timeout_s: float = 30.0, max_retries: int = 2, persona: str = PERSONA,
                 done_marker: str = "[DONE]", backend=None) -> None:
        from openrlaif.feedback.backends import HTTPBackend
        # base_url "" and no backend: loading prompts before the user_sim group starts (validate_env checks that
        # one of them is set)
        self.backend = backend
        if backend is None and base_url:
            self.backend = HTTPBackend(base_url, model, api_key_env, timeout_s, max_retries, concurrency=1)
        self.max_tokens, self.temperature = max_tokens, temperature
        self.persona, self.done_marker = persona, done_marker
        self.system = ""

    def probe(self) -> None:
        """At start-up: the endpoint answers (ConfigError naming the URL otherwise)."""
        from openrlaif.config import ConfigError
        if not hasattr(self.backend, "probe"):   # a local user model: its group's start-up is the check
            return
        try:
            self.backend.probe()
        except ConfigError as err:   # the judge's probe, its keys named as they are here
            raise ConfigError(str(err).replace("feedback.judge.", "env.kwargs.")) from None

    def reset(self, row: dict) -> list[dict]:
        goal = row.get("goal") or "get a good answer to your first message"
        persona = row.get("persona") or self.persona.format(done=self.done_marker)
        first = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
        self.system = f"{persona}\nYour goal: {goal}\nYour first message was: {first}"
        return list(row["messages"])

    def step(self, messages: list[dict], assistant_turn: str) -> EnvStep:
        from openrlaif.feedback.backends import JudgeRequest
        if self.backend is None:
            raise RuntimeError("simulated_user has neither env.kwargs.base_url nor a user_sim group")
        swapped = {"user": "assistant", "assistant": "user"}
        turns = [{"role": swapped[m["role"]], "content": m["content"]} for m in messages if m["role"] in swapped]
        request = JudgeRequest([{"role": "system", "content": self.system}, *turns,
                                {"role": "user", "content": assistant_turn}], None, self.max_tokens,
                               self.temperature, seed=len(messages))
        reply = self.backend.complete([request])[0]
        if reply.failure:
            return EnvStep(None, None, {"detail": reply.detail}, counts={f"user_sim_errors/{reply.failure}": 1})
        text = reply.text.strip()
        if not text or self.done_marker in text:
            return EnvStep(None, None, {"done": True})
        return EnvStep([{"role": "user", "content": text}], None, counts={"user_turns": 1})
