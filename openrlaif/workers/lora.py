"""LoRA adapters on a trained role's model (actor.lora / critic.lora, peft): injected in place, so every weight keeps
its HF name except an adapted layer's own (`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`).

What leaves the trainer is named as the engines and files expect: merged weights under the base model's HF names
(W + scaling·B·A), or the adapters alone under peft's saved names (`base_model.model.<layer>.lora_A.weight`), the
format of a peft adapter folder and of vLLM's LoRA loader."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch

ADAPTER = "default"   # peft's adapter name; one adapter per model here
PEFT_PREFIX = "base_model.model."


def add_lora(model, settings, keep_trainable: tuple[str, ...] = ()):
    """Inject LoRA adapters into `model` in place and freeze everything else but the `keep_trainable` modules (a
    critic's value head). Returns the model."""
    from peft import LoraConfig, inject_adapter_in_model
    targets = list(settings.target_modules)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets,
                        exclude_modules=list(keep_trainable) or None, bias="none")
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_" in name or any(name.startswith(k + ".") or f".{k}." in name
                                                      for k in keep_trainable)
    model.openrlaif_lora = config   # what an adapter folder's adapter_config.json says
    return model


def has_lora(module) -> bool:
    return getattr(module, "openrlaif_lora", None) is not None


def lora_layers(module) -> dict[str, object]:
    """The adapted linear layers of `module`, by module name."""
    from peft.tuners.lora import LoraLayer
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


@contextmanager
def adapters_off(module):
    """The base model for the duration (reference.from_actor_base: log π_ref is the actor without its adapters).
    Sets the layers' own switch rather than peft's enable_adapters(False), which also flips requires_grad on the
    adapters, under a DeepSpeed optimizer that holds them."""
    layers = list(lora_layers(module).values())
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


def hf_name(name: str) -> str:
    """The base model's name of a weight (`...q_proj.base_layer.weight` -> `...q_proj.weight`)."""
    return name.replace(".base_layer.", ".")


def merged_weights(module, gather, names=None, dtype=torch.float32):
    """(HF name, tensor) of every base weight, adapted layers merged (W + scaling·B·A), or only those `names`.
    `gather(params)` is a context manager that makes those parameters whole (ZeRO-3's GatheredParameters; a
    no-op below it). Yields on every rank (the gathers are collective); tensors are on the CPU in `dtype`."""
    layers = {f"{name}.base_layer.weight": layer for name, layer in lora_layers(module).items()}
    wanted = None if names is None else set(names)
    for name, param in module.named_parameters():
        if ".lora_" in name or (wanted is not None and hf_name(name) not in wanted):
            continue
        layer = layers.get(name)
        if layer is None:
            with gather([param]):
                yield hf_name(name), param.data.detach().to("cpu", dtype).clone()
            continue
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        with gather([param, a, b]):
            delta = (b.data.float() @ a.data.float()) * layer.scaling[ADAPTER]
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            yield hf_name(name), (param.data.float() + delta.to(param.device)).to("cpu", dtype)


def adapter_weights(module, gather, dtype=torch.float32):
    """(peft's saved name, tensor) of every adapter weight, on the CPU in `dtype`. Collective like merged_weights."""
    for name, param in module.named_parameters():
        if ".lora_" not in name:
            continue
        with gather([param]):
            yield PEFT_PREFIX + name.replace(f".{ADAPTER}.", "."), param.data.detach().to("cpu", dtype).clone()


def adapter_config(module, base_model: str) -> dict:
    """adapter_config.json of `module`'s adapters: peft's own fields, the modules they were put on."""
    config = module.openrlaif_lora
    data = config.to_dict()
    targets = sorted({name.rsplit(".", 1)[-1] for name in lora_layers(module)})
    data.update(target_modules=targets, base_model_name_or_path=base_model, exclude_modules=None,
                peft_type="LORA", task_type="CAUSAL_LM", inference_mode=True)
    return json.loads(json.dumps(data, default=lambda value: sorted(value) if isinstance(value, set) else str(value)))


def write_adapter(folder: str, weights: list[tuple[str, torch.Tensor]], config: dict) -> str:
    """A peft adapter folder (adapter_config.json, adapter_model.safetensors) that peft and vLLM load."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in weights}, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    return folder


def base_model_shell(model):
    """`model`'s class without adapters and without memory (meta tensors), to save merged weights as an HF folder
    of the base model (config and generation config as `model` has them)."""
    with torch.device("meta"):
        shell = type(model)(model.config)
    shell.generation_config = getattr(model, "generation_config", None)
    return shell
