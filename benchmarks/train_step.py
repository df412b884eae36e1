"""Train-step speed: tokens/s and model FLOPs utilisation, against a plain forward+backward.

    python benchmarks/train_step.py [--repeats 3] [--micro-batch-size 32] [--chunk-size 8192]
                                    [--only policy,policy+ref,plain] [--quick]

Model: Qwen2-style, hidden 512, 8 layers, 8 heads / 2 KV heads (head_dim 64), intermediate 1408,
vocab 8192, float32, random weights. Batch: 32 sequences of 192 tokens (64 prompt + 128 trained
completion tokens). Prints one JSON line per configuration:

- "policy": `grpo_jax.train_step` with beta = 0 (GRPO loss, AdamW update);
- "policy+ref": beta > 0, so the step also runs the reference model forward;
- "plain": the peer, `jax.jit(jax.value_and_grad(mean cross-entropy of model(tokens)))` on the
  same model and batch (forward + backward only: no optimizer, full [B, T, V] logits).

Model FLOPs are matmul FLOPs (`ModelConfig.flops_per_token`, attention included): 3x the forward
for forward + backward, plus 1x for the reference forward. MFU is achieved model FLOP/s over a
float32 2048^3 matmul's FLOP/s measured in the same run (`benchmarks/common.py`). Times are the
median of `--repeats` steps after one warm-up (compile) step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment_info, load_average, matmul_peak_flops, time_call  # noqa: E402

from grpo_jax import optim  # noqa: E402
from grpo_jax import train_step as ts  # noqa: E402
from grpo_jax.models import ModelConfig, create_model  # noqa: E402

MODEL = ModelConfig(model_type="qwen2", vocab_size=8192, d_model=512, n_layers=8, n_heads=8,
                    n_kv_heads=2, head_dim=64, d_ff=1408, qkv_bias=True, tie_embeddings=False,
                    max_position_embeddings=1024)
ROWS, LENGTH, PROMPT = 32, 192, 64


def make_batch(cfg: ModelConfig, rows: int, length: int, prompt: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, cfg.vocab_size, (rows, length)).astype(np.int32)
    mask = np.zeros((rows, length), np.float32)
    mask[:, prompt:] = 1
    return {
        "tokens": tokens,
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
        "segment_ids": np.ones((rows, length), np.int32),
        "loss_mask": mask,
        # Near the log-probs of a random model (log 1/V ~ -9), so ratios are near 1.
        "old_logps": (mask * (-np.log(cfg.vocab_size) + 0.01 * rng.standard_normal((rows, length)))
                      ).astype(np.float32),
        "advantages": rng.standard_normal(rows).astype(np.float32),
    }


def time_train_step(cfg: ModelConfig, batch, tcfg: ts.TrainConfig, repeats: int) -> float:
    model = create_model(cfg, seed=0)
    optimizer = optim.make_optimizer(1e-6)
    state = ts.init_train_state(model, optimizer, jax.random.key(0))
    ref_params = nnx.split(create_model(cfg, seed=1), nnx.Param, ...)[1] if tcfg.beta > 0 else None
    step = ts.make_train_step(model, optimizer, tcfg)
    batch = jax.device_put(batch)
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], batch, ref_params)
        return metrics

    return statistics.median(time_call(one, warmup=1, repeats=repeats))


def time_plain_forward_backward(cfg: ModelConfig, batch, repeats: int) -> float:
    model = create_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(batch["tokens"])

    def cross_entropy(params):
        logits = nnx.merge(graphdef, params)(tokens)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    fwd_bwd = jax.jit(jax.value_and_grad(cross_entropy))
    return statistics.median(time_call(lambda: fwd_bwd(params), warmup=1, repeats=repeats))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--remat", action="store_true", help="rematerialise each layer")
    parser.add_argument("--only", default="policy,policy+ref,plain")
    parser.add_argument("--quick", action="store_true", help="2 layers, 8 rows (smoke test)")
    args = parser.parse_args()

    cfg = MODEL.replace(remat=args.remat)
    rows = ROWS
    if args.quick:
        cfg, rows = cfg.replace(n_layers=2), 8
    batch = make_batch(cfg, rows, LENGTH, PROMPT)
    tokens = rows * LENGTH
    forward_flops = cfg.flops_per_token(LENGTH) * tokens
    peak = matmul_peak_flops()
    common = {"model": "qwen2 d512 L8 H8/2 Dh64 F1408 V8192", "batch": f"{rows}x{LENGTH}",
              "micro_batch_size": args.micro_batch_size, "chunk_size": args.chunk_size,
              "remat": args.remat, "matmul_peak_gflops": round(peak / 1e9, 1)}

    plain = None
    if "plain" in args.only.split(","):
        seconds = time_plain_forward_backward(cfg, batch, args.repeats)
        plain = 3 * forward_flops / seconds / peak
        print(json.dumps({"config": "plain", "step_time_s": round(seconds, 3),
                          "tokens_per_s": round(tokens / seconds, 1),
                          "model_tflops": round(3 * forward_flops / 1e12, 3), "mfu": round(plain, 3),
                          **common, **environment_info()}), flush=True)
    for name, beta in (("policy", 0.0), ("policy+ref", 0.04)):
        if name not in args.only.split(","):
            continue
        tcfg = ts.TrainConfig(loss_type="grpo", beta=beta, chunk_size=args.chunk_size,
                              micro_batch_size=args.micro_batch_size)
        seconds = time_train_step(cfg, batch, tcfg, args.repeats)
        flops = (3 + (beta > 0)) * forward_flops
        mfu = flops / seconds / peak
        row = {"config": name, "step_time_s": round(seconds, 3),
               "tokens_per_s": round(tokens / seconds, 1), "model_tflops": round(flops / 1e12, 3),
               "mfu": round(mfu, 3), "plain_mfu": None if plain is None else round(plain, 3),
               **common, **environment_info()}
        print(json.dumps(row), flush=True)
    print(json.dumps({"matmul_peak_gflops_after": round(matmul_peak_flops() / 1e9, 1),
                      "load_avg_1m": load_average()}), flush=True)


if __name__ == "__main__":
    main()
