"""The KV cache's layouts and decode attention over the live blocks only (`models.kv_cache`):
every (layout, decode attention) pair gives the full forward's logits step by step, the blocked
form equals full attention on ragged rows (the last block overhanging the cache included), and
the rollout engine draws the same episodes whatever the cache's layout."""

import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import sampling
from grpo_jax.engine import Engine, EngineConfig, GenerationParams
from grpo_jax.models import ModelConfig, create_model, kv_cache
from grpo_jax.models.attention import attention

MODEL = ModelConfig(model_type="qwen2", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=64, qkv_bias=True, max_position_embeddings=256)


def _cache_arrays(rng, layout, b, kv_heads, d, s):
    if layout == "head_major":
        shapes = (b, kv_heads, d, s), (b, kv_heads, s, d)
    else:
        shapes = (b, s, kv_heads, d), (b, s, kv_heads, d)
    return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes)


@pytest.mark.parametrize("layout", kv_cache.KV_LAYOUTS)
@pytest.mark.parametrize("s, t", [(64, 1), (200, 1), (64, 5), (2048, 1)])
def test_blocked_attention_equals_full_attention(layout, s, t):
    """Rows of different live lengths with holes (left padding); S = 200 has a last block that
    overhangs the cache (its start is clamped back, the overlap masked)."""
    rng = np.random.default_rng(s + t)
    b, kv_heads, g, d = 3, 2, 2, 16
    q = jnp.asarray(rng.normal(size=(b, t, kv_heads * g, d)), jnp.float32)
    k, v = _cache_arrays(rng, layout, b, kv_heads, d, s)
    end_B = jnp.asarray([s // 4, t + 6, s // 3])
    valid_BS = (jnp.arange(s)[None] < end_B[:, None]) & (rng.random((b, s)) > 0.2)
    q_pos_BT = end_B[:, None] - t + jnp.arange(t)[None]
    mask_BTS = (valid_BS[:, None, :] & (jnp.arange(s)[None, None] <= q_pos_BT[:, :, None])).at[:, :, 0].set(True)
    assert kv_cache.block_size(s) < s  # the loop runs
    got = kv_cache.blocked_attention(q, k, v, mask_BTS, end_B, layout=layout)
    want = attention(q, k, v, mask_BTS, cache_layout=layout == "head_major")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_blocked_attention_reads_only_the_live_blocks():
    """Junk (NaN) in the blocks past the longest live row never reaches the output."""
    rng = np.random.default_rng(0)
    s = 256  # blocks of 64
    k, v = _cache_arrays(rng, "seq_major", 2, 2, 8, s)
    k, v = k.at[:, 128:].set(jnp.nan), v.at[:, 128:].set(jnp.nan)
    q = jnp.asarray(rng.normal(size=(2, 1, 4, 8)), jnp.float32)
    end_B = jnp.asarray([100, 128])
    mask_BTS = jnp.arange(s)[None, None] < end_B[:, None, None]
    out = kv_cache.blocked_attention(q, k, v, mask_BTS, end_B, layout="seq_major")
    assert np.isfinite(np.asarray(out)).all()
    full = attention(q, k[:, :128], v[:, :128], mask_BTS[..., :128])
    np.testing.assert_allclose(out, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", kv_cache.KV_LAYOUTS)
@pytest.mark.parametrize("impl", ["full", "blocked"])
def test_decode_matches_the_full_forward(layout, impl):
    cfg = MODEL.replace(kv_layout=layout, decode_attention=impl)
    model = create_model(cfg, seed=1)
    rng = np.random.default_rng(2)
    lengths, prompt_len, new = [5, 12, 8], 12, 6
    tokens = rng.integers(4, 120, size=(3, prompt_len + new)).astype(np.int32)
    mask = np.zeros((3, prompt_len + new), np.int32)
    for i, n in enumerate(lengths):  # left padded prompts, then the new tokens
        mask[i, prompt_len - n:] = 1
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    full = np.asarray(jax.jit(lambda m, *a: m(*a))(model, jnp.asarray(tokens), jnp.asarray(positions),
                                                     jnp.asarray(mask)))

    @jax.jit
    def step(model, tok, pos, valid, cache):
        hidden, cache = model.decode(tok, pos, valid, cache)
        return model.logits_from_hidden(hidden), cache

    cache = model.init_cache(3, 64)
    assert cache.layout == layout and cache.k[0].shape == ((3, 2, 8, 64) if layout == "head_major" else (3, 64, 2, 8))
    logits, cache = step(model, tokens[:, :prompt_len], positions[:, :prompt_len], mask[:, :prompt_len] > 0, cache)
    real = mask[:, :prompt_len] > 0
    assert np.abs(np.asarray(logits) - full[:, :prompt_len])[real].max() < 1e-4
    for col in range(prompt_len, prompt_len + new):
        logits, cache = step(model, tokens[:, col:col + 1], positions[:, col:col + 1], np.ones((3, 1), bool), cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, col], atol=1e-4)


def test_a_first_prefill_attends_to_the_prompt_only():
    """`fresh=True` (the sampler's first prefill) runs the training attention over the new tokens
    and writes the same cache as attending over the (empty) cache."""
    model = create_model(MODEL, seed=3)
    tokens = jnp.asarray(np.random.default_rng(4).integers(4, 120, size=(2, 10)), jnp.int32)
    valid = jnp.asarray([[False] * 3 + [True] * 7, [True] * 10])
    positions = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
    run = jax.jit(lambda m, c, fresh: m.decode(tokens, positions, valid, c, fresh=fresh), static_argnums=2)
    (h_fresh, c_fresh), (h_cache, c_cache) = run(model, model.init_cache(2, 32), True), run(
        model, model.init_cache(2, 32), False)
    np.testing.assert_allclose(np.asarray(h_fresh)[np.asarray(valid)], np.asarray(h_cache)[np.asarray(valid)],
                               atol=1e-5)
    real_S = np.zeros((2, 32), bool)
    real_S[:, :10] = np.asarray(valid)  # padding positions' keys differ (never read)
    for a, b in zip(c_fresh.v, c_cache.v):  # v [B, Hkv, S, Dh]
        np.testing.assert_allclose(np.asarray(a).transpose(0, 2, 1, 3)[real_S], np.asarray(b).transpose(0, 2, 1, 3)[real_S],
                                   atol=1e-5)


def test_the_engine_draws_the_same_episodes_in_either_layout():
    prompt, key = list(range(5, 30)), jax.random.key(1)
    params = GenerationParams(max_new_tokens=12, temperature=1.0)
    config = EngineConfig(slots=4, max_length=96, prefill_chunk=8, prefill_rows=2, decode_steps=4, stop_token_ids=(3,))
    outs = {}
    for layout, impl in (("head_major", "full"), ("seq_major", "blocked")):
        model = create_model(MODEL.replace(kv_layout=layout, decode_attention=impl), seed=0)
        engine = Engine(model, config)

        async def main():
            sessions = engine.open(prompt, [0, 1, 2], key)
            return await asyncio.gather(*(engine.generate(s, (), params) for s in sessions))

        outs[layout] = asyncio.run(main())
    for a, b in zip(outs["head_major"], outs["seq_major"]):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    ref = sampling.generate(create_model(MODEL, seed=0), [prompt], jax.random.fold_in(key, 0),
                            dict(max_new_tokens=12, n=3, stop_token_ids=(3,)), row_ids=[0, 1, 2])
    assert [o.tokens for o in outs["seq_major"]] == [ref.completion(i) for i in range(3)]


def test_bad_settings_are_named():
    with pytest.raises(Exception, match="kv_layout"):
        MODEL.replace(kv_layout="paged")
    with pytest.raises(Exception, match="decode_attention"):
        MODEL.replace(decode_attention="ragged")
    with pytest.raises(Exception, match="attention"):
        MODEL.replace(attention="flash")


def test_decode_cache_benchmark_runs_both_implementations():
    """`benchmarks/decode_cache.py --quick`: one JSON line per decode attention, the ratio
    consistent with its times (speed itself is never asserted)."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "decode_cache.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=root), cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["decode_attention"] for r in rows] == ["blocked", "full"]
    for r in rows:
        assert r["quarter_s"] > 0 and r["full_s"] > 0
        assert r["quarter_over_full"] == pytest.approx(r["quarter_s"] / r["full_s"])
