"""One layer's attention for the roofline (`benchmarks/roofline.py`): the XLA form's programs,
compiled on the CPU host and costed there, and the flash kernels' bytes from their I/O model
(the cuDNN and splash kernels have no CPU backend, so they are modelled, not compiled)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.models import ModelConfig
from grpo_jax.models.attention import segment_attention

# The flash kernels' query tile (cuDNN's and splash-like tiling): K and V are re-read once per
# query block in the FlashAttention-2 I/O model (`flash_attention_bytes`).
FLASH_BLOCK_Q = 128


def attention_programs(cfg: ModelConfig, shape: dict):
    """{"fwd": (jitted, args), "fwd_bwd": (jitted, args)}: one layer's training attention on one
    micro-batch (micro rows x prompt_len + new_tokens tokens), `segment_attention(impl="xla")` in
    the compute dtype. "fwd_bwd" is the forward and its vjp: the output and the gradients w.r.t.
    q, k and v of a loss whose output cotangent dO is an argument (as the layer above gives it;
    the gradient of a plain sum, a constant dO, lets XLA fold the dO products into reductions and
    under-count the backward's FLOPs)."""
    b, t = shape["micro"], shape["prompt_len"] + shape["new_tokens"]
    q = jax.ShapeDtypeStruct((b, t, cfg.n_heads, cfg.head_dim), cfg.dtype)
    kv = jax.ShapeDtypeStruct((b, t, cfg.n_kv_heads, cfg.head_dim), cfg.dtype)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def fwd(q_, k_, v_, seg_):
        return segment_attention(q_, k_, v_, seg_, impl="xla")

    def fwd_bwd(q_, k_, v_, seg_, do_):
        out, vjp = jax.vjp(lambda a, b_, c: fwd(a, b_, c, seg_), q_, k_, v_)
        return out, *vjp(do_)

    return {"fwd": (jax.jit(fwd), (q, kv, kv, seg)), "fwd_bwd": (jax.jit(fwd_bwd), (q, kv, kv, seg, q))}


def flash_attention_bytes(b: int, t: int, heads: int, kv_heads: int, head_dim: int, itemsize: int,
                          block_q: int = FLASH_BLOCK_Q) -> dict:
    """HBM bytes of one flash-attention layer (T queries over S = T keys), from the
    FlashAttention-2 I/O model (Dao 2023, "FlashAttention-2: Faster Attention with Better
    Parallelism and Work Partitioning", arXiv:2307.08691): no [B, H, T, S] tensor is written.

    forward:  reads Q, K, V, writes O and the row log-sum-exp (float32, [B, H, T]);
    backward: reads Q, K, V, O, dO, LSE, writes dQ, dK, dV;
    K and V are read once per query block (ceil(T / block_q) passes), everything else once; the
    segment ids (int32) read once per pass. No causal block skipping: an upper bound for the
    causal kernels, which skip the blocks above the diagonal (about half of the K/V re-reads).
    """
    passes = -(-t // block_q)
    q = b * t * heads * head_dim * itemsize  # also O, dO, dQ
    kv = b * t * kv_heads * head_dim * itemsize  # each of K, V, dK, dV
    lse = b * heads * t * 4
    seg = b * t * 4
    fwd = q + passes * 2 * kv + seg + q + lse
    bwd = 3 * q + passes * 2 * kv + lse + seg + q + 2 * kv
    return {"fwd": fwd, "fwd_bwd": fwd + bwd, "kv_passes": passes}


def attention_passes(remat: str, beta: float) -> dict:
    """How many times the train step runs each layer's attention per micro-batch: one forward and
    backward (the gradient), one more forward when the layer is rematerialised ("full" recomputes
    the whole layer, "dots" the attention scores and probabilities) and one for the reference
    model when beta > 0."""
    return {"fwd": int(remat in ("full", "dots")) + int(beta > 0), "fwd_bwd": 1}
