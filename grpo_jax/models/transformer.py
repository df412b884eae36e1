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

Attention runs as `cfg.attention` says (`models.attention`: XLA, cuDNN or splash, chosen per
platform). KV-cache mode (`decode`) keeps keys/values for every layer in a preallocated
`KVCache` (`models.kv_cache`: its layout per platform, and decode attention that reads only the
cache's live prefix); `kv_valid_BS` marks which positions hold real tokens. It runs the layers
as straight-line code over per-layer arrays (`unstack_layers`, cache arrays per layer): inside
a sampler's decode loop a scan over stacked weights would copy every layer's weights and cache
out of the stacks at every step, which costs more than the step's own matmuls on CPU.
"""

from __future__ import annotations

import math
import zlib
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import sharding as sharding_lib
from grpo_jax.models import kv_cache, lora
from grpo_jax.models.attention import segment_attention, takes_length
from grpo_jax.models.config import ModelConfig, rope_inv_freq
from grpo_jax.models.kv_cache import KVCache
from grpo_jax.models.dense import DENSE_NAME, dense
from grpo_jax.utils import is_var, path_name

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


def _param(rngs, shape, axes, dtype, init="normal", kind=nnx.Param):
    """A parameter with its logical axes and its initialiser's name as metadata."""
    if init == "lora_a":  # PEFT's: uniform in +-1/sqrt(fan_in)
        bound = shape[-2] ** -0.5
        value = jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound).astype(dtype)
        return kind(value, logical_axes=axes, init=init)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return kind(value, logical_axes=axes, init=init)


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
        for name in cfg.lora_targets if cfg.lora_rank else ():  # adapters in float32 (trained)
            (n_in, n_out), (ax_in, ax_out) = lora.target_sizes(cfg, name), lora.target_axes(name)
            setattr(self, f"lora_a_{name}", _param(rngs, (L, n_in, cfg.lora_rank), ("layers", ax_in, "lora"),
                                                   jnp.float32, "lora_a", lora.LoRAParam))
            setattr(self, f"lora_b_{name}", _param(rngs, (L, cfg.lora_rank, n_out), ("layers", "lora", ax_out),
                                                   jnp.float32, "zeros", lora.LoRAParam))

    def stacked(self) -> dict[str, jax.Array]:
        """The raw stacked arrays, keyed by parameter name (the scan's `xs`)."""
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}


def _dense(cfg: ModelConfig, x, w):
    return dense(x, w, cpu_weight_grad=cfg.cpu_weight_grad)


def _project_qkv(cfg: ModelConfig, p, h, dt):
    """q [B, T, H, Dh], k and v [B, T, K, Dh]: three matmuls, or one on the fused `wqkv`."""
    if "wqkv" in p:
        qkv = _dense(cfg, h, p["wqkv"].astype(dt))
        if cfg.qkv_bias:
            qkv = qkv + p["bqkv"].astype(dt)
        sizes = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
        q, k, v = jnp.split(qkv, (sizes[0], sizes[0] + sizes[1]), axis=-1)
    else:
        d = h.shape[-1]
        q, k, v = (_dense(cfg, h, p[n].astype(dt).reshape(d, -1)) for n in ("wq", "wk", "wv"))
        if cfg.qkv_bias:
            q, k, v = q + p["bq"].astype(dt).reshape(-1), k + p["bk"].astype(dt).reshape(-1), v + p["bv"].astype(dt).reshape(-1)
    q, k, v = (_adapted(cfg, p, n, h, y, dt) for n, y in (("wq", q), ("wk", k), ("wv", v)))
    b, t, _ = h.shape
    return (q.reshape(b, t, cfg.n_heads, cfg.head_dim), k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim),
            v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim))


def _adapted(cfg: ModelConfig, p, name: str, x, y, dt):
    """y, plus target `name`'s LoRA term of input x when the layer has adapters."""
    extra = lora.delta(cfg, p, name, x, dt)
    return y if extra is None else y + extra


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
    attn_flat = attn_out.reshape(b, t, -1)
    x_BTD = x_BTD + _adapted(cfg, p, "wo", attn_flat, _dense(cfg, attn_flat, p["wo"].astype(dt).reshape(-1, d)), dt)
    h = rms_norm(x_BTD, p["mlp_norm"].astype(dt), cfg.rms_norm_eps)
    if "w_gate_up" in p:
        gate, up = jnp.split(_dense(cfg, h, p["w_gate_up"].astype(dt)), 2, axis=-1)
    else:
        gate, up = _dense(cfg, h, p["w_gate"].astype(dt)), _dense(cfg, h, p["w_up"].astype(dt))
    gate, up = _adapted(cfg, p, "w_gate", h, gate, dt), _adapted(cfg, p, "w_up", h, up, dt)
    act = jax.nn.silu(gate) * up
    x_BTD = x_BTD + _adapted(cfg, p, "w_down", act, _dense(cfg, act, p["w_down"].astype(dt)), dt)
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
                      fuse: bool = False, mesh=None) -> jax.Array:
        """Final-normed hidden states [B, T, D] (feed to `logits_from_hidden` or chunked log-probs).

        `fuse`: q/k/v and gate/up as one wide matmul each (`fuse_layer`, same values and
        gradients; faster on CPU). Only for weights whose head / MLP axes are not sharded.
        `mesh`: the mesh the batch is sharded on (splash attention runs under `shard_map` on it).
        """
        b, t = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((b, t), jnp.int32)

        def attend(q, k, v, extra, layer_xs, layer):
            return segment_attention(q, k, v, segment_ids_BT, impl=self.config.attention, mesh=mesh), extra

        hidden, _ = self._scan_layers(self._embed(tokens_BT), positions_BT, attend, (), fuse=fuse)
        return hidden

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None) -> jax.Array:
        return self.logits_from_hidden(self.hidden_states(tokens_BT, positions_BT, segment_ids_BT))

    # -- KV-cache mode (sampling) -----------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        cfg = self.config
        return kv_cache.empty(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, max_length,
                              dtype or cfg.compute_dtype, cfg.kv_layout)

    def unstack_layers(self, fuse: bool = False) -> list[dict[str, jax.Array]]:
        """Per-layer parameter dicts (`fuse`: with `fuse_layer`'s concatenated matmuls).
        Call once outside a decode loop and pass to `decode`."""
        stacked = self.layers.stacked()
        layers = [{name: w[i] for name, w in stacked.items()} for i in range(self.config.n_layers)]
        return [fuse_layer(self.config, p) for p in layers] if fuse else layers

    def decode(self, tokens_BT, positions_BT, valid_BT, cache: KVCache, layers=None, *,
               contiguous: bool = False, fresh: bool = False):
        """Runs T new tokens against the cache (prefill when T > 1, one decode step when T == 1).

        The new keys/values are written at cache positions [index, index + T): `cache.index` is
        a scalar (every row writes at the same position, the sampler's left-padded batch) or [B],
        one write position per row (the rollout engine's slots, each holding its own episode).
        `valid_BT` marks real tokens (False on padding). Returns hidden [B, T, D] (final-normed)
        and the updated cache. Query i attends to valid positions <= index + i, read as
        `cfg.decode_attention` says (`models.kv_cache`). `layers`: the result of
        `unstack_layers()` (computed here when None). `contiguous`: each row's valid positions
        are [0, index + T) (the engine's slots). `fresh`: the cache is empty and index 0 (a first
        prefill): the tokens attend to each other only, with the training attention
        (`cfg.attention`), never reading the cache's empty positions.
        """
        cfg = self.config
        t = tokens_BT.shape[1]
        start = cache.index
        kv_valid = kv_cache.write_at(cache.kv_valid, valid_BT.astype(bool), start, axis=1)
        positions_S = jnp.arange(cache.max_length)
        q_pos_BT = (start[:, None] if start.ndim else start) + jnp.arange(t)[None, :]
        mask_BTS = kv_valid[:, None, :] & (positions_S[None, None, :] <= q_pos_BT[:, :, None])
        end_B = jnp.broadcast_to(start + t, (tokens_BT.shape[0],))
        segment_ids_BT = valid_BT.astype(jnp.int32)
        # A first prefill's length is a prompt bucket, not always what the kernel takes.
        fresh_impl = cfg.attention if takes_length(cfg.attention, t) else "xla"
        cos, sin = rope_cos_sin(positions_BT, rope_inv_freq(cfg), cfg.compute_dtype)
        x = self._embed(tokens_BT)
        new_k, new_v = [], []
        for params, k_cache, v_cache in zip(layers or self.unstack_layers(), cache.k, cache.v):
            def attend(q, k, v, k_cache=k_cache, v_cache=v_cache):
                k_cache, v_cache = kv_cache.write_kv(k_cache, v_cache, k, v, start, cache.layout)
                if fresh:
                    return segment_attention(q, k, v, segment_ids_BT, impl=fresh_impl), (k_cache, v_cache)
                out = kv_cache.decode_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask_BTS, end_B,
                                                layout=cache.layout, impl=cfg.decode_attention,
                                                contiguous=contiguous)
                return out, (k_cache, v_cache)

            x, (k_cache, v_cache) = _layer(cfg, params, x, cos, sin, attend)
            new_k.append(k_cache)
            new_v.append(v_cache)
        hidden = rms_norm(x, self.final_norm[...].astype(cfg.compute_dtype), cfg.rms_norm_eps)
        return hidden, cache._replace(k=tuple(new_k), v=tuple(new_v), kv_valid=kv_valid, index=start + t)


def _host_init(name: str, var: nnx.Variable, seed: int) -> np.ndarray:
    kind = var.get_metadata().get("init", "normal")
    dtype = np.dtype(jnp.dtype(var.dtype))
    if kind == "ones":
        return np.ones(var.shape, dtype)
    if kind == "zeros":
        return np.zeros(var.shape, dtype)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if kind == "lora_a":
        bound = var.shape[-2] ** -0.5
        return rng.uniform(-bound, bound, var.shape).astype(dtype)
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
