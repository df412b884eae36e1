"""HF checkpoint import/export: `load_hf(path)` and `save_hf(model, path)`.

Key map (HF name -> ours; i = layer, stacked on our leading axis):

    model.embed_tokens.weight                [V, D]      -> embed               [V, D]
    model.layers.i.input_layernorm.weight    [D]         -> layers.attn_norm[i] [D]
    model.layers.i.self_attn.q_proj.weight   [H*Dh, D]   -> layers.wq[i]        [D, H, Dh]
    model.layers.i.self_attn.{k,v}_proj.weight [K*Dh, D] -> layers.w{k,v}[i]    [D, K, Dh]
    model.layers.i.self_attn.{q,k,v}_proj.bias           -> layers.b{q,k,v}[i]  [H|K, Dh]
    model.layers.i.self_attn.o_proj.weight   [D, H*Dh]   -> layers.wo[i]        [H, Dh, D]
    model.layers.i.self_attn.{q,k}_norm.weight [Dh]      -> layers.{q,k}_norm[i]
    model.layers.i.post_attention_layernorm.weight       -> layers.mlp_norm[i]
    model.layers.i.mlp.{gate,up}_proj.weight [F, D]      -> layers.w_{gate,up}[i] [D, F]
    model.layers.i.mlp.down_proj.weight      [D, F]      -> layers.w_down[i]    [F, D]
    model.norm.weight                                    -> final_norm
    lm_head.weight                           [V, D]      -> lm_head [V, D] (absent when tied)

Loading with a mesh builds every parameter with `jax.make_array_from_callback`: each device's
shard is sliced out of the memory-mapped file, so no process ever holds a full copy per device,
and a multi-host run only reads the shards its own devices need.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import sharding as sharding_lib
from grpo_jax.models.config import ModelConfig, from_hf_config, to_hf_config
from grpo_jax.models.safetensors_io import (SafetensorsError, open_checkpoint, plan_shards,
                                            write_safetensors)
from grpo_jax.models import lora
from grpo_jax.models.transformer import Transformer, _host_init, abstract_model
from grpo_jax.utils import CheckpointError, is_var, path_name

log = logging.getLogger(__name__)

# ours -> (HF name template, kind). Kinds: "same" (identical layout), "flat" (HF flattens the
# heads: [H * Dh] vs our [H, Dh]), "T" (HF stores [out, in], the transpose of ours flattened over
# heads): ours = hf.T.reshape(our_shape).
_LAYER_KEYS = {
    "attn_norm": ("input_layernorm.weight", "same"),
    "wq": ("self_attn.q_proj.weight", "T"),
    "wk": ("self_attn.k_proj.weight", "T"),
    "wv": ("self_attn.v_proj.weight", "T"),
    "bq": ("self_attn.q_proj.bias", "flat"),
    "bk": ("self_attn.k_proj.bias", "flat"),
    "bv": ("self_attn.v_proj.bias", "flat"),
    "wo": ("self_attn.o_proj.weight", "T"),
    "q_norm": ("self_attn.q_norm.weight", "same"),
    "k_norm": ("self_attn.k_norm.weight", "same"),
    "mlp_norm": ("post_attention_layernorm.weight", "same"),
    "w_gate": ("mlp.gate_proj.weight", "T"),
    "w_up": ("mlp.up_proj.weight", "T"),
    "w_down": ("mlp.down_proj.weight", "T"),
}
_GLOBAL_KEYS = {
    "embed": ("model.embed_tokens.weight", "same"),
    "final_norm": ("model.norm.weight", "same"),
    "lm_head": ("lm_head.weight", "same"),
}
# Tensors some checkpoints carry that the model does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _hf_shape(our_shape: tuple[int, ...], kind: str, name: str) -> tuple[int, ...]:
    if kind == "same":
        return our_shape
    if kind == "flat":
        return (int(np.prod(our_shape)),)
    # HF keeps [out_features, in_features]; ours is [in, ..., out] with heads split out.
    if name == "wo":  # ours [H, Dh, D]
        return (our_shape[-1], int(np.prod(our_shape[:-1])))
    return (int(np.prod(our_shape[1:])), our_shape[0])


def _hf_to_ours(array: np.ndarray, kind: str, our_shape) -> np.ndarray:
    return array.T.reshape(our_shape) if kind == "T" else array.reshape(our_shape)


def _ours_to_hf(array: np.ndarray, kind: str, hf_shape) -> np.ndarray:
    return array.reshape(hf_shape[::-1]).T if kind == "T" else array.reshape(hf_shape)


def _param_entries(cfg: ModelConfig, abs_model: Transformer):
    """(our path, Variable, list of HF names (one per layer, or one), kind, hf per-item shape)."""
    entries = []
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(abs_model, lora.BASE), is_leaf=is_var)[0]
    for path, var in flat:
        keys = path_name(path).split("/")
        if keys[0] == "layers":
            template, kind = _LAYER_KEYS[keys[1]]
            names = [f"model.layers.{i}.{template}" for i in range(cfg.n_layers)]
            item_shape = tuple(var.shape[1:])
            short = keys[1]
        else:
            template, kind = _GLOBAL_KEYS[keys[0]]
            names = [template]
            item_shape = tuple(var.shape)
            short = keys[0]
        entries.append((tuple(keys), var, names, kind, item_shape, _hf_shape(item_shape, kind, short)))
    return entries


def read_config(path: str) -> dict[str, Any]:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path}: no config.json")
    with open(config_path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: invalid JSON ({e})") from e


def default_param_dtype(dtype: str) -> str:
    """Storage dtype for a compute dtype: float32 master weights under a 16-bit float compute
    (an AdamW step of lr 1e-6 is below bfloat16's resolution for most weights), else `dtype`."""
    return "float32" if np.dtype(jnp.dtype(dtype)).itemsize == 2 else np.dtype(jnp.dtype(dtype)).name


def load_hf(path: str, dtype: str | None = "float32", *, param_dtype: str | None = None, mesh=None,
            rules=sharding_lib.DEFAULT_RULES, allow_nonfinite: bool = False,
            **config_overrides) -> Transformer:
    """Loads an HF Llama / Qwen2 / Qwen3 checkpoint directory into a `Transformer`.

    Args:
      path: directory with `config.json` and `model.safetensors` or a sharded
        `model.safetensors.index.json`.
      dtype: compute dtype ('float32', 'bfloat16'); None: the checkpoint's (`config.json`).
      param_dtype: storage dtype of the weights; None: float32 under a 16-bit compute dtype
        (master weights: a bfloat16 checkpoint loads exactly into float32), else `dtype`.
      mesh: optional `jax.sharding.Mesh`; each tensor is placed straight into its sharding.
      allow_nonfinite: load NaN / inf weights instead of raising `CheckpointError` (a model
        with them computes NaN everywhere; refusing names the tensor at once).
      config_overrides: `ModelConfig` fields to change (e.g. remat="full").
    """
    hf_cfg = read_config(path)
    if dtype is None:
        dtype = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"
    param_dtype = param_dtype or default_param_dtype(dtype)
    cfg = from_hf_config(hf_cfg, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    try:
        tensors = open_checkpoint(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e
    abs_model = abstract_model(cfg)
    graphdef, abs_state = nnx.split(abs_model)
    reader = _TensorReader(path, tensors, allow_nonfinite, np.dtype(jnp.dtype(cfg.param_dtype)))
    arrays = {}
    for keys, var, names, kind, item_shape, hf_shape in _param_entries(cfg, abs_model):
        reader.check(names, hf_shape, needed_for=".".join(keys))
        if mesh is not None:
            sharding = sharding_lib.named_sharding(mesh, sharding_lib.logical_axes_of(var), var.shape, rules)
        else:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        n_layers = cfg.n_layers if keys[0] == "layers" else None
        callback = functools.partial(reader.shard, names, kind, item_shape, n_layers)
        arrays[keys] = jax.make_array_from_callback(tuple(var.shape), sharding, callback)

    extra = [n for n in tensors if n not in reader.used and not n.endswith(_IGNORED_SUFFIXES)
             and not (cfg.tie_embeddings and n == "lm_head.weight")]
    if extra:
        log.warning("%s: %d checkpoint tensors are not used by the model, e.g. %s",
                    path, len(extra), sorted(extra)[:5])

    def fill(path_keys, var):
        keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path_keys)
        if keys not in arrays and isinstance(var, lora.LoRAParam):  # new adapters (B = 0)
            host = _host_init(path_name(path_keys), var, 0)
            sharding = (sharding_lib.named_sharding(mesh, sharding_lib.logical_axes_of(var), var.shape, rules)
                        if mesh is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
            return var.replace(jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx]))
        return var.replace(arrays[keys])

    state = jax.tree_util.tree_map_with_path(fill, abs_state, is_leaf=is_var)
    return nnx.merge(graphdef, state)


class _TensorReader:
    """The tensors of an open checkpoint, read into our layout: shapes checked up front, values
    checked finite once each (every device's shard reads its tensor again)."""

    def __init__(self, path: str, tensors, allow_nonfinite: bool, dtype: np.dtype):
        self.path, self.tensors, self.allow_nonfinite, self.dtype = path, tensors, allow_nonfinite, dtype
        self.used: set[str] = set()      # names the model takes
        self.checked: set[str] = set()   # names whose values were checked finite

    def check(self, names, hf_shape, *, needed_for: str) -> None:
        """Every one of `names` is in the checkpoint with the HF shape the config implies."""
        for name in names:
            if name not in self.tensors:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint "
                                      f"(needed for {needed_for})")
            got = self.tensors[name].shape(name)
            if tuple(got) != tuple(hf_shape):
                raise CheckpointError(f"{self.path}: tensor {name!r} has shape {tuple(got)}, the "
                                      f"config implies {tuple(hf_shape)}")
        self.used.update(names)

    def item(self, name: str, kind: str, item_shape) -> np.ndarray:
        """Tensor `name` in our layout (`_hf_to_ours`)."""
        try:
            raw = self.tensors[name].get(name)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from e
        if not self.allow_nonfinite and name not in self.checked and not np.isfinite(raw).all():
            raise CheckpointError(f"{self.path}: tensor {name!r} holds NaN or inf values "
                                  "(load_hf(..., allow_nonfinite=True) loads it anyway)")
        self.checked.add(name)
        return _hf_to_ours(raw, kind, item_shape)

    def shard(self, names, kind: str, item_shape, n_layers: int | None, index) -> np.ndarray:
        """One device's shard `index` of a parameter (`jax.make_array_from_callback`'s callback):
        of the one tensor `names[0]`, or, with `n_layers`, stacked over the layers `index[0]`."""
        if n_layers is None:
            return np.asarray(self.item(names[0], kind, item_shape)[index], dtype=self.dtype)
        layers = range(*index[0].indices(n_layers))
        return np.stack([np.asarray(self.item(names[i], kind, item_shape)[index[1:]], dtype=self.dtype)
                         for i in layers])


def _host_array(value: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not value.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def save_hf(model: Transformer, path: str, *, dtype: str | None = None,
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `model` as an HF checkpoint directory that transformers' `from_pretrained` loads.

    `dtype` is the tensors' dtype (and `config.json`'s `torch_dtype`). None: the compute dtype
    when it is a 16-bit float, else the weights' own dtype. So bfloat16 compute on float32
    masters exports bfloat16: the weights the policy computed (and sampled) with, at the size of
    the HF checkpoint it started from and in the dtype inference engines expect; the masters'
    bits below bfloat16 are kept by the orbax checkpoints, which resume training
    (`dtype="float32"` exports them too).

    Tensors are written one parameter at a time (gathered from their shards); files above
    `max_shard_bytes` are split with a `model.safetensors.index.json`. In a multi-process run every
    process must call this (the gathers are collective); only process 0 writes.
    """
    if lora.has_adapters(model):
        raise ValueError("save_hf: the model has LoRA adapters; export `models.peft_io.save_merged_hf` "
                         "(the merged model) or `save_peft` (the adapters in PEFT's format)")
    cfg = model.config
    dtype = dtype or (cfg.dtype if cfg.compute_dtype.itemsize == 2 else cfg.param_dtype)
    np_dtype = np.dtype(jnp.dtype(dtype))
    entries = _param_entries(cfg, model)
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    source = {}
    for keys, var, names, kind, item_shape, hf_shape in entries:
        for i, name in enumerate(names):
            specs[name] = (tuple(hf_shape), np_dtype)
            source[name] = (var, i if keys[0] == "layers" else None, kind, hf_shape)

    cache: dict[int, np.ndarray] = {}

    def produce(name):
        var, layer, kind, hf_shape = source[name]
        key = id(var)
        if key not in cache:  # gather each parameter once, drop the previous one
            cache.clear()
            cache[key] = _host_array(var[...])
        array = cache[key] if layer is None else cache[key][layer]
        return _ours_to_hf(np.asarray(array, dtype=np_dtype), kind, hf_shape)

    is_writer = jax.process_index() == 0
    if is_writer:
        os.makedirs(path, exist_ok=True)
        hf_cfg = to_hf_config(cfg.replace(param_dtype=dtype))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
    sizes = [(n, int(np.prod(s)) * d.itemsize) for n, (s, d) in specs.items()]
    shards = plan_shards(sizes, max_shard_bytes)
    if len(shards) == 1:
        files = {"model.safetensors": shards[0]}
    else:
        files = {f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors": names
                 for k, names in enumerate(shards)}
    for filename, names in files.items():
        if is_writer:
            write_safetensors(os.path.join(path, filename), {n: specs[n] for n in names}, produce)
        else:
            for n in names:  # take part in the collective gathers
                produce(n)
    if is_writer and len(files) > 1:
        index = {"metadata": {"total_size": sum(b for _, b in sizes)},
                 "weight_map": {n: f for f, names in files.items() for n in names}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
