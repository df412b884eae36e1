"""LoRA adapters to and from Hugging Face PEFT's LoRA format; the merged model as an HF checkpoint.

Why: a trained adapter is a few MB; exported as PEFT reads it, `PeftModel.from_pretrained(base,
dir)` (or vLLM / TGI's LoRA loading) applies it to the unchanged HF base checkpoint, so one base
serves many policies. `save_merged_hf` writes the other option: one plain checkpoint, no PEFT.

The format (PEFT's `save_pretrained` for `peft_type="LORA"`, the reference; the key layout is
`get_peft_model_state_dict`'s, which drops the adapter name that `set_peft_model_state_dict`
puts back as ".default" on load):

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.model.layers.{i}.{module}.lora_A.weight [r, in]
                                 base_model.model.model.layers.{i}.{module}.lora_B.weight [out, r]

PEFT's `nn.Linear`s compute y = W x + (alpha / r) B (A x), i.e. x A^T B^T: the transposes of
ours (x A B with A [in, r], B [r, out]). Our flattened in/out dims are HF's: `wq` [D, H, Dh]
flattens to H*Dh in the row order of q_proj's [H*Dh, D] and `wo` [H, Dh, D] to o_proj's columns
(`hf_io`: ours = hf.T.reshape), so a plain transpose of each layer's slice is the whole mapping.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from grpo_jax.models import lora
from grpo_jax.models.hf_io import _host_array, save_hf
from grpo_jax.models.safetensors_io import write_safetensors
from grpo_jax.utils import CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model.model.layers"  # PeftModel > LoraModel > *ForCausalLM > model.layers

# Our target -> the HF module (under model.layers.{i}) it adapts.
HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
              "w_down": "mlp.down_proj"}


def _key(layer: int, target: str, which: str) -> str:
    return f"{KEY_PREFIX}.{layer}.{HF_MODULES[target]}.lora_{which}.weight"


def _require_adapters(model, what: str) -> None:
    if not lora.has_adapters(model):
        raise ValueError(f"{what}: the model has no LoRA adapters (config.lora_rank = 0); create or "
                         "load it with lora_rank > 0, or export the full model with save_hf")


def adapter_config(model, base_model_name_or_path: str) -> dict:
    """`adapter_config.json` for `model`'s adapters (PEFT's `LoraConfig` fields). Dropout 0 and no
    rsLoRA / DoRA: the forward here is exactly y = x W + (alpha / r) (x A) B."""
    cfg = model.config
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": int(cfg.lora_rank), "lora_alpha": float(cfg.lora_alpha), "lora_dropout": 0.0,
        "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in cfg.lora_targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
    }


def save_peft(model, path: str, base_model_name_or_path: str) -> None:
    """Writes `model`'s adapters as a PEFT LoRA directory (`adapter_config.json`,
    `adapter_model.safetensors`, float32) for `PeftModel.from_pretrained(base, path)`.

    `base_model_name_or_path` is the HF checkpoint (hub id or directory) the adapters apply to;
    PEFT records it, and `AutoPeftModelForCausalLM` loads the base from it. In a multi-process run
    every process must call this (the adapters are gathered); only process 0 writes.
    Raises ValueError for a model without adapters.
    """
    _require_adapters(model, "save_peft")
    cfg = model.config
    specs, source = {}, {}
    for target in cfg.lora_targets:
        for which in ("A", "B"):
            var = getattr(model.layers, f"lora_{which.lower()}_{target}")
            _, a, b = var.shape  # [L, in, r] or [L, r, out]
            for i in range(cfg.n_layers):
                specs[_key(i, target, which)] = ((b, a), np.dtype(np.float32))
                source[_key(i, target, which)] = (var, i)
    cache: dict[int, np.ndarray] = {}

    def produce(name):
        var, layer = source[name]
        if id(var) not in cache:  # gather each stacked adapter once
            cache.clear()
            cache[id(var)] = np.asarray(_host_array(var[...]), np.float32)
        return cache[id(var)][layer].T

    if jax.process_index() != 0:
        for name in specs:  # take part in the collective gathers
            produce(name)
        return
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(adapter_config(model, base_model_name_or_path), f, indent=2)
    write_safetensors(os.path.join(path, WEIGHTS_NAME), specs, produce, metadata={"format": "pt"})


def save_merged_hf(model, path: str, **save_hf_kwargs) -> None:
    """Writes the merged model (W + (alpha / r) A B per target) as a plain HF checkpoint: what an
    engine without LoRA support serves. `save_hf_kwargs` go to `save_hf` (dtype, shard size)."""
    save_hf(lora.merged(model), path, **save_hf_kwargs)


def load_peft(model, path: str) -> None:
    """Reads a PEFT LoRA directory into `model`'s adapters, in place (e.g. to resume from, or
    evaluate, an adapter trained elsewhere). The directory's r, lora_alpha and target modules must
    be the model's; rsLoRA, DoRA, fan_in_fan_out, per-layer ranks, layer subsets, LoRA biases and
    modules_to_save are refused (this model's forward has none of them)."""
    _require_adapters(model, "load_peft")
    from safetensors.numpy import load_file

    cfg = model.config
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.exists(p):
            raise CheckpointError(f"{path}: no {os.path.basename(p)}")
    with open(config_path) as f:
        pc = json.load(f)
    want = adapter_config(model, "")
    modules = pc.get("target_modules")
    modules = sorted([modules] if isinstance(modules, str) else modules or [])
    problems = [f"{k}={pc.get(k)!r} (model: {want[k]!r})" for k in ("peft_type", "r", "lora_alpha")
                if pc.get(k) != want[k]]
    if modules != want["target_modules"]:
        problems.append(f"target_modules={modules} (model: {want['target_modules']})")
    problems += [f"{k}={pc[k]!r} is not supported" for k in
                 ("use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                  "layers_to_transform", "lora_bias", "modules_to_save", "layer_replication") if pc.get(k)]
    if problems:
        raise CheckpointError(f"{config_path}: " + "; ".join(problems))
    tensors = load_file(weights_path)
    for target in cfg.lora_targets:
        for which in ("A", "B"):
            var = getattr(model.layers, f"lora_{which.lower()}_{target}")
            want_shape = tuple(var.shape[1:])[::-1]
            layers = []
            for i in range(cfg.n_layers):
                name = _key(i, target, which)
                if name not in tensors:
                    raise CheckpointError(f"{weights_path}: tensor {name!r} is missing")
                if tensors[name].shape != want_shape:
                    raise CheckpointError(f"{weights_path}: tensor {name!r} has shape "
                                          f"{tensors[name].shape}, the model needs {want_shape}")
                layers.append(tensors[name].astype(np.float32).T)
            stacked = np.stack(layers).astype(var.dtype)
            sharding = getattr(var[...], "sharding", None)
            var[...] = jax.device_put(stacked, sharding) if sharding is not None else stacked
