"""Weight sync over a process group of its own (`rollout.weight_sync=collective`): trainer rank 0 broadcasts
each bucket of weights, every engine worker receives it and loads it before the next bucket comes.

The group is not the trainer's DeepSpeed group (the engines are other processes, on other nodes): a TCPStore
that rank 0 serves on its node's address, and a gloo (CPU) or NCCL (GPU) group over it, as OpenRLHF and verl
build theirs. Rank 0 is the trainer; ranks 1.. are the engine workers (rollout, then a judge that follows the
policy). A bucket goes as a header (names, dtypes, shapes, as JSON bytes) and then one broadcast per tensor,
as raw bytes (uint8), so every dtype travels and the trainer sends its gathered tensors without packing them
into another buffer. Ray-free on purpose: scripts/gpu_check.sh runs it where Ray is not installed."""
from __future__ import annotations

import datetime
import json
import os
import socket

import torch
import torch.distributed as dist


def listen(address: str) -> socket.socket:
    """A listening socket on `address` (the trainer node's IP), on a free port, for the group's store: bound to
    that address only, not every interface (as the DeepSpeed rendezvous, workers/engine.py)."""
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, 0))
    listener.listen(128)
    return listener


class SyncGroup:
    """One member of the weight-sync group. Every member constructs it at the same time (the store waits for
    all `world_size`); rank 0 passes the `listener` from `listen`. device "cuda" makes an NCCL group, else gloo."""

    def __init__(self, address: str, port: int, rank: int, world_size: int, *, device: str = "cpu",
                 listener: socket.socket | None = None, timeout_s: float = 1800.0) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.listener = listener   # kept open: the store serves on its descriptor
        self.store = dist.TCPStore(address, port, world_size, rank == 0, timeout,
                                   master_listen_fd=listener.fileno() if listener is not None else None)
        prefixed = dist.PrefixStore("openrlaif/weight-sync", self.store)
        if self.device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            interface = local_interface(address)
            if interface:   # gloo's sockets on the interface that reaches rank 0, as the trainer's own group
                os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            self.group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()

    def send(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Rank 0: one bucket to every other member; returns the bytes sent."""
        tensors = [tensor.detach().to(self.device).contiguous() for _, tensor in named]
        header = json.dumps([[name, str(t.dtype).removeprefix("torch."), list(t.shape)]
                             for (name, _), t in zip(named, tensors)]).encode()
        self._broadcast(torch.tensor([len(header)], dtype=torch.int64, device=self.device))
        self._broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device))
        for tensor in tensors:
            if tensor.numel():
                self._broadcast(tensor.reshape(-1).view(torch.uint8))
        return sum(t.numel() * t.element_size() for t in tensors)

    def receive(self) -> list[tuple[str, torch.Tensor]]:
        """Ranks > 0: the next bucket rank 0 sends, as (name, tensor) on this member's device."""
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._broadcast(size)
        header = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self._broadcast(header)
        named = []
        for name, dtype, shape in json.loads(bytes(header.cpu().tolist()).decode()):
            dtype = getattr(torch, dtype)
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
            if tensor.numel():
                self._broadcast(tensor.reshape(-1).view(torch.uint8))
            named.append((name, tensor))
        return named

    def close(self) -> None:
        self.group = self.store = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def local_interface(address: str) -> str | None:
    """The name of this machine's network interface that holds `address` ("lo" for 127.0.0.1), else None (also
    where psutil is missing: gloo then picks by hostname)."""
    try:
        import psutil
    except ImportError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.address.split("%")[0] == address for entry in addresses):
            return name
    return None


class WeightReceiver:
    """The engine workers' side of the group (RolloutWorker, JudgeWorker): verbs join_weight_sync and
    receive_weights, on top of the worker's own update_weights."""

    def join_weight_sync(self, address: str, port: int, rank: int, world_size: int, device: str = "cpu") -> bool:
        self.sync_group = SyncGroup(address, port, rank, world_size, device=device)
        return True

    def receive_weights(self) -> float:
        """The next bucket, loaded into the engine; returns the load's seconds (as update_weights)."""
        return self.update_weights(dict(self.sync_group.receive()))
