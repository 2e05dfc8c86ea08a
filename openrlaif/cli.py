"""`openrlaif <command> [hydra overrides]`. Commands: train, judge-eval, eval, plot, serve-labeller.

    openrlaif train                                   # the embedded default (SmolLM2 + SmolLM2 judge, GRPO)
    openrlaif train model.path=/ckpt/my-model rollout.engine=hf steps=20
    openrlaif train pipeline=preference algorithm=dpo data.pairs=pairs.jsonl
    openrlaif train pipeline=label feedback=judge_pairwise          # judge-labelled pairs.jsonl from a prompt set
    openrlaif train pipeline=online_dpo algorithm=dpo feedback=self_judge   # self-rewarding online DPO
    openrlaif train pipeline=constitutional                         # critique -> revise -> SFT
    openrlaif train --cfg job                         # print the composed config (any Hydra flag works)
    openrlaif judge-eval feedback=judge_pairwise data.pairs=labelled.jsonl   # judge vs gold labels
    openrlaif plot runs/my-run                        # metrics.jsonl -> runs/my-run/metrics.png
    openrlaif eval runs/my-run/checkpoint eval.prompts=held_out.jsonl eval.feedback.source=function \
        eval.feedback.function=openrlaif.feedback.gold:concise eval.baseline=smollm2-135m-instruct   # win rate
    openrlaif serve-labeller --port 8000 --accuracy 0.8 --position-bias 2   # a simulated AI labeller endpoint
"""
from __future__ import annotations

import os
import sys

COMMANDS = {"demo": "what `make demo` runs: GRPO on SmolLM2 against a simulated AI labeller, measured on held-out "
                    "prompts by a gold rule; ends with metrics.png and what rose",
            "train": "run a training job: pipeline=online_rl (default: PPO, GRPO family, REINFORCE++, ReMax), "
                     "preference (DPO family, KTO, BCO, LiPO), reward_model, sft, label, online_dpo, constitutional",
            "judge-eval": "score the judge against a labelled pairs file: agreement, position consistency, failures",
            "plot": "render a run's metrics.jsonl to PNG: openrlaif plot RUN_DIR [--out F.png] [--keys a,b]",
            "eval": "score a model on eval.prompts with eval.feedback; eval.baseline=M adds a win rate with a 95% CI",
            "serve-labeller": "serve a simulated AI labeller (gold rule + accuracy, position/length bias, "
                              "inconsistency) as an OpenAI-compatible endpoint with log-probs"}


def _config_dir() -> str:
    """configs/ beside the package (source checkout, editable install) or $OPENRLAIF_CONFIG_DIR."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("OPENRLAIF_CONFIG_DIR") or os.path.join(os.path.dirname(here), "configs")


def _train(overrides: list[str]) -> int:
    import hydra
    from omegaconf import OmegaConf

    from openrlaif.checkpointing import RunError
    from openrlaif.config import Config, ConfigError, check_known_keys, register_configs, validate

    register_configs()
    config_dir = _config_dir()
    if not os.path.isfile(os.path.join(config_dir, "config.yaml")):
        print(f"error: no configs/config.yaml under {config_dir}. Fix: run from a source checkout, or set "
              "OPENRLAIF_CONFIG_DIR to the configs folder.", file=sys.stderr)
        return 2
    outcome = {"code": 0}

    @hydra.main(version_base=None, config_path=config_dir, config_name="config")
    def main(cfg) -> None:
        try:
            check_known_keys(cfg)
            config: Config = OmegaConf.to_object(cfg)
            validate(config)
            from openrlaif.pipelines import run
            run(config)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            outcome["code"] = 2
        except RunError as err:   # stopped part-way (a role died): what happened and how to resume
            print(f"error: {err}", file=sys.stderr)
            outcome["code"] = 1
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C). A run with resumable checkpoints (output.checkpoint_every=N) "
                  "continues with the same command and resume=true.", file=sys.stderr)
            outcome["code"] = 130

    sys.argv = ["openrlaif train", *overrides]
    try:
        main()
    except SystemExit as exit_:   # Hydra exits 1 on a bad override after printing why
        return int(exit_.code or 0)
    return outcome["code"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        for name, what in COMMANDS.items():
            print(f"  {name:10s} {what}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return _train(rest)
    if command == "judge-eval":
        return _train(["pipeline=judge_eval", *rest])
    if command == "demo":
        from openrlaif.demo import main as demo
        return demo(rest)
    if command == "eval":
        if not rest or "=" in rest[0] or rest[0].startswith("-"):
            print("error: usage: openrlaif eval MODEL [overrides]: MODEL is a checkpoint folder (or a short name "
                  "such as smollm2-135m-instruct), then eval.prompts=... eval.feedback...=...", file=sys.stderr)
            return 2
        return _train(["pipeline=eval", f"model.path={rest[0]}", *rest[1:]])
    if command == "serve-labeller":
        from openrlaif.labeller import main as serve
        return serve(rest)
    if command == "plot":
        from openrlaif.plot import main as plot
        return plot(rest)
    print(f"error: unknown command {command!r}. Commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
