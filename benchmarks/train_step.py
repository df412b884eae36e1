"""Train-step speed: tokens/s and model FLOPs utilisation, against a plain forward+backward.

    python benchmarks/train_step.py [--repeats 3] [--micro-batch-size 32] [--chunk-size 8192]
                                    [--remat none|dots|full] [--only policy,policy+ref,plain]
                                    [--preset qwen2.5-0.5b] [--dtype bfloat16] [--param-dtype float32]
                                    [--layers 24] [--vocab-size 151936] [--rows 32] [--length 192]
                                    [--prompt 64] [--peak-size 8192]
                                    [--nominal-peak-tflops 989] [--quick]

Model: Qwen2-style, hidden 512, 8 layers, 8 heads / 2 KV heads (head_dim 64), intermediate 1408,
vocab 8192, float32, random weights. Batch: 32 sequences of 192 tokens (64 prompt + 128 trained
completion tokens). `--preset` takes a `grpo_jax.models.PRESETS` shape instead (random weights
too), `--dtype` the compute dtype (weights stored in it unless `--param-dtype`), and the matmul
peak is then measured in that dtype (n = 2048 on CPU, 8192 on accelerators unless `--peak-size`).
The accelerator check (`benchmarks/device_check.sh`) runs it at the GSM8K config's shapes on
Qwen2.5-0.5B's shape in bfloat16 compute with float32 weights. Prints one JSON line per configuration:

- "policy": `grpo_jax.train_step` with beta = 0 (GRPO loss, AdamW update);
- "policy+ref": beta > 0, so the step also runs the reference model forward;
- "plain": the peer, `jax.jit(jax.value_and_grad(mean cross-entropy of model(tokens)))` on the
  same model and batch (forward + backward only: no optimizer, full [B, T, V] logits).

Model FLOPs are matmul FLOPs (`ModelConfig.flops_per_token`, attention included): 3x the forward
for forward + backward, plus 1x for the reference forward. The GRPO step's output head runs at
the 128 completion positions of each row only (`TrainConfig.max_loss_tokens`, as the trainer sets
it) and is counted there; the plain peer's head runs, and is counted, at all 192. MFU is achieved model FLOP/s over a
float32 2048^3 matmul's FLOP/s measured in the same run (the best of: before the runners, among
them, after them). All runners (the matmul included) are
called round-robin `--repeats` times after one warm-up (compile) call each, and each reports
its median, so load from other processes hits them alike; `mfu_by_cpu_time` is the same ratio
computed from this process's CPU time (model FLOPs per CPU second over the best of the matmul's
FLOPs per CPU second), which other processes' load does not inflate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_positive, environment_info, interleaved_times, matmul_peak_rates  # noqa: E402

from grpo_jax import optim  # noqa: E402
from grpo_jax import train_step as ts  # noqa: E402
from grpo_jax.models import PRESETS, ModelConfig, create_model, preset  # noqa: E402
from grpo_jax.models.config import REMAT_MODES  # noqa: E402
from grpo_jax import platform as platform_lib  # noqa: E402

MODEL = ModelConfig(model_type="qwen2", vocab_size=8192, d_model=512, n_layers=8, n_heads=8,
                    n_kv_heads=2, head_dim=64, d_ff=1408, qkv_bias=True, tie_embeddings=False,
                    max_position_embeddings=1024)
ROWS, LENGTH, PROMPT = 32, 192, 64
DTYPES = ("float32", "bfloat16")


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


def train_step_runner(cfg: ModelConfig, batch, tcfg: ts.TrainConfig):
    """A no-argument function running one `grpo_jax.train_step` step (the state carried over)."""
    model = create_model(cfg, seed=0)
    optimizer = optim.make_optimizer(1e-6)
    state = ts.init_train_state(model, optimizer, jax.random.key(0))
    ref_params = nnx.split(create_model(cfg, seed=1), nnx.Param, ...)[1] if tcfg.beta > 0 else None
    step = ts.make_train_step(model, optimizer, tcfg)
    batch = jax.device_put(batch)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch, ref_params)
        return metrics

    return run


def plain_runner(cfg: ModelConfig, batch):
    """The peer: jit(value_and_grad(mean next-token cross-entropy of model(tokens)))."""
    model = create_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(batch["tokens"])

    def cross_entropy(params):
        logits = nnx.merge(graphdef, params)(tokens)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    fwd_bwd = jax.jit(jax.value_and_grad(cross_entropy))
    return lambda: fwd_bwd(params)


def peak_runner(n: int = 2048, dtype=jnp.float32):
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    return lambda: matmul(a, b)


def describe(cfg: ModelConfig) -> str:
    return (f"{cfg.model_type} d{cfg.d_model} L{cfg.n_layers} H{cfg.n_heads}/{cfg.n_kv_heads} "
            f"Dh{cfg.head_dim} F{cfg.d_ff} V{cfg.vocab_size} {cfg.dtype}"
            + (f" (weights {cfg.param_dtype})" if cfg.param_dtype != cfg.dtype else ""))


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="log-prob vocabulary chunk (default: by platform)")
    parser.add_argument("--remat", choices=REMAT_MODES, default=ModelConfig.remat,
                        help="what each layer keeps for the backward pass (the peer: none)")
    parser.add_argument("--only", default="policy,policy+ref,plain")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a model shape from grpo_jax.models.PRESETS instead of the default model")
    parser.add_argument("--layers", type=int, default=None, help="override the model's layer count")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the model's vocabulary")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")
    parser.add_argument("--param-dtype", choices=DTYPES, default=None,
                        help="storage dtype of the weights (default: --dtype)")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--length", type=int, default=LENGTH, help="tokens per row")
    parser.add_argument("--prompt", type=int, default=PROMPT, help="untrained prompt tokens per row")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="n of the n^3 matmul peak (default 2048 on CPU, 8192 on accelerators)")
    parser.add_argument("--nominal-peak-tflops", type=float, default=None,
                        help="the device's datasheet matmul peak in --dtype: adds mfu_nominal")
    parser.add_argument("--quick", action="store_true", help="2 layers, at most 8 rows (smoke test)")
    args = parser.parse_args(argv)
    if not 0 < args.prompt < args.length:
        parser.error(f"need 0 < --prompt < --length, got {args.prompt} and {args.length}")
    check_positive(parser, args, ("rows", "repeats", "layers", "vocab_size"))
    rows = min(args.rows, 8) if args.quick else args.rows
    if args.micro_batch_size is not None and (args.micro_batch_size <= 0 or rows % args.micro_batch_size):
        parser.error(f"--micro-batch-size {args.micro_batch_size} must divide the {rows} rows")
    return args


def main():
    args = parse_args()
    choices = platform_lib.choices()  # the devices this benchmark runs on
    cfg = preset(args.preset) if args.preset else MODEL
    cfg = cfg.replace(remat=args.remat, cpu_weight_grad=choices.cpu_weight_grad, dtype=args.dtype,
                      param_dtype=args.param_dtype or args.dtype, n_layers=args.layers or cfg.n_layers,
                      vocab_size=args.vocab_size or cfg.vocab_size)
    chunk = args.chunk_size or choices.logprob_chunk
    rows, length, prompt = args.rows, args.length, args.prompt
    if args.quick:
        cfg, rows = cfg.replace(n_layers=2), min(rows, 8)
    if length > cfg.max_position_embeddings:
        raise SystemExit(f"--length {length} exceeds the model's {cfg.max_position_embeddings} positions")
    batch = make_batch(cfg, rows, length, prompt)
    tokens = rows * length
    forward_flops = cfg.flops_per_token(length) * tokens
    # The step's output head runs at the completion's positions only (max_loss_tokens, as the
    # trainer sets it); the plain peer's at every position.
    completion = length - prompt
    step_forward_flops = forward_flops - 2 * cfg.d_model * cfg.vocab_size * rows * prompt
    peak_n = args.peak_size or (2048 if choices.platform == "cpu" else 8192)
    peak_dtype = jnp.dtype(args.dtype)
    wanted = args.only.split(",")
    runners, model_flops = {"matmul_peak": peak_runner(peak_n, peak_dtype)}, {"matmul_peak": 2.0 * peak_n ** 3}
    if "plain" in wanted:
        # The peer as a user would first write it: no rematerialisation.
        runners["plain"] = plain_runner(cfg.replace(remat="none"), batch)
        model_flops["plain"] = 3 * forward_flops
    for name, beta in (("policy", 0.0), ("policy+ref", 0.04)):
        if name in wanted:
            tcfg = ts.TrainConfig(loss_type="grpo", beta=beta, chunk_size=chunk,
                                  micro_batch_size=args.micro_batch_size, max_loss_tokens=completion)
            runners[name] = train_step_runner(cfg, batch, tcfg)
            model_flops[name] = (3 + (beta > 0)) * step_forward_flops
    peak_before, peak_cpu_before = matmul_peak_rates(peak_n, peak_dtype)
    times = interleaved_times(runners, args.repeats)
    peak_after, peak_cpu_after = matmul_peak_rates(peak_n, peak_dtype)
    peak_wall, peak_cpu, _ = times.pop("matmul_peak")
    # The peak is the best of the matmul's rates (a single matmul timed between long steps can
    # run below its sustained rate); a higher peak gives a lower, conservative MFU. The same
    # for the rate per CPU second behind `mfu_by_cpu_time`.
    peak_interleaved = model_flops["matmul_peak"] / peak_wall
    peak = max(peak_interleaved, peak_before, peak_after)
    peak_per_cpu_s = max(model_flops["matmul_peak"] / peak_cpu, peak_cpu_before, peak_cpu_after)
    mfu = {name: model_flops[name] / wall / peak for name, (wall, _, _) in times.items()}
    env = environment_info()
    for name, (wall, cpu, all_wall) in times.items():
        print(json.dumps({
            "config": name,
            "tokens_per_s": round(tokens / wall, 1),
            "step_time_s": round(wall, 3),
            "step_times_s": [round(t, 3) for t in all_wall],
            "model_tflops": round(model_flops[name] / 1e12, 4),
            "mfu": round(mfu[name], 3),
            "plain_mfu": round(mfu["plain"], 3) if "plain" in mfu else None,
            # The same ratio from process CPU time: other processes' load does not inflate it.
            "process_cpu_s": round(cpu, 3),
            "mfu_by_cpu_time": round(model_flops[name] / cpu / peak_per_cpu_s, 3),
            "matmul_peak_gflops": round(peak / 1e9, 1),
            "matmul_peak_gflops_per_cpu_s": round(peak_per_cpu_s / 1e9, 1),
            "matmul_peak_problem": f"{peak_n}^3 {peak_dtype.name}",
            "mfu_nominal": (round(model_flops[name] / wall / (args.nominal_peak_tflops * 1e12), 3)
                            if args.nominal_peak_tflops else None),
            "matmul_peak_gflops_measured": {"before": round(peak_before / 1e9, 1),
                                            "interleaved": round(peak_interleaved / 1e9, 1),
                                            "after": round(peak_after / 1e9, 1)},
            "model": describe(cfg), "batch": f"{rows}x{length}", "prompt_tokens": prompt,
            # The plain peer always runs the whole batch in one forward/backward.
            "micro_batch_size": None if name == "plain" else args.micro_batch_size,
            "chunk_size": None if name == "plain" else chunk,
            "remat": "none" if name == "plain" else args.remat, "repeats": args.repeats, **env}), flush=True)


if __name__ == "__main__":
    main()
