"""A decode step with rows at a quarter of the KV cache vs rows at the full cache.

Decode attention reads the cache; `blocked` (the CPU and TPU default, `models.kv_cache`) reads
only the smallest static prefix holding every live row, `full` reads all of it. This runs one
decode step of the rollout engine's form (per-row write offsets, T = 1) on a model whose cache
dominates the step (long context, few layers, small MLP), with every row at a quarter of the
cache and every row at its end, for both implementations, interleaved in one run.

    python benchmarks/decode_cache.py            # one JSON line per implementation
    python benchmarks/decode_cache.py --quick    # tiny shapes (the smoke test)

The figure of merit is `quarter_over_full`: the step time at a quarter of the cache over the
step time at the full cache (1.0 when the step reads the whole cache whatever its contents).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import environment_info, interleaved_times  # noqa: E402
from grpo_jax.models import ModelConfig, create_model  # noqa: E402


def _model_config(quick: bool, impl: str, layout: str) -> ModelConfig:
    if quick:
        return ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64,
                           max_position_embeddings=512, decode_attention=impl, kv_layout=layout)
    return ModelConfig(vocab_size=1024, d_model=512, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=64, d_ff=512,
                       max_position_embeddings=8192, decode_attention=impl, kv_layout=layout)


def _step_program(graphdef):
    """One decode step at each row's `index_B`, the cache donated and returned (updated in place,
    as in the engine: without donation every call would copy the whole cache)."""
    def step(state, cache, tokens_B, index_B):
        model = nnx.merge(graphdef, state)
        cache = cache._replace(index=index_B)
        hidden, cache = model.decode(tokens_B[:, None], index_B[:, None], jnp.ones_like(tokens_B, bool)[:, None],
                                     cache, contiguous=True)
        return model.logits_from_hidden(hidden)[:, 0].argmax(-1), cache
    return jax.jit(step, donate_argnums=1)


class _Runner:
    """Calls the step again and again on the cache it returned (the same position rewritten)."""

    def __init__(self, step, state, cache, tokens, index):
        self.step, self.state, self.cache, self.tokens, self.index = step, state, cache, tokens, index

    def __call__(self):
        out, self.cache = self.step(self.state, self.cache, self.tokens, self.index)
        return out


def _cache_at(model, rows: int, capacity: int, length: int):
    """A cache whose every row holds `length` valid positions (values random: the step reads them)."""
    cache = model.init_cache(rows, capacity)
    keys = jax.random.split(jax.random.key(0), 2 * len(cache.k))
    k = tuple(jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys[::2], cache.k))
    v = tuple(jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys[1::2], cache.v))
    valid = jnp.broadcast_to(jnp.arange(capacity) < length, (rows, capacity))
    return cache._replace(k=k, v=v, kv_valid=valid, index=jnp.full((rows,), length, jnp.int32))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--capacity", type=int, default=4096, help="cache positions per row")
    parser.add_argument("--layout", default="head_major", choices=("head_major", "seq_major"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    rows, capacity = (4, 256) if args.quick else (args.rows, args.capacity)
    repeats = 2 if args.quick else args.repeats
    runners, meta = {}, {}
    for impl in ("blocked", "full"):
        cfg = _model_config(args.quick, impl, args.layout)
        model = create_model(cfg, seed=0)
        graphdef, state = nnx.split(model)
        step = _step_program(graphdef)
        tokens = jnp.ones((rows,), jnp.int32)
        for name, length in (("quarter", capacity // 4 - 1), ("full", capacity - 1)):
            cache = _cache_at(model, rows, capacity, length)
            index = jnp.full((rows,), length, jnp.int32)
            runners[(impl, name)] = _Runner(step, state, cache, tokens, index)
        meta[impl] = cfg
    times = interleaved_times(runners, repeats)
    for impl, cfg in meta.items():
        quarter, full = times[(impl, "quarter")][0], times[(impl, "full")][0]
        print(json.dumps({
            "benchmark": "decode_cache", "decode_attention": impl, "kv_layout": args.layout, "rows": rows,
            "capacity": capacity, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "head_dim": cfg.head_dim,
            "n_kv_heads": cfg.n_kv_heads, "quarter_s": quarter, "full_s": full,
            "quarter_over_full": quarter / full, "repeats": repeats, **environment_info()}))


if __name__ == "__main__":
    main()
