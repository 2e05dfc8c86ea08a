"""`@remote` on every role class: ray.remote where Ray is installed; where it is not (the GPU check's machine,
scripts/gpu_check.sh), or with OPENRLAIF_IN_PROCESS=1 (the check run on CPU, in tests), the class itself, whose
verbs then run in-process, unchanged."""
from __future__ import annotations

import os

try:
    import ray
except ImportError:   # no Ray: plain classes
    ray = None
if os.environ.get("OPENRLAIF_IN_PROCESS") == "1":
    ray = None


def remote(cls):
    return ray.remote(cls) if ray is not None else cls
