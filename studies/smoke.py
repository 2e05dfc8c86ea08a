"""Every study's --quick run in one process (one Ray cluster for all): `python studies/smoke.py --out DIR`. The
e2e tests run this; each study's JSON and PNG land in DIR."""
import argparse
import importlib
import sys

STUDIES = ["position_swap", "robust_dpo", "rlaif_variants", "repeat_ranking", "remax_ppo_grpo", "overoptimisation",
           "tool_learning"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    for name in STUDIES:
        sys.argv = [f"{name}.py", "--quick", "--out", args.out]
        importlib.import_module(name).main()


if __name__ == "__main__":
    main()
