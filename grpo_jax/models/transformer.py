"""The decoder: one Flax NNX module for Llama 3.x, Qwen2/2.5 and Qwen3 (see `config.py`).

Layer parameters are stacked on a leading `layers` axis and the forward pass is a `lax.scan`
over them, so a 36-layer model compiles as fast as a 2-layer one and each layer can be
rematerialised in the backward pass. Every parameter carries `logical_axes` metadata that
`grpo_jax.sharding` maps to mesh axes.

Attention masks are built from two per-token arrays instead of a [B, T, T] input:
- `segment_ids_BT`: 0 on padding, >0 on real tokens (rows may pack several segments); a query
  attends to keys of the same segment at the same or an earlier index (causal by *index*, so
  left padding needs no special handling).
- `positions_BT`: RoPE positions (0 at each sequence's first real token).

KV-cache mode (`decode`) keeps keys/values for every layer in a preallocated `KVCache` with a
common write `index`; `kv_valid_BS` marks which cache slots hold real tokens. It runs the layers
as straight-line code over per-layer arrays (`unstack_layers`, cache arrays per layer): inside
a sampler's decode loop a scan over stacked weights would copy every layer's weights and cache
out of the stacks at every step, which costs more than the step's own matmuls on CPU.
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import sharding as sharding_lib
from grpo_jax.models.config import ModelConfig, rope_inv_freq
from grpo_jax.models.dense import DENSE_NAME, dense
from grpo_jax.utils import is_var, path_name

# Fills masked attention scores; finite so that a fully masked row (a padding query) gives a
# uniform average instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class KVCache(NamedTuple):
    """Keys/values per layer, head-major: k a tuple of L arrays [B, Hkv, Dh, S] (stored
    transposed, so the scores q @ k are a plain matmul on the stored matrix, with no per-step
    transpose or repacking of the cache), v a tuple of L arrays [B, Hkv, S, Dh];
    kv_valid [B, S]; index: the next slot to write, common to all rows (a scalar) or per row
    ([B], the rollout engine's slots)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    kv_valid: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.kv_valid.shape[1]

    def repeat_rows(self, n: int) -> "KVCache":
        """Each row repeated n times (row-major): a prompt's cache shared by its group."""
        rep = lambda x: jnp.repeat(x, n, axis=0)
        return KVCache(k=tuple(map(rep, self.k)), v=tuple(map(rep, self.v)), kv_valid=rep(self.kv_valid),
                       index=self.index)


def rms_norm(x, weight, eps):
    """HF-compatible RMSNorm: statistics in float32, result cast back before the scale."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope_cos_sin(positions_BT, inv_freq_F, dtype):
    """cos/sin tables [B, T, Dh] in HF's non-interleaved layout ([f, f] concatenated)."""
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq_F
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x_BTHD, cos_BTD, sin_BTD):
    half = x_BTHD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTHD[..., half:], x_BTHD[..., :half]], axis=-1)
    return x_BTHD * cos_BTD[:, :, None, :] + rotated * sin_BTD[:, :, None, :]


def attention(q_BTHD, k, v, mask_BTS, *, cache_layout: bool = False):
    """Grouped-query softmax attention; scores and softmax in float32, no K/V repetition.

    k, v are [B, S, Hkv, Dh]; with `cache_layout` they are the KV cache's k [B, Hkv, Dh, S]
    and v [B, Hkv, S, Dh].
    Both products are written as plain batched matmuls, [B, Hkv] batch dims first, with a
    group's G query heads and T positions as the rows: XLA:CPU runs that layout as one batched
    GEMM, where the equivalent einsum over [B, T, Hkv, G, Dh] made it copy operands around
    every product (docs/performance.md, "Sampler").
    """
    b, t, h, d = q_BTHD.shape
    # Training keeps k [B, Hkv, S, Dh]: its transpose to [.., Dh, S] costs more in the backward
    # pass than the decode step saves by storing it.
    k_spec = "bkds" if cache_layout else "bksd"
    if not cache_layout:
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    kv_heads = k.shape[1]
    g = h // kv_heads
    q_BKQD = q_BTHD.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    scores = jnp.einsum(f"bkqd,{k_spec}->bkqs", q_BKQD, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = scores.reshape(b, kv_heads, g, t, -1)
    scores = jnp.where(mask_BTS[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, g * t, -1)
    out_BKQD = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    return out_BKQD.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


INIT_STD = 0.02

# `ModelConfig.remat` -> what `jax.checkpoint` may save of a layer (None: no checkpoint at all).
# "dots": the outputs of the weight matmuls, which all go through `dense` and carry its name (on
# CPU its custom gradient hides the dot from a dots-based policy); attention's scores and
# probabilities [B, H, T, S] are recomputed, never stored per layer.
_REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.save_only_these_names(DENSE_NAME),
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _param(rngs, shape, axes, dtype, init="normal"):
    """A parameter with its logical axes and its initialiser's name as metadata."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes, init=init)


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading `layers` axis of size L."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, H, K, Dh, F = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                             cfg.d_ff)
        dt = cfg.weight_dtype
        self.attn_norm = _param(rngs, (L, D), ("layers", "norm"), dt, "ones")
        self.wq = _param(rngs, (L, D, H, Dh), ("layers", "embed", "q_heads", "head_dim"), dt)
        self.wk = _param(rngs, (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), dt)
        self.wv = _param(rngs, (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), dt)
        self.wo = _param(rngs, (L, H, Dh, D), ("layers", "q_heads", "head_dim", "embed"), dt)
        if cfg.qkv_bias:
            self.bq = _param(rngs, (L, H, Dh), ("layers", "q_heads", "head_dim"), dt, "zeros")
            self.bk = _param(rngs, (L, K, Dh), ("layers", "kv_heads", "head_dim"), dt, "zeros")
            self.bv = _param(rngs, (L, K, Dh), ("layers", "kv_heads", "head_dim"), dt, "zeros")
        if cfg.qk_norm:
            self.q_norm = _param(rngs, (L, Dh), ("layers", "norm"), dt, "ones")
            self.k_norm = _param(rngs, (L, Dh), ("layers", "norm"), dt, "ones")
        self.mlp_norm = _param(rngs, (L, D), ("layers", "norm"), dt, "ones")
        self.w_gate = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), dt)
        self.w_up = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), dt)
        self.w_down = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), dt)

    def stacked(self) -> dict[str, jax.Array]:
        """The raw stacked arrays, keyed by parameter name (the scan's `xs`)."""
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}


def _dense(cfg: ModelConfig, x, w):
    return dense(x, w, cpu_weight_grad=cfg.cpu_weight_grad)


def _project_qkv(cfg: ModelConfig, p, h, dt):
    """q [B, T, H, Dh], k and v [B, T, K, Dh]: three matmuls, or one on the fused `wqkv`."""
    if "wqkv" in p:
        b, t, _ = h.shape
        qkv = _dense(cfg, h, p["wqkv"].astype(dt))
        if cfg.qkv_bias:
            qkv = qkv + p["bqkv"].astype(dt)
        sizes = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
        q, k, v = jnp.split(qkv, (sizes[0], sizes[0] + sizes[1]), axis=-1)
        return (q.reshape(b, t, cfg.n_heads, cfg.head_dim), k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim),
                v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim))
    b, t, d = h.shape
    q, k, v = (_dense(cfg, h, p[n].astype(dt).reshape(d, -1)).reshape(b, t, *p[n].shape[1:])
               for n in ("wq", "wk", "wv"))
    if cfg.qkv_bias:
        q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    return q, k, v


def fuse_layer(cfg: ModelConfig, p: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """One layer's weights with q/k/v and gate/up concatenated: two wide matmuls instead of five
    narrow ones (a decode step's matmuls have only B rows, where width pays on CPU and GPU)."""
    d = cfg.d_model
    fused = {k: v for k, v in p.items() if k not in ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up")}
    fused["wqkv"] = jnp.concatenate([p[n].reshape(d, -1) for n in ("wq", "wk", "wv")], axis=1)
    if cfg.qkv_bias:
        fused["bqkv"] = jnp.concatenate([p[n].reshape(-1) for n in ("bq", "bk", "bv")])
    fused["w_gate_up"] = jnp.concatenate([p["w_gate"], p["w_up"]], axis=1)
    return fused


def _layer(cfg: ModelConfig, p, x_BTD, cos, sin, attend):
    """One pre-norm decoder layer. `attend(q, k, v) -> out` hides the cache / no-cache choice."""
    dt = cfg.compute_dtype
    h = rms_norm(x_BTD, p["attn_norm"].astype(dt), cfg.rms_norm_eps)
    q, k, v = _project_qkv(cfg, p, h, dt)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"].astype(dt), cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"].astype(dt), cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn_out, extra = attend(q, k, v)
    b, t, d = x_BTD.shape
    x_BTD = x_BTD + _dense(cfg, attn_out.reshape(b, t, -1), p["wo"].astype(dt).reshape(-1, d))
    h = rms_norm(x_BTD, p["mlp_norm"].astype(dt), cfg.rms_norm_eps)
    if "w_gate_up" in p:
        gate, up = jnp.split(_dense(cfg, h, p["w_gate_up"].astype(dt)), 2, axis=-1)
    else:
        gate, up = _dense(cfg, h, p["w_gate"].astype(dt)), _dense(cfg, h, p["w_up"].astype(dt))
    x_BTD = x_BTD + _dense(cfg, jax.nn.silu(gate) * up, p["w_down"].astype(dt))
    return x_BTD, extra


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens_BT)` -> float32 logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dt = cfg.weight_dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dt)
        self.layers = DecoderLayers(cfg, rngs)
        self.final_norm = _param(rngs, (cfg.d_model,), ("norm",), dt, "ones")
        if not cfg.tie_embeddings:
            # [V, D] like the embedding: a wide [D, V] matrix with a power-of-two row stride makes
            # the CPU matmul of a decode step several times slower.
            self.lm_head = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dt)

    # -- pieces -------------------------------------------------------------------------------
    def unembedding(self) -> jax.Array:
        """The output projection as [V, D]: logits = hidden @ W.T (the embedding itself when tied)."""
        return self.embed[...] if self.config.tie_embeddings else self.lm_head[...]

    def logits_from_hidden(self, hidden_BTD) -> jax.Array:
        w = self.unembedding().astype(self.config.compute_dtype)
        return jnp.einsum("btd,vd->btv", hidden_BTD, w, preferred_element_type=jnp.float32)

    def _embed(self, tokens_BT):
        return jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.config.compute_dtype)

    def _scan_layers(self, x_BTD, positions_BT, attend_fn, carry_extra, xs_extra=None, fuse=False):
        """Runs every layer; `attend_fn(q, k, v, carry_extra, xs_extra, layer) -> (out, carry)`."""
        cfg = self.config
        cos, sin = rope_cos_sin(positions_BT, rope_inv_freq(cfg), cfg.compute_dtype)

        def body(carry, xs):
            x, extra, layer = carry
            params, layer_xs = xs
            if fuse:  # concatenated here, so gradients flow back to the separate weights
                params = fuse_layer(cfg, params)
            attend = lambda q, k, v: attend_fn(q, k, v, extra, layer_xs, layer)
            x, extra = _layer(cfg, params, x, cos, sin, attend)
            return (x, extra, layer + 1), None

        policy = _REMAT_POLICIES[cfg.remat]
        if policy is not None:
            # prevent_cse=False: inside a scan the recomputation cannot be merged with the
            # forward pass anyway, and the barriers it would add only block fusion.
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        init = (x_BTD, carry_extra, jnp.zeros((), jnp.int32))
        (x_BTD, carry_extra, _), _ = jax.lax.scan(body, init, (self.layers.stacked(), xs_extra))
        return rms_norm(x_BTD, self.final_norm[...].astype(cfg.compute_dtype), cfg.rms_norm_eps), carry_extra

    # -- full forward (training, scoring) -------------------------------------------------------
    def hidden_states(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *,
                      fuse: bool = False) -> jax.Array:
        """Final-normed hidden states [B, T, D] (feed to `logits_from_hidden` or chunked log-probs).

        `fuse`: q/k/v and gate/up as one wide matmul each (`fuse_layer`, same values and
        gradients; faster on CPU). Only for weights whose head / MLP axes are not sharded.
        """
        b, t = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((b, t), jnp.int32)
        idx = jnp.arange(t)
        mask_BTS = ((segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
                    & (idx[None, :, None] >= idx[None, None, :]))

        def attend(q, k, v, extra, layer_xs, layer):
            return attention(q, k, v, mask_BTS), extra

        hidden, _ = self._scan_layers(self._embed(tokens_BT), positions_BT, attend, (), fuse=fuse)
        return hidden

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None) -> jax.Array:
        return self.logits_from_hidden(self.hidden_states(tokens_BT, positions_BT, segment_ids_BT))

    # -- KV-cache mode (sampling) -----------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        cfg = self.config
        dtype = dtype or cfg.compute_dtype
        k_shape = (batch_size, cfg.n_kv_heads, cfg.head_dim, max_length)
        v_shape = (batch_size, cfg.n_kv_heads, max_length, cfg.head_dim)
        return KVCache(k=tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers)),
                       v=tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers)),
                       kv_valid=jnp.zeros((batch_size, max_length), bool),
                       index=jnp.zeros((), jnp.int32))

    def unstack_layers(self, fuse: bool = False) -> list[dict[str, jax.Array]]:
        """Per-layer parameter dicts (`fuse`: with `fuse_layer`'s concatenated matmuls).
        Call once outside a decode loop and pass to `decode`."""
        stacked = self.layers.stacked()
        layers = [{name: w[i] for name, w in stacked.items()} for i in range(self.config.n_layers)]
        return [fuse_layer(self.config, p) for p in layers] if fuse else layers

    def decode(self, tokens_BT, positions_BT, valid_BT, cache: KVCache, layers=None):
        """Runs T new tokens against the cache (prefill when T > 1, one decode step when T == 1).

        The new keys/values are written at cache slots [index, index + T): `cache.index` is a
        scalar (every row writes at the same slot, the sampler's left-padded batch) or [B], one
        write slot per row (the rollout engine's slots, each holding its own episode).
        `valid_BT` marks real tokens (False on padding). Returns hidden [B, T, D] (final-normed)
        and the updated cache. Query i attends to valid slots <= index + i. `layers`: the result
        of `unstack_layers()` (computed here when None).
        """
        cfg = self.config
        t = tokens_BT.shape[1]
        start = cache.index
        kv_valid = _write_at(cache.kv_valid, valid_BT.astype(bool), start, axis=1)
        slots = jnp.arange(cache.max_length)
        q_slots_BT = (start[:, None] if start.ndim else start) + jnp.arange(t)[None, :]
        mask_BTS = kv_valid[:, None, :] & (slots[None, None, :] <= q_slots_BT[:, :, None])
        cos, sin = rope_cos_sin(positions_BT, rope_inv_freq(cfg), cfg.compute_dtype)
        x = self._embed(tokens_BT)
        new_k, new_v = [], []
        for params, k_cache, v_cache in zip(layers or self.unstack_layers(), cache.k, cache.v):
            def attend(q, k, v, k_cache=k_cache, v_cache=v_cache):
                k_cache = _write_at(k_cache, k.transpose(0, 2, 3, 1).astype(k_cache.dtype), start, axis=3)
                v_cache = _write_at(v_cache, v.swapaxes(1, 2).astype(v_cache.dtype), start, axis=2)
                out = attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask_BTS, cache_layout=True)
                return out, (k_cache, v_cache)

            x, (k_cache, v_cache) = _layer(cfg, params, x, cos, sin, attend)
            new_k.append(k_cache)
            new_v.append(v_cache)
        hidden = rms_norm(x, self.final_norm[...].astype(cfg.compute_dtype), cfg.rms_norm_eps)
        return hidden, KVCache(k=tuple(new_k), v=tuple(new_v), kv_valid=kv_valid, index=start + t)


def _write_at(cache_arr, update, start, *, axis: int):
    """`update` written into `cache_arr` ([B, ...]) at offset `start` along `axis`: one offset
    for every row (a scalar `start`) or one per row ([B]; a scatter, in place under donation)."""
    if start.ndim == 0:
        offsets = [jnp.zeros((), jnp.int32)] * cache_arr.ndim
        offsets[axis] = start.astype(jnp.int32)
        return jax.lax.dynamic_update_slice(cache_arr, update, offsets)

    def one_row(row, upd, s):
        offsets = [jnp.zeros((), jnp.int32)] * row.ndim
        offsets[axis - 1] = s.astype(jnp.int32)
        return jax.lax.dynamic_update_slice(row, upd, offsets)

    return jax.vmap(one_row)(cache_arr, update, start)


def _host_init(name: str, var: nnx.Variable, seed: int) -> np.ndarray:
    kind = var.get_metadata().get("init", "normal")
    dtype = np.dtype(jnp.dtype(var.dtype))
    if kind == "ones":
        return np.ones(var.shape, dtype)
    if kind == "zeros":
        return np.zeros(var.shape, dtype)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return (INIT_STD * rng.standard_normal(var.shape, dtype=np.float32)).astype(dtype)


def create_model(cfg: ModelConfig, seed: int = 0, *, mesh=None, rules=None) -> Transformer:
    """A randomly initialised model (N(0, 0.02) matrices, unit norms, zero biases).

    Weights are drawn on the host with numpy, one parameter at a time and seeded by
    (seed, parameter name), so the same seed gives the same weights on any mesh, and nothing is
    compiled (a compiled random initialiser costs seconds of XLA time on CPU). With `mesh`, each
    parameter is placed straight into its logical-axis sharding.
    """
    graphdef, abs_state = nnx.split(abstract_model(cfg))

    def build(path, var):
        host = _host_init(path_name(path), var, seed)
        if mesh is None:
            return var.replace(jnp.asarray(host))
        sharding = sharding_lib.named_sharding(
            mesh, sharding_lib.logical_axes_of(var), var.shape, rules or sharding_lib.DEFAULT_RULES)
        return var.replace(jax.make_array_from_callback(var.shape, sharding, lambda idx: host[idx]))

    state = jax.tree_util.tree_map_with_path(build, abs_state, is_leaf=is_var)
    return nnx.merge(graphdef, state)


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and dtypes, nothing allocated."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))


def param_count(model: nnx.Module) -> int:
    """Number of parameters (works on abstract models from `abstract_model`)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
