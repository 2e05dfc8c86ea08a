import subprocess
import sys


def test_pure_modules_import_no_ray_vllm_or_deepspeed():
    code = ("import sys, openrlaif.algorithms, openrlaif.batch, openrlaif.config, openrlaif.feedback.judge_prompts, "
            "openrlaif.rollout.collate, openrlaif.data\n"
            "heavy = [m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)
