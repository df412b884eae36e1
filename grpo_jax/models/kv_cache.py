"""The sampler's KV cache: its layout per platform, writes at per-row offsets, and decode
attention that reads only the part of the cache that holds tokens.

Layouts (`ModelConfig.kv_layout`, chosen by `grpo_jax.platform`):

| layout | k | v | for |
|---|---|---|---|
| `head_major` | [B, Hkv, Dh, S] | [B, Hkv, S, Dh] | XLA:CPU: the scores q @ k are a plain batched GEMM on the stored matrix, no per-step transpose |
| `seq_major` | [B, S, Hkv, Dh] | [B, S, Hkv, Dh] | GPU / TPU: the layout attention kernels take (Pallas decode attention, splash, cuDNN), a row's first L positions one contiguous prefix |

Decode attention (`ModelConfig.decode_attention`):

- `full`: every step reads all S positions of every row (masked).
- `blocked`: the cache read in blocks of 512 positions, only those below the longest live
  row (a loop whose trip count is read on the device; an online softmax folds the blocks in):
  a cache a quarter full reads about a quarter of it. On CPU and TPU the loop's predicate is
  evaluated where it runs; XLA:GPU copies it to the host every iteration, so GPU uses the
  kernel below instead. (A `lax.switch` over static prefixes was slower on CPU than the full
  read: the conditional copied its cache operands.)
- `pallas_gpu`: the Pallas (Triton) decode-attention kernel with per-row lengths
  (`models.attention.gpu_decode_attention`), which reads only each row's own valid blocks. It
  needs hole-free rows (row b's tokens at positions [0, len_b)), which the rollout engine's
  slots are; the lockstep sampler's left-padded rows are not, so there it runs `full`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grpo_jax import sharding
from grpo_jax.models import config
from grpo_jax.models.attention import MASK_VALUE, attention, gpu_decode_attention
from grpo_jax.utils import round_up

KV_LAYOUTS, DECODE_ATTENTION = config.KV_LAYOUTS, config.DECODE_ATTENTIONS

# Logical axes (`grpo_jax.sharding`) of each layout's k and v: rows over the batch axes, KV heads
# over tp, so a device holds and reads the cache of its own rows and heads only.
_AXES = {"head_major": (sharding.KV_K_AXES, sharding.KV_V_AXES),
         "seq_major": (sharding.KV_SEQ_MAJOR_AXES, sharding.KV_SEQ_MAJOR_AXES)}
_BLOCK = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values per layer in `layout` (k and v tuples of L arrays, see the module table);
    kv_valid [B, S]: which positions hold real tokens; index: the next position to write, common
    to all rows (a scalar) or per row ([B], the rollout engine's slots)."""

    k: tuple
    v: tuple
    kv_valid: jax.Array
    index: jax.Array
    layout: str = dataclasses.field(default="head_major", metadata=dict(static=True))

    @property
    def max_length(self) -> int:
        return self.kv_valid.shape[1]

    def _replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)

    def map_rows(self, fn) -> "KVCache":
        """`fn` applied to every [B, ...] array (k, v, kv_valid), the index kept."""
        return self._replace(k=tuple(map(fn, self.k)), v=tuple(map(fn, self.v)), kv_valid=fn(self.kv_valid))

    def repeat_rows(self, n: int) -> "KVCache":
        """Each row repeated n times (row-major): a prompt's cache shared by its group."""
        return self.map_rows(lambda x: jnp.repeat(x, n, axis=0))

    def map_axes(self, place) -> "KVCache":
        """`place(x, logical_axes)` applied to k, v and kv_valid (e.g. a sharding constraint)."""
        k_axes, v_axes = _AXES[self.layout]
        return self._replace(k=tuple(place(x, k_axes) for x in self.k), v=tuple(place(x, v_axes) for x in self.v),
                             kv_valid=place(self.kv_valid, sharding.KV_VALID_AXES))


def check_layout(layout: str) -> str:
    if layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout {layout!r}: use one of {KV_LAYOUTS}")
    return layout


def empty(n_layers: int, batch: int, kv_heads: int, head_dim: int, max_length: int, dtype,
          layout: str = "head_major") -> KVCache:
    if check_layout(layout) == "head_major":
        k_shape, v_shape = (batch, kv_heads, head_dim, max_length), (batch, kv_heads, max_length, head_dim)
    else:
        k_shape = v_shape = (batch, max_length, kv_heads, head_dim)
    return KVCache(k=tuple(jnp.zeros(k_shape, dtype) for _ in range(n_layers)),
                   v=tuple(jnp.zeros(v_shape, dtype) for _ in range(n_layers)),
                   kv_valid=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32), layout=layout)


def write_kv(k_cache, v_cache, k_BTKD, v_BTKD, start, layout: str):
    """New keys/values [B, T, Hkv, Dh] written at `start` (scalar or [B]) in the layout."""
    if layout == "head_major":
        return (write_at(k_cache, k_BTKD.transpose(0, 2, 3, 1).astype(k_cache.dtype), start, axis=3),
                write_at(v_cache, v_BTKD.swapaxes(1, 2).astype(v_cache.dtype), start, axis=2))
    return (write_at(k_cache, k_BTKD.astype(k_cache.dtype), start, axis=1),
            write_at(v_cache, v_BTKD.astype(v_cache.dtype), start, axis=1))


def write_at(cache_arr, update, start, *, axis: int):
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


def block_size(max_length: int) -> int:
    """Positions per block of `blocked` decode attention: 512 (the fastest on XLA:CPU among 256
    to 2048 at 4096 positions), a quarter of a short cache."""
    return min(_BLOCK, max(8, round_up(max_length // 4, 8)))


def blocked_attention(q_BTHD, k_cache, v_cache, mask_BTS, end_B, *, layout: str):
    """Attention over the blocks of `block_size` positions below max(end_B) only: a loop with a
    trip count read on the device, folding each block into a running softmax (max, sum and
    weighted values in float32, the flash-attention recurrence). A query with no valid position
    gets an average of the values it visited (finite; callers drop it)."""
    b, t, h, d = q_BTHD.shape
    s = mask_BTS.shape[-1]
    head_major = layout == "head_major"
    kv_heads = k_cache.shape[1] if head_major else k_cache.shape[2]
    g = h // kv_heads
    block = block_size(s)
    q_BKQD = q_BTHD.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    k_spec, v_spec, seq_axis = ("bkds", "bksd", (3, 2)) if head_major else ("bskd", "bskd", (1, 1))

    def fold(j, carry):
        m_BKQ, l_BKQ, acc_BKQD = carry
        # The last block may overhang the cache: its start is clamped back, and the positions
        # an earlier block already covered are masked out.
        start = jnp.minimum(j * block, s - block)
        k_blk = jax.lax.dynamic_slice_in_dim(k_cache, start, block, seq_axis[0])
        v_blk = jax.lax.dynamic_slice_in_dim(v_cache, start, block, seq_axis[1])
        fresh_S = start + jnp.arange(block) >= j * block
        mask_BTs = jax.lax.dynamic_slice_in_dim(mask_BTS, start, block, 2) & fresh_S
        scores = jnp.einsum(f"bkqd,{k_spec}->bkqs", q_BKQD, k_blk, preferred_element_type=jnp.float32) * d ** -0.5
        scores = jnp.where(mask_BTs[:, None, None], scores.reshape(b, kv_heads, g, t, block), MASK_VALUE)
        scores = scores.reshape(b, kv_heads, g * t, block)
        m_new = jnp.maximum(m_BKQ, scores.max(-1))
        p = jnp.exp(scores - m_new[..., None])
        scale = jnp.exp(m_BKQ - m_new)
        pv = jnp.einsum(f"bkqs,{v_spec}->bkqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
        return m_new, l_BKQ * scale + p.sum(-1), acc_BKQD * scale[..., None] + pv

    n_blocks = (jnp.max(end_B) + block - 1) // block
    init = (jnp.full((b, kv_heads, g * t), MASK_VALUE, jnp.float32), jnp.zeros((b, kv_heads, g * t), jnp.float32),
            jnp.zeros((b, kv_heads, g * t, d), jnp.float32))
    _, l_BKQ, acc_BKQD = jax.lax.fori_loop(0, jnp.clip(n_blocks, 1, -(-s // block)), fold, init)
    out_BKQD = (acc_BKQD / jnp.maximum(l_BKQ, 1e-30)[..., None]).astype(q_BTHD.dtype)
    return out_BKQD.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def decode_attention(q_BTHD, k_cache, v_cache, mask_BTS, end_B, *, layout: str, impl: str,
                     contiguous: bool = False):
    """Attention of T new queries over the cache (already holding their own keys/values).

    `mask_BTS`: which positions each query may read; `end_B` [B]: one past each row's last
    written position (its live length), so positions >= max(end_B) are never read by anyone.
    `contiguous`: row b's valid positions are exactly [0, end_B[b]) (the engine's slots).
    """
    if impl not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention {impl!r}: use one of {DECODE_ATTENTION}")
    if impl == "pallas_gpu" and contiguous and layout == "seq_major" and q_BTHD.shape[1] == 1:
        return gpu_decode_attention(q_BTHD[:, 0], k_cache, v_cache, end_B)[:, None]
    if impl == "blocked" and block_size(mask_BTS.shape[-1]) < mask_BTS.shape[-1]:
        return blocked_attention(q_BTHD, k_cache, v_cache, mask_BTS, end_B, layout=layout)
    return attention(q_BTHD, k_cache, v_cache, mask_BTS, cache_layout=layout == "head_major")
