"""Attention implementations, one per platform, behind one dispatcher.

The model's masks come from `segment_ids_BT` (0 on padding, >0 on real tokens, several segments
per row allowed): a query attends keys of the same segment at the same or an earlier index
(causal by index, so left padding needs nothing special). Every row therefore attends at least
itself: no row is fully masked, not even a padding query's.

- `xla`:    `attention`, plain einsums over [B, H, T, S] float32 scores; the reference, the CPU
            path, and the KV-cache decode step's attention (`cache_layout=True`).
- `cudnn`:  cuDNN flash attention (`jax._src.cudnn.fused_attention_stablehlo`), packed layout.
- `splash`: Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`),
            block-sparse: blocks above the diagonal are never read.
- `gpu_decode_attention`: the rollout engine's decode step on GPU, Pallas Triton
            (`jax.experimental.pallas.ops.gpu.decode_attention.gqa`), reading each row's valid
            cache blocks only.

Which one runs is a config choice made outside traced code (STYLE.md: platform choices in one
place); the cuDNN and splash kernels have no CPU backend, so `tests/test_attention.py` checks
them in interpret mode / by their wiring run through XLA, and by `jax.export` lowering.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grpo_jax import sharding as sharding_lib
from grpo_jax.models.config import ATTENTION_IMPLS

IMPLEMENTATIONS = ATTENTION_IMPLS

# Fills masked attention scores; finite so that a fully masked row gives a uniform average
# instead of NaN (and a running maximum never meets -inf - -inf: `kv_cache.blocked_attention`).
# Equal to splash attention's DEFAULTMASK_VALUE.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# cuDNN's packed layout takes a static bound M on the sequences (runs of equal segment id,
# padding runs included) per row; rows with more get NaN outputs (see `cudnn_attention`).
# `grpo_jax.packing` puts several episodes (each one or more segments) in a row, hence room for
# 32. cuDNN schedules B x M sequences of up to T tokens; empty ones are cheap but not free.
CUDNN_MAX_SEGMENTS = 32


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
    scores = jnp.where(mask_BTS[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, g * t, -1)
    out_BKQD = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    return out_BKQD.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def segment_mask(segment_ids_BT) -> jax.Array:
    """[B, T, T] bool: same segment and key index <= query index."""
    idx = jnp.arange(segment_ids_BT.shape[1])
    return ((segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
            & (idx[None, :, None] >= idx[None, None, :]))


def segment_attention(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, *, impl: str = "xla", mesh=None,
                      interpret: bool = False, max_segments: int = CUDNN_MAX_SEGMENTS):
    """Full-sequence (training / scoring) attention with segment masking; -> out_BTHD.

    k, v are [B, S=T, Hkv, Dh], H a multiple of Hkv; scale Dh**-0.5, scores and softmax in
    float32, output in q's dtype. `impl` is one of IMPLEMENTATIONS. `mesh` (or a non-trivial
    abstract mesh in context) runs splash under `shard_map`; `interpret` runs splash's Pallas
    kernels in the Pallas interpreter (CPU tests); `max_segments` bounds cuDNN's packed runs.
    """
    if impl == "xla":
        return attention(q_BTHD, k_BSKD, v_BSKD, segment_mask(segment_ids_BT))
    if impl == "cudnn":
        return cudnn_attention(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, max_segments=max_segments)
    if impl == "splash":
        return splash_attention(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, mesh=mesh, interpret=interpret)
    raise ValueError(f"attention implementation {impl!r}: choose one of {IMPLEMENTATIONS}")


def takes_length(impl: str, t: int) -> bool:
    """Whether `impl` runs a sequence of T tokens (splash: T a multiple of 128)."""
    return impl != "splash" or t % 128 == 0


# -- cuDNN ----------------------------------------------------------------------------------------
def segment_runs(segment_ids_BT, max_segments: int):
    """cuDNN packed-layout descriptors: every maximal run of equal segment ids is one sequence.

    Returns (offsets_BM1 [B, M+1] run starts, then -1; seqlen_BM [B, M] run lengths, then -1;
    n_runs_B). The runs tile [0, T), padding runs included, so every query is some sequence's
    query and gets a defined output (JAX's own packed-layout test masks out the outputs of tokens
    outside every sequence: they are not defined).
    Assumes each real segment is contiguous (the packers, `trajectories`/`sft`, write them so);
    a padding query attends its own padding run only, where the mask would allow every earlier
    padding key: padding outputs are ignored by every caller.
    """
    b, t = segment_ids_BT.shape
    idx = jnp.arange(t, dtype=jnp.int32)
    is_start_BT = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    n_runs_B = is_start_BT.sum(axis=1, dtype=jnp.int32)
    starts_BT = jnp.sort(jnp.where(is_start_BT, idx, t), axis=1)  # run starts first, then t
    starts_BM = jnp.pad(starts_BT, ((0, 0), (0, max(0, max_segments - t))), constant_values=t)
    starts_BM = starts_BM[:, :max_segments]
    ends_BM = jnp.concatenate([starts_BM[:, 1:], jnp.full((b, 1), t, jnp.int32)], axis=1)
    present_BM = starts_BM < t
    seqlen_BM = jnp.where(present_BM, ends_BM - starts_BM, -1).astype(jnp.int32)
    offsets_BM1 = jnp.pad(jnp.where(present_BM, starts_BM, -1), ((0, 0), (0, 1)),
                          constant_values=-1).astype(jnp.int32)
    return offsets_BM1, seqlen_BM, n_runs_B


def _packed_reference(q_BTHD, k_BSKD, v_BSKD, offsets_BM1, seqlen_BM):
    """What cuDNN computes for the packed layout with a padding-causal mask (each sequence is
    attended causally within itself), written with `attention`: the CPU stand-in that lets the
    tests run the exact descriptors given to cuDNN."""
    t = q_BTHD.shape[1]
    idx = jnp.arange(t)[None, :, None]
    off, n = offsets_BM1[:, None, :-1], seqlen_BM[:, None, :]
    in_run_BTM = (n > 0) & (idx >= off) & (idx < off + n)
    run_BT = jnp.where(in_run_BTM.any(-1), jnp.argmax(in_run_BTM, axis=-1), -1)
    mask_BTS = ((run_BT[:, :, None] == run_BT[:, None, :]) & (run_BT[:, :, None] >= 0)
                & (jnp.arange(t)[None, :, None] >= jnp.arange(t)[None, None, :]))
    return attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS)


def cudnn_attention(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, *, max_segments: int = CUDNN_MAX_SEGMENTS,
                    implementation: str = "cudnn"):
    """cuDNN flash attention (fused_attention_stablehlo.dot_product_attention), packed layout.

    Why the packed layout and not `jax.nn.dot_product_attention(mask=...)`: JAX turns a boolean
    mask into an additive bias (`combine_bias_and_mask`), a [B, 1, T, S] array in q's dtype that
    cuDNN then reads per head; the packed layout (q/kv offsets and lengths [B, M], cuDNN >= 9.6,
    Hopper or later) describes the segments in O(B M) integers: cuDNN runs each run as its own
    causal sequence (B x M of them), computing no scores across runs or above the diagonal. Sequence lengths alone cannot express left padding
    or several segments per row. `implementation="xla"` runs the same descriptors through
    `_packed_reference` (cuDNN has no CPU backend); bf16/fp16 only for "cudnn".
    Rows with more than `max_segments` runs get NaN outputs (counted as failures by the
    trainer) rather than silently attending across segments.
    """
    from jax._src.cudnn import fused_attention_stablehlo as fa

    offsets_BM1, seqlen_BM, n_runs_B = segment_runs(segment_ids_BT, max_segments)
    if implementation == "cudnn":
        out = fa.dot_product_attention(
            q_BTHD, k_BSKD, v_BSKD, q_seqlen=seqlen_BM, kv_seqlen=seqlen_BM, q_offsets=offsets_BM1,
            kv_offsets=offsets_BM1, scale=q_BTHD.shape[-1] ** -0.5, mask_type=fa.MaskType.PADDING_CAUSAL,
            qkv_layout="BTNH")
    elif implementation == "xla":
        out = _packed_reference(q_BTHD, k_BSKD, v_BSKD, offsets_BM1, seqlen_BM)
    else:
        raise ValueError(f"cudnn_attention implementation {implementation!r}: 'cudnn' or 'xla'")
    overflow_B = n_runs_B > max_segments
    return jnp.where(overflow_B[:, None, None, None], jnp.nan, out).astype(q_BTHD.dtype)


# -- splash (TPU) ---------------------------------------------------------------------------------
def splash_block(t: int) -> int:
    """Splash tile length: the largest of 512, 256, 128 dividing T (its kernels need multiples
    of the 128 TPU lanes, also in interpret mode)."""
    for block in (512, 256, 128):
        if t % block == 0:
            return block
    raise ValueError(f"splash attention needs a sequence length that is a multiple of 128, got {t}: "
                     "bucket the train batch's length to a multiple of 128")


def _splash_kernel(t: int, group: int, interpret: bool):
    """The MQA kernel over one KV head's `group` query heads, causal mask, one row.

    Built in each trace, not cached: its mask tables are device arrays, and arrays made in one
    trace and captured by another become hoisted constants that `jax.export` rejects. The
    numpy processing of the mask's block structure is cached by splash itself. The fused
    backward kernel computes dq and dk/dv in one pass over the blocks.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = splash_block(t)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    mask = sa.MultiHeadMask([sa.CausalMask((t, t))] * group)
    return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, interpret: bool):
    """Splash on arrays local to one device: vmap of the MQA kernel over rows and KV heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, h, d = q_BTHD.shape
    kv_heads = k_BSKD.shape[2]
    g = h // kv_heads
    kernel = _splash_kernel(t, g, interpret)
    # Splash has no scale argument: scale q (in its dtype, as the kernel reads it).
    q_NGTD = ((q_BTHD * jnp.asarray(d ** -0.5, q_BTHD.dtype)).reshape(b, t, kv_heads, g, d)
              .transpose(0, 2, 3, 1, 4).reshape(b * kv_heads, g, t, d))
    k_NSD, v_NSD = (x.transpose(0, 2, 1, 3).reshape(b * kv_heads, t, d) for x in (k_BSKD, v_BSKD))
    seg_NT = jnp.repeat(segment_ids_BT, kv_heads, axis=0)
    # One vmap over N = B x Hkv (row-major): Pallas turns it into one more grid dimension.
    out_NGTD = jax.vmap(lambda q_GTD, k_SD, v_SD, seg_T: kernel(
        q_GTD, k_SD, v_SD, segment_ids=SegmentIds(q=seg_T, kv=seg_T)))(q_NGTD, k_NSD, v_NSD, seg_NT)
    out_BKGTD = out_NGTD.reshape(b, kv_heads, g, t, d)
    return out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q_BTHD.dtype)


def _mesh_spec(mesh, logical_axes, shape):
    """`sharding.logical_to_spec` restricted to the mesh's own axes (any mesh may be in context)."""
    rules = tuple((name, tuple(a for a in ((tgt,) if isinstance(tgt, str) else (tgt or ())) if a in mesh.axis_names))
                  for name, tgt in sharding_lib.DEFAULT_RULES)
    return sharding_lib.logical_to_spec(logical_axes, shape, mesh, rules)


def splash_attention(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, *, mesh=None, interpret: bool = False):
    """Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`).

    GQA: the MQA kernel (one K/V head shared by its G query heads) vmapped over KV heads and
    rows; the causal mask is static, the segment ids are `SegmentIds`. No row is fully masked
    (see the module docstring), so every position, padding included, equals `attention`'s.
    With a mesh (given, or a non-trivial abstract mesh in context) it runs under `shard_map`:
    rows over the mesh axes of logical "batch", heads over "tp" when both H and Hkv divide
    (a mesh axis that does not divide its dimension is dropped, as in `sharding`).
    `interpret`: Pallas' interpreter (`pallas_call(interpret=True)`), for CPU tests; the TPU
    interpret mode (`pltpu.force_tpu_interpret_mode`) fails on any vmapped kernel in jax 0.10.2
    (vmap adds a grid dimension that the kernel's `dimension_semantics` does not list).
    """
    b, t, h, d = q_BTHD.shape
    splash_block(t)  # fail early with a clear message
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_local, interpret=interpret)
    if mesh is None or mesh.empty or mesh.size == 1 or mesh.manual_axes:
        # no mesh, or already inside a shard_map (manual axes): the arrays are this device's
        return local(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT)
    q_spec = _mesh_spec(mesh, ("batch", None, "q_heads", None), q_BTHD.shape)
    kv_spec = _mesh_spec(mesh, ("batch", None, "kv_heads", None), k_BSKD.shape)
    if q_spec[2] != kv_spec[2]:  # heads split on one side only: keep both whole
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    seg_spec = P(q_spec[0], None)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                            check_vma=False)
    return sharded(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT)


# -- GPU decode -----------------------------------------------------------------------------------
def decode_blocks(s: int, max_splits: int = 8) -> tuple[int, int]:
    """(block_k, k_splits) for the Triton decode kernel on an S-slot cache.

    The kernel needs S % k_splits == 0, S / k_splits >= 16 and divisible by block_k >= 16.
    block_k: the largest of 128, 64, 32, 16 dividing S; k_splits: the largest divisor of
    S / block_k up to `max_splits` (splits run in parallel, then merge; a decode batch already
    has B x Hkv programs, so a few splits suffice).
    """
    block_k = next((bk for bk in (128, 64, 32, 16) if s % bk == 0), None)
    if block_k is None:
        raise ValueError(f"gpu decode attention needs a cache length that is a multiple of 16, got {s}")
    n_blocks = s // block_k
    k_splits = max(k for k in range(1, min(max_splits, n_blocks) + 1) if n_blocks % k == 0)
    return block_k, k_splits


def gpu_decode_attention(q_BHD, k_BSKD, v_BSKD, kv_len_B, *, interpret: bool = False):
    """One decode step's attention on a hole-free cache: row b attends slots [0, kv_len_B[b]).

    Pallas Triton `decode_attention.gqa` (jax.experimental.pallas.ops.gpu): one program per
    (row, KV head, split); q [B, H, Dh], k, v [B, S, Hkv, Dh] (the kernel swaps them to
    [B, Hkv, S, Dh] itself, so a cache stored [B, Hkv, S, Dh] passed as `.swapaxes(1, 2)` costs
    no copy). It reads only valid blocks: in `attn_forward_kernel` a split starting at or past
    kv_seq_len is skipped by a `lax.cond`, and a live split loops over
    cdiv(kv_seq_len - split_start, block_k) blocks only, loading K/V inside that loop; the last
    partial block is masked. A row with kv_len 0 gives zeros. Softmax in float32; output in
    q's dtype. `interpret`: Pallas' interpreter (CPU tests).
    """
    from jax.experimental.pallas.ops.gpu import decode_attention

    block_k, k_splits = decode_blocks(k_BSKD.shape[1])
    return decode_attention.gqa(q_BHD, k_BSKD, v_BSKD, kv_seq_len=kv_len_B.astype(jnp.int32),
                                sm_scale=q_BHD.shape[-1] ** -0.5, block_k=block_k, k_splits=k_splits,
                                interpret=interpret)
