"""Device meshes and logical-axis sharding rules.

Every parameter carries `logical_axes` metadata (e.g. ("layers", "embed", "mlp")); a rule table
maps each logical axis to zero or more mesh axes. The mesh has three axes:

- `data`: pure data parallelism (weights replicated),
- `fsdp`: data parallelism with weights sharded along their `embed` dimension (ZeRO-3 style),
- `tp`:   tensor parallelism over heads / MLP columns / vocabulary.

The same code runs on 1 device (every axis of size 1) and on a pod. A mesh axis that does not
divide a dimension is dropped for that dimension (e.g. 2 KV heads on tp=4 are replicated), so
tiny test models shard wherever they can instead of failing.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grpo_jax.utils import is_var

MESH_AXES = ("data", "fsdp", "tp")

# logical axis -> mesh axes (None = replicated). Order matters only for readability.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tp"),
    ("embed", "fsdp"),
    ("mlp", "tp"),
    ("q_heads", "tp"),
    ("kv_heads", "tp"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("seq", None),
    ("cache_seq", None),
    ("lora", None),
)


# Logical axes of the sampler's KV cache (`models.kv_cache.KVCache`): rows over the batch axes,
# KV heads over tp, so a device holds and reads the cache of its own rows and heads only.
KV_K_AXES = ("batch", "kv_heads", "head_dim", "cache_seq")   # head_major: k stored [B, Hkv, Dh, S]
KV_V_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")   # head_major: v [B, Hkv, S, Dh]
KV_SEQ_MAJOR_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")  # seq_major: k and v [B, S, Hkv, Dh]
KV_VALID_AXES = ("batch", "cache_seq")


def sampling_rules(rules=DEFAULT_RULES, *, gather_weights: bool = True):
    """Rules for the weights the sampler reads.

    `gather_weights`: the train rules with `embed` unsharded, i.e. the weights gathered over fsdp
    once per rollout and kept split over tp only. Each decode step reads every weight; with the
    rows split over fsdp and the weights too, every step would all-gather the whole model over
    the fsdp devices (a 0.5B model in bfloat16: ~1 GB a step, 768 steps a rollout), where the
    gather once costs the same bytes once. It holds params / tp bytes of compute-dtype weights
    per device during the rollout; False keeps the train layout (for models whose gathered copy
    does not fit, e.g. 7B on 16 GiB chips with tp = 1).
    """
    if not gather_weights:
        return tuple(rules)
    return tuple((name, None if name == "embed" else target) for name, target in rules)


class ShardingError(ValueError):
    """A mesh that cannot be built from the config or the devices at hand."""


def make_mesh(data: int = 1, fsdp: int = -1, tp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tp) mesh over `devices` (all devices of all processes by default).

    One axis may be -1 and takes what the others leave. On TPU/GPU the device order comes from
    `mesh_utils.create_device_mesh` so that tp neighbours share the fastest links.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": int(data), "fsdp": int(fsdp), "tp": int(tp)}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ShardingError(f"mesh: at most one axis may be -1, got {sizes}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ShardingError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    if free:
        if len(devices) % fixed:
            raise ShardingError(f"mesh: {len(devices)} devices are not divisible by {sizes}")
        sizes[free[0]] = len(devices) // fixed
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ShardingError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
            f"{len(devices)} are available")
    if devices and devices[0].platform in ("tpu", "gpu", "cuda", "rocm"):
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    else:
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_cfg: Mapping[str, Any] | Any | None) -> Mesh:
    """Builds a mesh from a config with `data`, `fsdp`, `tp` fields (a ConfigDict or dict)."""
    if mesh_cfg is None:
        return make_mesh()
    get = mesh_cfg.get if isinstance(mesh_cfg, Mapping) else (lambda k, d: getattr(mesh_cfg, k, d))
    return make_mesh(get("data", 1), get("fsdp", -1), get("tp", 1))


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have these logical names.

    With `shape` and `mesh`, a mesh axis that does not divide its dimension is dropped, and a
    mesh axis is never used for two dimensions of the same array.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        targets = table.get(name) if name is not None else None
        if targets is None:
            spec.append(None)
            continue
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        kept = []
        for axis in targets:
            if axis in used:
                continue
            if mesh is not None:
                size = mesh.shape[axis]
                if size == 1:
                    continue
                if shape is not None and shape[dim] % (size * math.prod(mesh.shape[a] for a in kept)):
                    continue
            kept.append(axis)
        used.update(kept)
        spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes, shape=None, rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def logical_axes_of(variable: nnx.Variable) -> tuple:
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        return (None,) * len(variable.shape)
    return tuple(axes)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """A pytree like `state` (an `nnx.State`, possibly abstract) with a `NamedSharding` per leaf."""
    return jax.tree.map(
        lambda v: named_sharding(mesh, logical_axes_of(v), v.shape, rules), state, is_leaf=is_var)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a [B, ...] batch: B over the data-parallel axes, the rest replicated."""
    return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1), None, rules)


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of `tree` are laid out on, or None when they live on one device."""
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh if sharding.mesh.size > 1 else None
        if sharding is not None and len(sharding.device_set) > 1:
            raise ShardingError("arrays on several devices without a NamedSharding: place them with "
                                "grpo_jax.sharding (a mesh)")
    return None


def can_fuse_projections(mesh, rules=DEFAULT_RULES) -> bool:
    """Whether q/k/v and gate/up may be concatenated into one wide matmul each
    (`models.transformer.fuse_layer`): no mesh, or the head and MLP axes unsplit under `rules`
    (concatenating along a split axis would regather the weights)."""
    if mesh is None:
        return True
    return all(logical_to_spec((axis,), None, mesh, rules) in (PartitionSpec(None), PartitionSpec())
               for axis in ("q_heads", "kv_heads", "mlp"))
