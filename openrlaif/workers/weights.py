"""The policy's weights on their way from the trainer to the engines (rollout, a self-judge), through Ray's
object store.

Ray pickles a torch tensor in-band: its bytes are copied into the pickle on the way in and out of it on the way
back. A numpy array goes out-of-band instead: one copy into shared memory on `put`, none on `get` (the reader
maps the object store's memory). So the weights travel as one flat byte array per tensor, and the engines view
them as tensors again without a copy. For SmolLM2-135M (540 MB in float32) on the 2-core CPU machine, a
trainer-to-engine round trip took 2.0-2.5 s as tensors and 0.1-0.5 s as byte arrays.
"""
from __future__ import annotations

import re
import warnings
from typing import Union

import numpy as np
import torch


class PackedWeights:
    """Named tensors as (name, uint8 array, dtype, shape). Build it just before it is returned from a Ray
    method: the arrays alias the tensors until Ray copies them into the object store."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.entries: list[tuple[str, np.ndarray, torch.dtype, tuple[int, ...]]] = [
            (name, tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy(), tensor.dtype,
             tuple(tensor.shape))
            for name, tensor in state.items()]

    def __len__(self) -> int:
        return len(self.entries)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The tensors, viewing the arrays' memory (read-only when it is the object store's: load, don't write)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return [(name, torch.from_numpy(array).view(dtype).reshape(shape))
                    for name, array, dtype, shape in self.entries]


Weights = Union[PackedWeights, dict[str, torch.Tensor]]


def named_tensors(weights: Weights) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from packed weights or a plain state dict."""
    if isinstance(weights, PackedWeights):
        return weights.named_tensors()
    return list(weights.items())


_LAYER = re.compile(r"^(.*?\.layers?\.\d+)\.")


def weight_buckets(sizes: list[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """The tensor names in sync order, cut into buckets of about `bucket_bytes` (<= 0: one bucket). A decoder layer
    (`...layers.N.`) is never split: vLLM reloads a layer once all its weights arrive (its fused q/k/v, gate/up),
    so each bucket holds whole layers; a layer larger than a bucket is a bucket of its own."""
    groups: list[list] = []   # [layer or None, names, bytes]
    for name, size in sizes:
        match = _LAYER.match(name)
        layer = match.group(1) if match else None
        if layer is not None and groups and groups[-1][0] == layer:
            groups[-1][1].append(name)
            groups[-1][2] += size
        else:
            groups.append([layer, [name], size])
    if bucket_bytes <= 0:
        return [[name for _, names, _ in groups for name in names]] if groups else []
    buckets, current, used = [], [], 0
    for _, names, size in groups:
        if current and used + size > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current += names
        used += size
    return buckets + ([current] if current else [])
