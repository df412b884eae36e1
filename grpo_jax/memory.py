"""Per-device memory plan of a GRPO run, from shapes and shardings alone (nothing is allocated).

For a model config and a (data, fsdp, tp) mesh shape, every array the run keeps on a device is
listed with its global shape, dtype and `PartitionSpec` (the same logical-axis rules as
`grpo_jax.sharding`, so a mesh axis that does not divide a dimension is dropped here exactly as
it is when the arrays are placed). The bytes one device holds of an array are

    device_bytes = itemsize * prod_d shape[d] / prod(sizes of the mesh axes that shard d)

Shapes come from `jax.eval_shape` (`abstract_model`, `optimizer.init`); the mesh is a
`jax.sharding.AbstractMesh`, so 8 or 256 devices can be planned on one CPU.

Categories and their assumptions (the table repeats them):

- params:      the policy weights in `param_dtype`: the float32 masters of a bfloat16-compute
               run, or the weights themselves when `param_dtype` is the compute dtype.
- gradients:   the train step's gradient accumulator, sharded like the params, in `grad_dtype`
               (float32: `train_step` accumulates micro-batch gradients in float32). The
               transient gradient of one micro-batch (param dtype) is not counted.
- optimizer:   `optimizer.init(params)` under `eval_shape`. "adamw"/"adam" keep mu and nu in
               `optimizer_dtype` (float32 by default, i.e. 2 x 4 bytes a parameter, as
               `grpo_jax.optim.make_optimizer` does for any param dtype). A given optax
               transformation is initialised on the params as stored, as `init_train_state`
               does (a raw `optax.adam` then keeps its moments in the param dtype).
               Moments shard like their parameters; counters and hyper-parameters are replicated.
- reference:   the frozen reference policy for the KL term (beta > 0), sharded like the params.
- kv_cache:    the sampler's cache (`models.KVCache`): per layer k [B, Hkv, Dh, S] and
               v [B, Hkv, S, Dh] with logical axes `sharding.KV_K_AXES` / `KV_V_AXES` (listed
               stacked over a replicated "layers" axis), kv_valid [B, S] (`KV_VALID_AXES`):
               rows over (data, fsdp), KV heads over tp. (The `head_major` layout; the
               accelerators' `seq_major` [B, S, Hkv, Dh] holds the same bytes, split alike.)
- sampling_weights: the compute-dtype copy of the weights the sampler reads during a rollout,
               laid out by `sharding.sampling_rules(rules, gather_weights=...)`: gathered over
               fsdp (the train rules with `embed` unsharded) when `gather_weights`, else the
               train layout. Counted when `gather_weights` or the compute dtype differs from
               `param_dtype`; otherwise the sampler reads the params themselves (0).
- activations: a rough *estimate* for one forward + backward of `train_batch` rows of
               `train_seq` tokens (only when both are given); see `activation_bytes`.

LoRA (`model_cfg.lora_rank > 0`, `grpo_jax.models.lora`): only the adapters (`LoRAParam`s) are
trained. params = the frozen base in the compute dtype (no masters; table part "frozen base") +
the adapters as the model makes them (float32; part "adapters"); gradients and optimizer cover
the adapters only; reference = 0 (the base with adapters off); sampling_weights = the merged
copy W + alpha/r A B in the compute dtype, shaped and laid out like the base (always a copy).

Two sums: `total` (all categories at once, an upper bound) and `peak`, which uses the fact that
the KV cache and the sampler's weights live only during the rollout, gradients and activations
only during the train step:

    peak = params + optimizer + reference
           + max(kv_cache + sampling_weights, gradients + activations)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from grpo_jax import memory_table
from grpo_jax import sharding as sharding_lib
from grpo_jax.models import ModelConfig, abstract_model
from grpo_jax.models.config import remat_mode
from grpo_jax.utils import is_var, path_name

GIB = memory_table.GIB
CATEGORIES = ("params", "gradients", "optimizer", "reference", "kv_cache", "sampling_weights",
              "activations")


# ---------------------------------------------------------------------------------------------
# Mesh shapes and per-device shard sizes.
# ---------------------------------------------------------------------------------------------
def mesh_axis_sizes(mesh: Any) -> dict[str, int]:
    """{"data": d, "fsdp": f, "tp": t} from a Mesh / AbstractMesh, a mapping, or "fsdp=8,tp=2".

    Axes that are not named have size 1.
    """
    if isinstance(mesh, str):
        items = {}
        for part in filter(None, (p.strip() for p in mesh.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"mesh {mesh!r}: expected 'axis=size' items like 'fsdp=8,tp=2'")
            items[name.strip()] = int(value)
        mesh = items
    elif hasattr(mesh, "shape") and isinstance(mesh.shape, Mapping):
        mesh = dict(mesh.shape)
    sizes = {axis: 1 for axis in sharding_lib.MESH_AXES}
    for name, size in dict(mesh).items():
        if name not in sizes:
            raise ValueError(f"mesh axis {name!r} is unknown; axes are {sharding_lib.MESH_AXES}")
        if int(size) < 1:
            raise ValueError(f"mesh axis {name}={size}: sizes must be >= 1 (no -1 in a plan)")
        sizes[name] = int(size)
    return sizes


def abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
    """A device-free mesh with these axis sizes (what `logical_to_spec` needs: `.shape`)."""
    return AbstractMesh(tuple(sizes[a] for a in sharding_lib.MESH_AXES), sharding_lib.MESH_AXES)


def _spec_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def shard_shape(shape, spec: PartitionSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The shape of one device's shard: dimension d divided by its mesh axes' sizes."""
    out = []
    for dim, size in enumerate(shape):
        parts = math.prod(sizes[a] for a in _spec_axes(spec[dim] if dim < len(spec) else None))
        if size % parts:
            raise ValueError(f"spec {spec} does not divide shape {tuple(shape)}")
        out.append(size // parts)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """One array of the plan: its global shape/dtype, its spec and the bytes each device holds."""

    category: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    logical_axes: tuple
    spec: PartitionSpec
    device_bytes: int
    global_bytes: int
    part: str = ""        # a part of the category (LoRA's params: "frozen base", "adapters")


def _leaf(category, name, shape, dtype, logical_axes, mesh, sizes, rules, part="") -> LeafPlan:
    shape = tuple(int(s) for s in shape)
    spec = sharding_lib.logical_to_spec(logical_axes, shape, mesh, rules)
    itemsize = np.dtype(dtype).itemsize
    return LeafPlan(category, name, shape, np.dtype(dtype).name, tuple(logical_axes), spec,
                    math.prod(shard_shape(shape, spec, sizes)) * itemsize,
                    math.prod(shape) * itemsize, part)


def _tree_leaves(category, tree, mesh, sizes, rules, dtype=None, part="") -> list[LeafPlan]:
    """Variables shard by their logical axes (in `dtype` if given); other leaves are replicated."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]:
        if not hasattr(x, "shape"):
            continue
        axes = sharding_lib.logical_axes_of(x) if is_var(x) else (None,) * len(x.shape)
        out.append(_leaf(category, path_name(path), x.shape, dtype or x.dtype, axes, mesh, sizes,
                         rules, part))
    return out


def _cast(params, dtype):
    return jax.tree.map(lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, np.dtype(dtype))), params,
                        is_leaf=is_var)


# ---------------------------------------------------------------------------------------------
# Activations (estimate).
# ---------------------------------------------------------------------------------------------
def activation_bytes(cfg: ModelConfig, mesh, sizes, *, batch: int, seq: int, remat: bool | str,
                     chunk_size: int = 8192, rules=sharding_lib.DEFAULT_RULES) -> int:
    """Rough per-device bytes of activations for one forward + backward of [batch, seq] tokens.

    Counted per layer (compute dtype c; rows over (data, fsdp), heads and MLP columns over tp):
    layer input, 2 normed inputs, attention output, residual: 5 [B, T, D]; q (before and after
    RoPE) 2 [B, T, H, Dh]; k (before/after RoPE), v: 3 [B, T, Hkv, Dh]; attention scores in
    float32 plus probabilities in c: [B, H, T, T] (no flash attention in this codebase);
    gate, up, silu(gate) * up: 3 [B, T, F].

        remat "none": L * layer + layer (the cotangents of the layer being differentiated)
        remat "dots": L * (3 [B, T, D] + [B, T, H + 2 Hkv, Dh] + 2 [B, T, F]) (the layer input
                   and the weight matmuls' outputs) + 2 * layer (one recomputed layer and its
                   cotangents)
        remat "full": L * [B, T, D] (the saved layer inputs) + 2 * layer

    With LoRA (rank r), each target adds its x A [B, T, r] to a layer (and to what "dots" saves).
    plus the chunked log-prob head: 3 float32 [B, T, chunk] (logits, exponentials, cotangent).
    XLA fuses and reorders, so treat the figure as an order of magnitude, not a bound.
    """
    c = cfg.compute_dtype
    B, T, D, H, K, Dh, F = (batch, seq, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                            cfg.d_ff)
    btd = ((B, T, D), ("batch", "seq", None))
    q = ((B, T, H, Dh), ("batch", "seq", "q_heads", "head_dim"))
    kv = ((B, T, K, Dh), ("batch", "seq", "kv_heads", "head_dim"))
    scores = ((B, H, T, T), ("batch", "q_heads", "seq", None))
    mlp = ((B, T, F), ("batch", "seq", "mlp"))
    logits = ((B, T, min(chunk_size, cfg.vocab_size)), ("batch", "seq", None))
    lora = ((B, T, max(cfg.lora_rank, 1)), ("batch", "seq", "lora"))
    n_lora = len(cfg.lora_targets) if cfg.lora_rank else 0

    def nbytes(tensor, dtype, count=1):
        (shape, axes) = tensor
        return count * _leaf("activations", "", shape, dtype, axes, mesh, sizes, rules).device_bytes

    layer = (nbytes(btd, c, 5) + nbytes(q, c, 3) + nbytes(kv, c, 3) + nbytes(scores, "float32")
             + nbytes(scores, c) + nbytes(mlp, c, 3) + nbytes(lora, c, n_lora))
    head = nbytes(logits, "float32", 3)
    mode = remat_mode(remat)
    if mode == "full":
        return cfg.n_layers * nbytes(btd, c) + 2 * layer + head
    if mode == "dots":
        saved = (nbytes(btd, c, 3) + nbytes(q, c) + nbytes(kv, c, 2) + nbytes(mlp, c, 2)
                 + nbytes(lora, c, n_lora))
        return cfg.n_layers * saved + 2 * layer + head
    return (cfg.n_layers + 1) * layer + head


# ---------------------------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes by category; `leaves` lists every array (activations excepted)."""

    label: str
    num_params: int
    mesh_shape: dict[str, int]
    leaves: tuple[LeafPlan, ...]
    activations: int | None                 # estimate, None when not requested
    dtypes: dict[str, str]                  # category -> dtype shown in the table
    notes: dict[str, str]                   # category -> assumption shown in the table
    warnings: tuple[str, ...]               # dimensions a mesh axis could not split
    device_memory: int | None = None        # bytes of one device, for the fits check
    lora_rank: int = 0                      # > 0: only the adapters are trained
    num_trainable: int | None = None        # parameters trained (all of them without LoRA)

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape.values())

    def category_bytes(self, category: str, *, per_device: bool = True,
                       part: str | None = None) -> int | None:
        if category == "activations":
            return self.activations if per_device else None
        field = "device_bytes" if per_device else "global_bytes"
        return sum(getattr(x, field) for x in self.leaves
                   if x.category == category and (part is None or x.part == part))

    @property
    def per_device(self) -> dict[str, int]:
        """Category -> bytes on one device (activations only when estimated)."""
        out = {c: self.category_bytes(c) for c in CATEGORIES}
        return {c: v for c, v in out.items() if v is not None}

    @property
    def total(self) -> int:
        """All categories at once (an upper bound on the per-device need)."""
        return sum(self.per_device.values())

    @property
    def peak(self) -> int:
        """Persistent state + the larger of the rollout (KV cache, sampler weights) and the train
        step (gradients, activations)."""
        b = self.per_device
        rollout = b["kv_cache"] + b["sampling_weights"]
        train = b["gradients"] + b.get("activations", 0)
        return b["params"] + b["optimizer"] + b["reference"] + max(rollout, train)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "num_params": self.num_params, "mesh": dict(self.mesh_shape),
            "lora_rank": self.lora_rank, "num_trainable": self.num_trainable,
            "parts_bytes": {c: {p: self.category_bytes(c, part=p) for p in self.parts(c)}
                            for c in CATEGORIES if len(self.parts(c)) > 1},
            "num_devices": self.num_devices, "per_device_bytes": self.per_device,
            "per_device_gib": {k: v / GIB for k, v in self.per_device.items()},
            "total_bytes": self.total, "peak_bytes": self.peak,
            "device_memory_bytes": self.device_memory, "fits": self.fits,
            "dtypes": dict(self.dtypes), "notes": dict(self.notes),
            "warnings": list(self.warnings),
        }

    def parts(self, category: str) -> dict[str, str]:
        """The parts of a category and their dtypes, in order (LoRA's params: "frozen base",
        "adapters"); one part "" otherwise."""
        return {x.part: x.dtype for x in self.leaves if x.category == category}

    def table(self) -> str:
        return memory_table.format_table(self, CATEGORIES)


def _divisibility_warnings(leaves, mesh, rules) -> list[str]:
    """Arrays where a mesh axis the rules ask for was dropped because it does not divide."""
    out = []
    for leaf in leaves:
        wanted = sharding_lib.logical_to_spec(leaf.logical_axes, None, mesh, rules)
        dropped = [a for entry in wanted for a in _spec_axes(entry)
                   if a not in {b for e in leaf.spec for b in _spec_axes(e)}]
        if dropped:
            out.append(f"{leaf.category}/{leaf.name} {leaf.shape}: not split over "
                       f"{', '.join(dropped)} (does not divide), kept as {leaf.spec}")
    return out


def plan_memory(model_cfg: ModelConfig, mesh: Any, *, param_dtype: str | None = None,
                optimizer: str | optax.GradientTransformation | None = "adamw",
                optimizer_dtype: str = "float32", grad_dtype: str = "float32",
                with_reference: bool = False, reference_dtype: str | None = None,
                kv_batch: int = 0, kv_length: int = 0, kv_dtype: str | None = None,
                gather_weights: bool = True, train_batch: int | None = None, train_seq: int | None = None,
                remat: bool | str | None = None, chunk_size: int = 8192,
                device_memory_gib: float | None = None, rules=sharding_lib.DEFAULT_RULES,
                label: str | None = None) -> MemoryPlan:
    """The per-device memory of a GRPO run (see the module docstring for each category).

    Args:
      model_cfg: the architecture and its compute dtype (`dtype`); `param_dtype` (default: the
        config's) is the weights' storage dtype (float32 masters under bfloat16 compute).
      mesh: a Mesh / AbstractMesh, a {"data", "fsdp", "tp"} mapping, or a string "fsdp=8,tp=2".
      optimizer: "adamw" / "adam" (moments in `optimizer_dtype`), an optax transformation
        (initialised on the params as stored), or None (no optimizer state).
      grad_dtype: dtype of the gradient accumulator (float32 in `train_step`).
      with_reference: keep reference weights (GRPO with beta > 0), in `reference_dtype`
        (default: `param_dtype`).
      kv_batch, kv_length: global rows the sampler decodes at once and cache slots per row
        (prompt + completion budget); `kv_dtype` defaults to the compute dtype (`init_cache`).
      gather_weights: the sampler reads a compute-dtype copy of the weights gathered over fsdp
        (`config.sampling.gather_weights`); False: the train layout (a copy only when the compute
        dtype differs from `param_dtype`).
      train_batch, train_seq: rows and tokens of one forward/backward (the micro-batch, global)
        for the activation estimate; `remat` defaults to the config's.
      device_memory_gib: memory of one device (e.g. 80 for an H100) for the fits check.

    LoRA comes from `model_cfg.lora_rank` / `lora_targets`: the base is then planned in the
    compute dtype whatever `param_dtype`, and `with_reference` keeps nothing (adapters off).
    """
    sizes = mesh_axis_sizes(mesh)
    at = (abstract_mesh(sizes), sizes, rules)  # where every leaf is placed: mesh, sizes, rules
    param_dtype = np.dtype(param_dtype or model_cfg.param_dtype).name
    cfg = model_cfg.replace(param_dtype=param_dtype)
    compute_dtype = np.dtype(cfg.dtype).name
    masters = compute_dtype != cfg.param_dtype
    lora_rank = cfg.lora_rank
    if lora_rank:  # frozen base in the compute dtype; adapters (trained) as the model makes them
        from grpo_jax.models.lora import LoRAParam
        trained, base = nnx.state(abstract_model(cfg), LoRAParam, nnx.Param)
        base = _cast(base, compute_dtype)
        adapters = _tree_leaves("params", trained, *at, part="adapters")
        adapter_dtype = adapters[0].dtype
        params = _Category(_tree_leaves("params", base, *at, part="frozen base") + adapters,
                           f"frozen base ({compute_dtype}) + LoRA adapters ({adapter_dtype}, trained)",
                           compute_dtype if adapter_dtype == compute_dtype else "mixed")
        trained_note = "adapters only"
        reference = _Category([], "none (LoRA: the reference is the base with adapters off)")
    else:
        base = trained = nnx.state(abstract_model(cfg), nnx.Param)
        params = _Category(_tree_leaves("params", trained, *at),
                           f"policy weights (masters of {compute_dtype} compute)" if masters
                           else "policy weights", param_dtype)
        trained_note = "sharded like params"
        reference_dtype = reference_dtype or param_dtype
        reference = (_Category(_tree_leaves("reference", trained, *at, dtype=reference_dtype),
                               "frozen reference policy (beta > 0), sharded like params",
                               np.dtype(reference_dtype).name) if with_reference
                     else _Category([], "none (beta = 0)"))
    categories = {
        "params": params,
        "gradients": _Category(_tree_leaves("gradients", trained, *at, dtype=grad_dtype),
                               f"accumulator, {trained_note}", np.dtype(grad_dtype).name),
        "optimizer": _optimizer_category(optimizer, optimizer_dtype, trained, at, trained_note),
        "reference": reference,
        "kv_cache": _kv_cache_category(cfg, kv_batch, kv_length, kv_dtype, at),
        "sampling_weights": _sampling_weights_category(base, gather_weights, masters or lora_rank,
                                                       compute_dtype, at, merged=bool(lora_rank)),
    }
    remat = cfg.remat if remat is None else remat_mode(remat)
    activations = None
    if train_batch and train_seq:
        activations = activation_bytes(cfg, at[0], sizes, batch=train_batch, seq=train_seq,
                                       remat=remat, chunk_size=chunk_size, rules=rules)
        categories["activations"] = _Category([], f"ESTIMATE for {train_batch} x {train_seq} "
                                              f"tokens, remat {remat}", np.dtype(cfg.dtype).name)
    else:
        categories["activations"] = _Category([], "not estimated (give train_batch and train_seq)")
    leaves = [leaf for category in categories.values() for leaf in category.leaves]
    # Gradients, moments and reference weights shard like the params: report params only.
    warnings = _divisibility_warnings(
        [x for x in leaves if x.category in ("params", "kv_cache")], at[0], rules)
    device_memory = None if device_memory_gib is None else int(device_memory_gib * GIB)
    return MemoryPlan(label=label or cfg.model_type, num_params=_count(base),
                      mesh_shape=sizes, leaves=tuple(leaves), activations=activations,
                      dtypes={k: c.dtype for k, c in categories.items() if c.dtype is not None},
                      notes={k: c.note for k, c in categories.items()}, warnings=tuple(warnings),
                      device_memory=device_memory, lora_rank=lora_rank,
                      num_trainable=_count(trained))


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


class _Category(NamedTuple):  # a category's arrays, the assumption shown for it, its dtype
    leaves: list[LeafPlan]
    note: str
    dtype: str | None = None


def _optimizer_category(optimizer, optimizer_dtype, params, at, like="sharded like params") -> _Category:
    if isinstance(optimizer, str):
        makers = {"adamw": optax.adamw, "adam": optax.adam}
        if optimizer not in makers:
            raise ValueError(f"optimizer {optimizer!r}: use one of {sorted(makers)}, an optax "
                             "transformation or None")
        opt_state = jax.eval_shape(makers[optimizer](1e-3).init, _cast(params, optimizer_dtype))
        return _Category(_tree_leaves("optimizer", opt_state, *at),
                         f"{optimizer}: mu + nu, {like}", np.dtype(optimizer_dtype).name)
    if optimizer is not None:
        opt_state = jax.eval_shape(optimizer.init, params)
        return _Category(_tree_leaves("optimizer", opt_state, *at),
                         "optax state of the given transformation", "mixed")
    return _Category([], "none")


def _kv_cache_category(cfg: ModelConfig, kv_batch: int, kv_length: int, kv_dtype, at) -> _Category:
    """The sampler's cache: per layer k [B, Hkv, Dh, S], v [B, Hkv, S, Dh], kv_valid [B, S]."""
    if not (kv_batch and kv_length):
        return _Category([], "none (give kv_batch and kv_length)")
    kv_dtype = np.dtype(kv_dtype or cfg.dtype).name
    # L arrays per k and v, listed as one stacked over a replicated "layers" axis (same bytes).
    B, K, S, Dh = kv_batch, cfg.n_kv_heads, kv_length, cfg.head_dim
    leaves = [_leaf("kv_cache", name, (cfg.n_layers,) + shape, kv_dtype, ("layers",) + axes, *at)
              for name, shape, axes in (("k", (B, K, Dh, S), sharding_lib.KV_K_AXES),
                                        ("v", (B, K, S, Dh), sharding_lib.KV_V_AXES))]
    leaves.append(_leaf("kv_cache", "kv_valid", (B, S), "bool", sharding_lib.KV_VALID_AXES, *at))
    leaves.append(_leaf("kv_cache", "index", (), "int32", (), *at))
    return _Category(leaves, f"L x k [B={B}, Hkv, Dh, S={S}], v [B, Hkv, S, Dh] + kv_valid",
                     kv_dtype)


def _sampling_weights_category(params, gather_weights: bool, masters: bool, compute_dtype: str,
                               at, merged: bool = False) -> _Category:
    """The compute-dtype copy the sampler reads: gathered over fsdp, or cast in the train layout
    (`merged`: LoRA's W + alpha/r A B, shaped like the base weights, always a copy)."""
    if not (gather_weights or masters):
        return _Category([], "none (the sampler reads the params)")
    mesh, sizes, rules = at
    layout = sharding_lib.sampling_rules(rules, gather_weights=gather_weights)
    leaves = _tree_leaves("sampling_weights", params, mesh, sizes, layout, dtype=compute_dtype)
    what = "merged copy (W + alpha/r A B)" if merged else "copy" if gather_weights else "cast copy"
    return _Category(leaves, f"{what} gathered over fsdp, split over tp, for the rollout"
                     if gather_weights else f"{what} in the train layout, for the rollout",
                     compute_dtype)


def plan_for_run(run) -> MemoryPlan:
    """`plan_memory` of a `components.Run`: its model, mesh, optimizer and batch, against the
    memory of its first local device (when the backend reports it). The train step's
    micro-batch is `run.train.micro_batch_size` rows (packed: of `micro_batch_tokens` //
    max_seq_len) or the batch's rows (packed: at most one row per episode), of
    rollout.max_seq_len tokens (the packed width; one episode per row: the widest). LoRA: the
    model config's `lora_rank` / `lora_targets` (from `config.lora`)."""
    c = run.config
    rows = c.train.prompts_per_step * c.rollout.group_size
    kv_batch, kv_length = rows, c.rollout.max_seq_len  # the lockstep sampler: every episode at once
    if run.engine is not None:  # the engine: its slots on every process, a chunk of spare positions each
        kv_batch = run.engine.slots * jax.process_count()
        kv_length = run.engine.max_length + run.engine.prefill_chunk
    stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)() or {}
    limit = stats.get("bytes_limit")
    return plan_memory(run.model.config, dict(run.mesh.shape), optimizer=run.optimizer,
                       with_reference=run.uses_reference, kv_batch=kv_batch, kv_length=kv_length,
                       gather_weights=c.sampling.gather_weights,
                       train_batch=run.train.micro_batch_size or rows, train_seq=c.rollout.max_seq_len,
                       chunk_size=run.train.chunk_size, device_memory_gib=limit / GIB if limit else None,
                       label=c.model.hf_path or f"{run.model.config.model_type} from the config")
