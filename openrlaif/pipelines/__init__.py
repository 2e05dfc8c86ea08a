"""Driver loops, one module per pipeline; `pipeline=<name>` picks the module whose train(cfg) runs."""
import importlib

PIPELINES = {"online_rl": "openrlaif.pipelines.online_rl", "preference": "openrlaif.pipelines.preference",
             "sft": "openrlaif.pipelines.sft", "reward_model": "openrlaif.pipelines.reward_model",
             "judge_eval": "openrlaif.pipelines.judge_eval", "online_dpo": "openrlaif.pipelines.online_dpo",
             "label": "openrlaif.pipelines.label", "constitutional": "openrlaif.pipelines.constitutional",
             "eval": "openrlaif.pipelines.evaluation", "rejection_sampling": "openrlaif.pipelines.rejection_sampling"}


def run(cfg) -> dict:
    return importlib.import_module(PIPELINES[cfg.pipeline]).train(cfg)
