"""Environments for multi-turn rollouts, by the name users type (`env.name=tool_use`), or a user class as
`package.module:Class` with `env.kwargs`. One instance per episode; see base.py for the interface."""
from __future__ import annotations

import importlib
import inspect

from openrlaif.config import ConfigError
from openrlaif.envs.base import EnvReward, Environment, EnvStep, SingleTurn
from openrlaif.envs.tools import ToolUse
from openrlaif.envs.user import SimulatedUser

ENVIRONMENTS = {"single_turn": SingleTurn, "tool_use": ToolUse, "simulated_user": SimulatedUser}


def env_class(name: str):
    """The class `env.name` names (checked at start-up, with the fix)."""
    if name in ENVIRONMENTS:
        return ENVIRONMENTS[name]
    module_name, _, attr = name.partition(":")
    if not attr:
        raise ConfigError(f"env.name={name!r} is not one of {sorted(ENVIRONMENTS)} nor 'package.module:Class'. "
                          "Fix: env.name=tool_use, or your own class as env.name=my_pkg.envs:MyEnv.")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"env.name={name!r}: cannot load it ({err}). Fix: make the module importable "
                          "(installed, or on PYTHONPATH) or correct the name.") from None
    for verb in ("reset", "step"):
        if not callable(getattr(cls, verb, None)):
            raise ConfigError(f"env.name={name!r} has no {verb}() method: an environment needs reset(row) -> "
                              "messages and step(messages, assistant_turn) -> EnvStep.")
    return cls


def make_env(name: str, kwargs: dict, user_backend=None) -> Environment:
    """A new episode's environment. `user_backend`: the run's local user model (env.user_sim), for an environment
    whose constructor takes `backend` (simulated_user)."""
    cls = env_class(name)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise ConfigError(f"env.kwargs={dict(kwargs)} do not fit {name}{inspect.signature(cls)}: {err}. Fix: pass "
                          "only the keyword arguments it takes (env.kwargs.<name>=...).") from None
    if user_backend is not None and "backend" in inspect.signature(cls).parameters:
        return cls(**kwargs, backend=user_backend)
    return cls(**kwargs)


def env_factory(env_cfg):
    """A callable making a new episode's environment for `env.*`, or None when there is none (single-turn)."""
    if not env_cfg.name or env_cfg.name == "agent":   # none, or a black-box agent (rollout/agents.py)
        return None
    return lambda: make_env(env_cfg.name, env_cfg.kwargs)


__all__ = ["ENVIRONMENTS", "EnvReward", "Environment", "EnvStep", "SimulatedUser", "SingleTurn", "ToolUse", "env_class", "env_factory", "make_env"]
