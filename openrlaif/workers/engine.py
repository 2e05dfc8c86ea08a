"""What the trained roles (actor, critic) share: the torch.distributed rendezvous and one DeepSpeed ZeRO engine
per Ray worker, data parallel over the workers."""
from __future__ import annotations

import os

import torch

from openrlaif.config import ActorConfig, ConfigError
from openrlaif.rollout.collective import local_interface
from openrlaif.workers.common import setup_process
from openrlaif.workers.lora import has_lora, hf_name, merged_weights


def effective_zero_stage(cfg: ActorConfig, world_size: int) -> int:
    """The ZeRO stage a role runs: `cfg.zero_stage`, except 0 for one worker without offload. ZeRO partitions
    optimizer state, gradients and weights across ranks; with one rank there is nothing to split, and stages 1-3
    only add their bucketing and flattening (9.4 -> 7.5 s per DPO step on SmolLM2-135M through the driver, with
    the world-size-1 all-reduce skip in build_engine)."""
    if world_size == 1 and not cfg.offload:
        return 0
    return cfg.zero_stage


def deepspeed_config(cfg: ActorConfig, world_size: int, micro_batch: int, accumulation: int, bf16: bool,
                     cpu_adam: bool = False) -> dict:
    """`cpu_adam`: the optimizer is DeepSpeed's own CPU Adam (ZeRO-Offload on GPU); else a torch AdamW."""
    stage = effective_zero_stage(cfg, world_size)
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    extra = {}
    if cfg.offload and stage > 0 and not cpu_adam:
        # DeepSpeed refuses a client torch optimizer under ZeRO-Offload unless told it is wanted: without an
        # accelerator the "offloaded" states are on the CPU anyway, and torch's AdamW needs no C++ build.
        extra["zero_force_ds_cpu_optimizer"] = False
    return extra | {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def disable_dropout(model) -> None:
    """Every dropout off: nn.Dropout modules (GPT-2, OPT, ...) and the attention dropout rate that Llama-style
    attention reads from a float attribute at each forward."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for name in list(vars(config)) if config is not None else []:
        if ("dropout" in name or name.endswith("_pdrop")) and isinstance(getattr(config, name), float):
            setattr(config, name, 0.0)


def init_distributed(backend: str, rank: int, world_size: int, master_addr: str, master_port: int):
    """torch.distributed for one role's workers, then DeepSpeed on top of it. Module-level on purpose: Ray pickles
    actor methods by value, and one that touches both `torch` and an attribute named `ops` makes cloudpickle try
    to pickle `torch.ops`.

    The rendezvous listens on `master_addr` only (rank 0's node IP; 127.0.0.1 on a local cluster): torch's
    TCPStore server otherwise binds to every interface ("::"), which made a local run reachable from outside. So
    rank 0 binds the socket itself and hands it to the store. gloo's (and, on one machine, NCCL's) own sockets go
    to the interface that holds master_addr when this node has it."""
    import datetime
    import socket

    import torch.distributed as dist
    if backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    interface = local_interface(master_addr)
    if interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        if master_addr.startswith("127."):   # every rank on this machine
            os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    timeout = datetime.timedelta(minutes=30)
    listener = None
    if rank == 0:
        listener = socket.socket(socket.AF_INET6 if ":" in master_addr else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((master_addr, master_port))
        listener.listen(128)
    store = dist.TCPStore(master_addr, master_port, world_size, rank == 0, timeout,
                          master_listen_fd=listener.fileno() if listener else None)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    import deepspeed
    # On CPU, init_distributed JIT-compiles a shared-memory comm op (~26 s, needs a compiler); gloo is enough.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)   # wraps the process group above
    return deepspeed, (store, listener)


class NonFiniteUpdate(RuntimeError):
    """A loss or weights that are not finite: the run stops before the update lands or a checkpoint is written."""


class DeepSpeedWorker:
    """Base of the trained roles. Subclasses load their model, then call `build_engine` with it."""

    def __init__(self, cfg: ActorConfig, *, rank: int, world_size: int, master_addr: str, master_port: int,
                 backend: str, dtype: str, step_batch_size: int, threads: int, seed: int) -> None:
        setup_process(threads, seed)
        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port))
        self._deepspeed, self._rendezvous = init_distributed(backend, rank, world_size, master_addr, master_port)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.zero_stage = effective_zero_stage(cfg, world_size)
        self.bf16 = dtype == "bfloat16"
        mini = cfg.mini_batch_size or step_batch_size
        self.per_rank_mini = mini // world_size
        self.accumulation = self.per_rank_mini // cfg.micro_batch_size

    def build_engine(self, model) -> None:
        """fp32 master weights; bf16 compute via DeepSpeed when model.dtype=bfloat16. Dropout is off unless
        `keep_dropout` (TRL's default too): with it on, log π of the same tokens differs between the rollout's
        log-prob pass and the update, so the on-policy ratio is not 1 and DPO's log-ratios are noisy."""
        if not self.cfg.keep_dropout:
            disable_dropout(model)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if self.cfg.lora.rank and hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()   # frozen embeddings: checkpointed blocks still need a grad path
        # LoRA (add_lora froze the rest): the optimizer holds the adapters (and a value head) only
        trainable = [param for param in model.parameters() if param.requires_grad]
        cpu_adam = self.cfg.offload and self.zero_stage > 0 and torch.cuda.is_available()
        if cpu_adam:   # ZeRO-Offload's C++ Adam steps the fp32 states on the host (JIT-built once per machine)
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(trainable, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                         adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.engine, *_ = self._deepspeed.initialize(
            model=model, optimizer=optimizer,
            config=deepspeed_config(self.cfg, self.world_size, self.cfg.micro_batch_size, self.accumulation,
                                    self.bf16, cpu_adam))
        if self.zero_stage == 0 and self.world_size == 1:
            # Nothing to average over; DeepSpeed would still flatten every gradient into buckets and back. Only at
            # stage 0: at stages 1-2 that all-reduce is also what flushes the last gradient bucket into the
            # partitions (without it, engine.step() fails with KeyError: 0), which one worker with offload runs.
            self.engine.enable_backward_allreduce = False
        self.device = self.engine.device

    def ready(self) -> bool:
        return True

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """`loss` is this micro-batch's share of the global mini-batch mean. DeepSpeed divides by the
        accumulation steps and averages over ranks; undo both so the update is the big-batch gradient.

        A non-finite loss on any rank (all ranks agree through one all-reduce, so none is left waiting in a
        collective) stops the step before its backward: the update is not applied and the weights stay those of
        the last update, instead of every weight turning NaN."""
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if self.world_size > 1:
            import torch.distributed as dist
            finite = finite.to(self.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            raise NonFiniteUpdate(f"the loss of a micro-batch is {float(loss.detach()):g} (rank {self.rank}, or "
                                  "another rank's); the update was not applied")
        self.engine.backward(loss * self.accumulation * self.world_size)
        if self.engine.is_gradient_accumulation_boundary() and self.engine.get_global_grad_norm() is None:
            # DeepSpeed without ZeRO (one worker runs stage 0) in fp32 clips but never records the norm: measure it
            # here, before clipping, so train/grad_norm and its non-finite stop see the real gradient.
            norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in self.engine.module.parameters()
                     if p.grad is not None]
            self.unrecorded_grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        self.engine.step()

    def weights_finite(self) -> bool:
        """Whether every weight on every rank is finite (ZeRO-3: this rank's partitions). Collective."""
        finite = all(bool(torch.isfinite(getattr(p, "ds_tensor", p).data).all())
                     for p in self.engine.module.parameters())
        flag = torch.tensor(float(finite), device=self.device)
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def check_weights_finite(self) -> None:
        if not self.weights_finite():
            raise NonFiniteUpdate("the weights are not finite; they are not saved")

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else getattr(self, "unrecorded_grad_norm", 0.0)

    def pair_micro_batches(self, batch):
        """(micro-batch of pairs, its chosen-then-rejected rows trimmed and on the device, pairs in the global
        mini-batch) over every epoch and mini-batch of one step; the caller backward_and_steps each. Pairs with
        pair_mask 0 (online DPO: a prompt whose responses tied) keep every rank's step count equal and weigh 0."""
        from openrlaif.data.pairs import both_sides
        from openrlaif.workers.common import trim_to_content
        for _ in range(self.cfg.epochs):
            for mini in batch.chunks_of(self.per_rank_mini):
                num_pairs = max(float(all_reduce_sum(mini["pair_mask"].sum(), self.device)), 1.0)
                for micro in mini.chunks_of(self.cfg.micro_batch_size):
                    yield micro, trim_to_content(both_sides(micro)).to(self.device), num_pairs

    def save_state(self, path: str) -> None:
        """Weights, optimizer and this rank's RNG into `path` (a resumable checkpoint). Collective. Refuses
        non-finite weights: a checkpoint is never written from NaN weights."""
        import json
        import random
        self.check_weights_finite()
        self.engine.save_checkpoint(path, tag="state", save_latest=False)
        if self.rank == 0:
            with open(os.path.join(path, "layout.json"), "w") as handle:
                json.dump(self.layout(), handle)
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()},
                   os.path.join(path, f"rng_rank{self.rank}.pt"))

    def load_state(self, path: str) -> None:
        import random
        check_layout(path, self.layout())
        load_path, _ = self.engine.load_checkpoint(path, tag="state", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {path}")
        rng = torch.load(os.path.join(path, f"rng_rank{self.rank}.pt"), weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])

    def layout(self) -> dict:
        """What a saved DeepSpeed state depends on: the ZeRO stage that ran and the number of ranks."""
        return {"zero_stage": self.zero_stage, "world_size": self.world_size}

    def updates_per_step(self, batch, rows_per_example: int = 1) -> int:
        return self.cfg.epochs * len(batch.chunks_of(self.per_rank_mini * rows_per_example))

    def gathered_state_dict(self, module, dtype: str = "float32", names=None) -> dict[str, torch.Tensor] | None:
        """Full weights of `module` on rank 0 (None elsewhere), or only those `names` (a weight-sync bucket).
        Collective under ZeRO-3: call it on every rank. Tied weights appear once in named_parameters; engines load
        them by either name. Below ZeRO-3, a tensor already on the CPU in `dtype` is the live parameter itself (no
        copy): use the state before the next update (returning it from a Ray method copies it)."""
        target = getattr(torch, dtype)
        if has_lora(module):   # the base model's names, adapted layers merged
            state = dict(merged_weights(module, self.gathered, names, target))
            return state if self.rank == 0 else None
        wanted = None if names is None else set(names)
        state = {}
        for name, param in module.named_parameters():
            if wanted is not None and name not in wanted:
                continue
            if self.zero_stage == 3:
                with self._deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if self.rank == 0:
                        state[name] = param.data.detach().to("cpu", target).clone()
            elif self.rank == 0:
                state[name] = param.data.detach().to("cpu", target)
        return state if self.rank == 0 else None

    def gathered(self, params):
        """A context in which `params` are whole on every rank: ZeRO-3 gathers them (collective), below it they
        are."""
        from contextlib import nullcontext
        if self.zero_stage == 3:
            return self._deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return nullcontext()

    def reset_peak_memory(self) -> float:
        """Reset this process's peak resident memory (VmHWM) to its current RSS; the RSS in MiB (benchmarks)."""
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return process_memory_mib("VmRSS")

    def peak_memory_mib(self) -> float:
        """This process's peak resident memory (VmHWM) since the last reset_peak_memory, in MiB."""
        return process_memory_mib("VmHWM")

    def weight_sizes(self, module, dtype: str = "float32") -> list[tuple[str, int]]:
        """(name, bytes in `dtype`) of every parameter, in named_parameters order (full sizes under ZeRO-3)."""
        size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        return [(hf_name(name), int(getattr(param, "ds_numel", param.numel())) * size)
                for name, param in module.named_parameters() if ".lora_" not in name]


def process_memory_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":")) / 1024


def check_layout(path: str, layout: dict) -> None:
    """Refuse DeepSpeed state saved under another ZeRO stage or number of workers than `layout` (what
    DeepSpeedWorker.layout() returns): DeepSpeed cannot load one into the other. States from before layout.json
    existed are not checked."""
    import json
    layout_path = os.path.join(path, "layout.json")
    if not os.path.exists(layout_path):
        return
    with open(layout_path) as handle:
        saved = json.load(handle)
    if saved != layout:
        raise ConfigError(
            f"{path} holds DeepSpeed state for ZeRO stage {saved['zero_stage']} on {saved['world_size']} worker(s); "
            f"this run has stage {layout['zero_stage']} on {layout['world_size']} (one worker without offload always "
            "runs stage 0). DeepSpeed cannot load one layout into the other. Fix: resume with the saved run's "
            "resources.num_workers / zero_stage / offload, or start a new output.dir.")


def all_reduce_sum(value: torch.Tensor, device) -> torch.Tensor:
    import torch.distributed as dist
    value = value.detach().to(device, torch.float32).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return value.cpu()
