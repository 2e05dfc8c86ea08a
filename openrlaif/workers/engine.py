"""What the trained roles (actor, critic) share: the torch.distributed rendezvous and one DeepSpeed ZeRO engine
per Ray worker, data parallel over the workers."""
from __future__ import annotations

import os

import torch

from openrlaif.config import ActorConfig, ConfigError
from openrlaif.workers.common import setup_process


def effective_zero_stage(cfg: ActorConfig, world_size: int) -> int:
    """The ZeRO stage a role runs: `cfg.zero_stage`, except 0 for one worker without offload. ZeRO partitions
    optimizer state, gradients and weights across ranks; with one rank there is nothing to split, and stages 1-3
    only add their bucketing and flattening (9.4 -> 7.5 s per DPO step on SmolLM2-135M through the driver, with
    the world-size-1 all-reduce skip in build_engine)."""
    if world_size == 1 and not cfg.offload:
        return 0
    return cfg.zero_stage


def deepspeed_config(cfg: ActorConfig, world_size: int, micro_batch: int, accumulation: int, bf16: bool) -> dict:
    stage = effective_zero_stage(cfg, world_size)
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_distributed(backend: str):
    """Module-level on purpose: Ray pickles actor methods by value, and one that touches both `torch` and an
    attribute named `ops` makes cloudpickle try to pickle `torch.ops`."""
    if backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    # On CPU, init_distributed JIT-compiles a shared-memory comm op (~26 s, needs a compiler); gloo is enough.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)
    return deepspeed


class DeepSpeedWorker:
    """Base of the trained roles. Subclasses load their model, then call `build_engine` with it."""

    def __init__(self, cfg: ActorConfig, *, rank: int, world_size: int, master_addr: str, master_port: int,
                 backend: str, dtype: str, step_batch_size: int, threads: int, seed: int) -> None:
        setup_process(threads, seed)
        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port))
        self._deepspeed = init_distributed(backend)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.zero_stage = effective_zero_stage(cfg, world_size)
        self.bf16 = dtype == "bfloat16"
        mini = cfg.mini_batch_size or step_batch_size
        self.per_rank_mini = mini // world_size
        self.accumulation = self.per_rank_mini // cfg.micro_batch_size

    def build_engine(self, model) -> None:
        """fp32 master weights; bf16 compute via DeepSpeed when model.dtype=bfloat16."""
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.engine, *_ = self._deepspeed.initialize(
            model=model, optimizer=optimizer,
            config=deepspeed_config(self.cfg, self.world_size, self.cfg.micro_batch_size, self.accumulation,
                                    self.bf16))
        if self.world_size == 1:
            # Nothing to average over; DeepSpeed would still flatten every gradient into buckets and back.
            self.engine.enable_backward_allreduce = False
        self.device = self.engine.device

    def ready(self) -> bool:
        return True

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """`loss` is this micro-batch's share of the global mini-batch mean. DeepSpeed divides by the
        accumulation steps and averages over ranks; undo both so the update is the big-batch gradient."""
        self.engine.backward(loss * self.accumulation * self.world_size)
        self.engine.step()

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

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
        """Weights, optimizer and this rank's RNG into `path` (a resumable checkpoint). Collective."""
        import json
        import random
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

    def gathered_state_dict(self, module, dtype: str = "float32") -> dict[str, torch.Tensor] | None:
        """Full weights of `module` on rank 0 (None elsewhere). Collective under ZeRO-3: call it on every rank.
        Tied weights appear once in named_parameters; engines load them by either name. Below ZeRO-3, a tensor
        already on the CPU in `dtype` is the live parameter itself (no copy): use the state before the next update
        (returning it from a Ray method copies it)."""
        target = getattr(torch, dtype)
        state = {}
        for name, param in module.named_parameters():
            if self.zero_stage == 3:
                with self._deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if self.rank == 0:
                        state[name] = param.data.detach().to("cpu", target).clone()
            elif self.rank == 0:
                state[name] = param.data.detach().to("cpu", target)
        return state if self.rank == 0 else None


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
