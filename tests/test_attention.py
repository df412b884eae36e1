"""The attention implementations (`grpo_jax.models.attention`) against the `xla` reference.

No accelerator here: splash runs in the Pallas interpreter, cuDNN's exact packed-layout
descriptors run through XLA (`cudnn_attention(implementation="xla")`), the Triton decode kernel
runs with `interpret=True`; the real kernels are checked by exporting them for "tpu" / "cuda"
(ACCELERATORS.md) and finding their custom calls in the StableHLO.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import PartitionSpec as P

from grpo_jax import sharding
from grpo_jax.models import attention as A

H, HKV, DH = 4, 2, 64


def _segments(b, t):
    """Row 0 left-padded; row 1 two segments then right padding; row 2 three segments, padding."""
    seg = np.ones((b, t), np.int32)
    seg[0, : t // 5] = 0                                   # left padding
    seg[1, : t // 3] = 1; seg[1, t // 3: t - 40] = 2; seg[1, t - 40:] = 0  # noqa: E702 two segments, right pad
    if b > 2:
        seg[2, 10: 50] = 2; seg[2, 50: t - 7] = 3; seg[2, t - 7:] = 0  # noqa: E702 three segments
    return jnp.asarray(seg)


def _qkv(b, t, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=s), jnp.float32).astype(dtype)
                 for s in ((b, t, H, DH), (b, t, HKV, DH), (b, t, HKV, DH)))


def _value_and_grads(fn, q, k, v, seg):
    """out and d(sum(out * w))/d(q, k, v), w random on real query positions, 0 on padding."""
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * (seg > 0)[:, :, None, None]

    def loss(q, k, v):
        out = fn(q, k, v, seg)
        return (out.astype(jnp.float32) * w).sum(), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _xla(q, k, v, seg):
    return A.segment_attention(q, k, v, seg, impl="xla")


def _splash(q, k, v, seg):
    return A.segment_attention(q, k, v, seg, impl="splash", interpret=True)


def _close_at_real(a, b, seg, tol):
    real = np.asarray(seg > 0)[:, :, None, None]
    at_real = lambda x: np.where(real, np.asarray(x, np.float32), 0)  # noqa: E731
    np.testing.assert_allclose(at_real(a), at_real(b), atol=tol, rtol=tol)


def test_dispatch_and_shape_errors():
    q, k, v = _qkv(1, 128)
    seg = jnp.ones((1, 128), jnp.int32)
    with pytest.raises(ValueError, match="xla.*cudnn.*splash"):
        A.segment_attention(q, k, v, seg, impl="flash")
    q, k, v = _qkv(1, 96)
    with pytest.raises(ValueError, match="multiple of 128"):
        A.segment_attention(q, k, v, jnp.ones((1, 96), jnp.int32), impl="splash", interpret=True)
    assert A.splash_block(128) == 128 and A.splash_block(384) == 128 and A.splash_block(1536) == 512


def test_splash_matches_xla_float32():
    """T = 384: three 128-blocks per row, so the block-sparse skipping and the online softmax
    across blocks are exercised; GQA H=4 over Hkv=2; gradients w.r.t. q, k, v."""
    q, k, v = _qkv(3, 384)
    seg = _segments(3, 384)
    out_ref, grads_ref = _value_and_grads(_xla, q, k, v, seg)
    out, grads = _value_and_grads(_splash, q, k, v, seg)
    _close_at_real(out, out_ref, seg, 1e-5)
    # no row is fully masked (every query attends itself): padding positions agree too
    np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


def test_splash_matches_xla_bfloat16():
    q, k, v = _qkv(2, 128, jnp.bfloat16)
    seg = _segments(2, 128)
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
    out_ref, grads_ref = _value_and_grads(_xla, *f32, seg)
    out, grads = _value_and_grads(_splash, q, k, v, seg)
    assert out.dtype == jnp.bfloat16
    _close_at_real(out, out_ref, seg, 2e-2)
    for g, g_ref in zip(grads, grads_ref):
        g = np.asarray(g, np.float32)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, g_ref, atol=2e-2 * float(np.abs(g_ref).max()), rtol=2e-2)


def test_segment_runs_descriptors():
    seg = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    offsets, seqlen, n_runs = A.segment_runs(seg, 4)
    np.testing.assert_array_equal(offsets, [[0, 2, 5, 7, -1], [0, -1, -1, -1, -1]])
    np.testing.assert_array_equal(seqlen, [[2, 3, 2, 1], [8, -1, -1, -1]])
    np.testing.assert_array_equal(n_runs, [4, 1])


def test_cudnn_wiring_matches_xla():
    """The descriptors handed to cuDNN, run through XLA, give the reference values and
    gradients; a row with more runs than `max_segments` is poisoned with NaN, not wrong."""
    q, k, v = _qkv(3, 64)
    seg = _segments(3, 64)
    out_ref, grads_ref = _value_and_grads(_xla, q, k, v, seg)
    cudnn_as_xla = lambda q, k, v, s: A.cudnn_attention(q, k, v, s, implementation="xla")  # noqa: E731
    out, grads = _value_and_grads(cudnn_as_xla, q, k, v, seg)
    _close_at_real(out, out_ref, seg, 1e-5)
    assert np.isfinite(np.asarray(out)).all()
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)
    few = A.cudnn_attention(q, k, v, seg, max_segments=3, implementation="xla")  # runs per row: 2, 3, 4
    assert np.isnan(np.asarray(few[2])).all() and np.isfinite(np.asarray(few[:2])).all()


def _export_text(fn, platform, *args, targets=()):
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in targets]
    return export.export(jax.jit(fn), platforms=(platform,), disabled_checks=checks)(*args).mlir_module()


def _specs(b, t, dtype=jnp.bfloat16):
    return (jax.ShapeDtypeStruct((b, t, H, DH), dtype), jax.ShapeDtypeStruct((b, t, HKV, DH), dtype),
            jax.ShapeDtypeStruct((b, t, HKV, DH), dtype), jax.ShapeDtypeStruct((b, t), jnp.int32))


def _grad_fn(impl, **kw):
    return jax.grad(lambda q, k, v, s: A.segment_attention(q, k, v, s, impl=impl, **kw).astype(jnp.float32).sum(),
                    argnums=(0, 1, 2))


def test_cudnn_lowers_for_cuda(monkeypatch):
    """cuDNN's version (and, for the packed layout, the GPU generation) is probed while
    tracing; stubbed here, the program lowers to cuDNN's fused attention, both directions."""
    from jax._src.cudnn import fused_attention_stablehlo as fa
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
    targets = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
    fwd = _export_text(lambda q, k, v, s: A.segment_attention(q, k, v, s, impl="cudnn"), "cuda", *_specs(2, 128),
                       targets=targets)
    assert "@__cudnn$fmhaSoftmax(" in fwd and "Backward" not in fwd
    # the packed layout (segment offsets / lengths, M = CUDNN_MAX_SEGMENTS), not a bias array
    config = fwd.replace("\\22", '"')  # the backend config is JSON with escaped quotes
    assert '"mask_type": "PADDING_CAUSAL"' in config
    assert f'"max_seg_per_batch": {A.CUDNN_MAX_SEGMENTS},' in config
    assert "tensor<2x1x128x128" not in fwd
    bwd = _export_text(_grad_fn("cudnn"), "cuda", *_specs(2, 128), targets=targets)
    assert "@__cudnn$fmhaSoftmaxBackward(" in bwd


def test_splash_lowers_for_tpu():
    fwd = _export_text(lambda q, k, v, s: A.segment_attention(q, k, v, s, impl="splash"), "tpu", *_specs(2, 256))
    bwd = _export_text(_grad_fn("splash"), "tpu", *_specs(2, 256))
    assert "tpu_custom_call" in fwd
    assert bwd.count("tpu_custom_call") >= 2  # forward (residuals) and the fused dq/dkv kernel


def _cache(b=4, s=128, seed=2):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, H, DH)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(b, s, HKV, DH)), jnp.float32) for _ in range(2))
    return q, k, v


def test_gpu_decode_matches_xla():
    """Rows at different valid lengths, one in the middle of a block, one full; junk past each
    row's length must not leak (the kernel stops at kv_len)."""
    q, k, v = _cache()
    kv_len = jnp.asarray([1, 37, 128, 64], jnp.int32)
    k = jnp.where(jnp.arange(128)[None, :, None, None] < kv_len[:, None, None, None], k, 1e4)
    out = jax.jit(lambda *a: A.gpu_decode_attention(*a, interpret=True))(q, k, v, kv_len)
    mask_BTS = jnp.arange(128)[None, None, :] < kv_len[:, None, None]
    ref = A.attention(q[:, None], k, v, mask_BTS)[:, 0]
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    empty = A.gpu_decode_attention(q, k, v, jnp.asarray([0, 5, 0, 1], jnp.int32), interpret=True)
    assert np.isfinite(np.asarray(empty)).all() and not np.asarray(empty)[[0, 2]].any()  # no keys: zeros
    assert A.decode_blocks(64) == (64, 1) and A.decode_blocks(768) == (128, 6)
    with pytest.raises(ValueError, match="multiple of 16"):
        A.decode_blocks(100)


def test_gpu_decode_lowers_for_cuda():
    specs = (jax.ShapeDtypeStruct((4, H, DH), jnp.bfloat16), jax.ShapeDtypeStruct((4, 256, HKV, DH), jnp.bfloat16),
             jax.ShapeDtypeStruct((4, 256, HKV, DH), jnp.bfloat16), jax.ShapeDtypeStruct((4,), jnp.int32))
    text = _export_text(A.gpu_decode_attention, "cuda", *specs, targets=("__gpu$xla.gpu.triton",))
    assert "__gpu$xla.gpu.triton" in text


def test_splash_sharded_matches_single_device():
    """Under shard_map on the simulated 8-device mesh (rows over data x fsdp, heads over tp),
    given explicitly or found in context, splash gives the single-device values."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tp=2)
    q, k, v = _qkv(4, 128)
    seg = _segments(4, 128)
    single = jax.jit(_splash)(q, k, v, seg)
    explicit = jax.jit(lambda *a: A.segment_attention(*a, impl="splash", interpret=True, mesh=mesh))
    assert "shard_map" in str(explicit.trace(q, k, v, seg).jaxpr)
    np.testing.assert_allclose(explicit(q, k, v, seg), single, atol=1e-6, rtol=1e-6)
    with jax.set_mesh(mesh):
        in_context = jax.jit(_splash)
        assert "shard_map" in str(in_context.trace(q, k, v, seg).jaxpr)
        np.testing.assert_allclose(in_context(q, k, v, seg), single, atol=1e-6, rtol=1e-6)
    # called inside a shard_map (the mesh axes are manual there): runs on the local shard
    inner = jax.shard_map(_splash, mesh=mesh, in_specs=(P(("data", "fsdp")),) * 4, out_specs=P(("data", "fsdp")),
                          check_vma=False)
    np.testing.assert_allclose(jax.jit(inner)(q, k, v, seg), single, atol=1e-6, rtol=1e-6)


def test_splash_sharded_lowers_for_tpu():
    """The shard_map'd kernel (forward and backward) exports for an 8-device TPU program."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tp=2)
    text = _export_text(_grad_fn("splash", mesh=mesh), "tpu", *_specs(4, 128))
    assert "mhlo.num_partitions = 8" in text and text.count("tpu_custom_call") >= 2


def test_a_tpu_config_with_rows_splash_cannot_take_is_refused():
    """Splash's tiles need train rows in multiples of 128 tokens: the config check names the
    field before anything is built (packed rows: rollout.max_seq_len)."""
    from config_fixtures import load_config

    from grpo_jax import config_utils
    config = load_config("calculator_tiny")
    with config.unlocked():
        config.platform, config.rollout.max_seq_len, config.model.max_position_embeddings = "tpu", 200, 256
    with pytest.raises(config_utils.ConfigError, match="rollout.max_seq_len"):
        config_utils._check_sizes(config)
    with config.unlocked():
        config.model.attention = "xla"  # the override: any length
    config_utils._check_sizes(config)
