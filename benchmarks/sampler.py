"""Sampler speed: grpo_jax.sampling.generate vs transformers' generate (PyTorch CPU), same weights.

    python benchmarks/sampler.py [--repeats 3] [--quick]
    python benchmarks/sampler.py --preset qwen2.5-0.5b --dtype bfloat16 --prompts 64 --samples 8 \
        --prompt-len 256 --new-tokens 512 --no-peer [--bandwidth-gbs 4800]    # the GSM8K rollout

Prints one JSON line per shape:
- "32x128": 32 prompts of 64 tokens, 128 new tokens each, temperature 1;
- "4x8x128": 4 prompts x 8 samples (the GRPO shape), 128 new tokens.
Both sides generate exactly 128 tokens (no stop token) from a random Qwen2-style model (hidden
512, 8 layers, 8 heads / 2 KV heads, intermediate 1408, vocab 8192). The two sides are called in
turn (`--repeats` times each, after a warm-up), each reporting its median. The roofline fraction
is the model's matmul FLOPs per second over a float32 matmul peak measured in the same run (the
best of the measurements before and after each shape).

`--prompts/--samples/--prompt-len/--new-tokens` give one shape instead of the two (the GSM8K
rollout: 64 prompts x 8 samples, 256 + 512 tokens, i.e. 512 rows against 768 cache slots),
`--preset` / `--dtype` a model shape (random weights; the sampler reads them in `--dtype`),
`--no-peer` skips transformers. Every line also gives the memory roofline: a decode step reads
every weight and the whole KV cache (all slots), so the bytes of a generation are at least
prefill (weights + the prompts' cache) + (new_tokens - 1) x (weights + cache), and
`memory_roofline_fraction` is that floor's time at the device's bandwidth over the measured
time. The bandwidth is `--bandwidth-gbs`, else the datasheet's for an H100 / H200
(`nominal_bandwidth_gbs`), else none; `measured_bandwidth_gbs` is a device copy timed in the
same run (`memory_roofline_fraction_measured` over it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_positive, environment_info, interleaved_times, matmul_peak_flops, time_call  # noqa: E402

from grpo_jax import platform as platform_lib  # noqa: E402
from grpo_jax import sampling  # noqa: E402
from grpo_jax.models import PRESETS, ModelConfig, create_model, preset, save_hf  # noqa: E402

MODEL = ModelConfig(model_type="qwen2", vocab_size=8192, d_model=512, n_layers=8, n_heads=8,
                    n_kv_heads=2, head_dim=64, d_ff=1408, qkv_bias=True, tie_embeddings=False,
                    max_position_embeddings=1024)


def generation_flops(cfg: ModelConfig, rows: int, prompt_len: int, new: int, prompt_rows: int) -> float:
    """Matmul FLOPs of prefill (once per prompt) + decode (per row and step), attention included."""
    d, hd = cfg.d_model, cfg.head_dim
    dense = 2 * (d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.d_ff) * cfg.n_layers
    head = 2 * d * cfg.vocab_size
    attn = lambda ctx: 4 * cfg.n_heads * hd * ctx * cfg.n_layers
    prefill = prompt_rows * (prompt_len * dense + head + sum(attn(t + 1) for t in range(prompt_len)))
    decode = rows * sum(dense + head + attn(prompt_len + t + 1) for t in range(new - 1))
    return float(prefill + decode)


# Datasheet HBM bandwidths (GB/s) by device kind.
NOMINAL_BANDWIDTH_GBS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 SXM": 3350.0}


def nominal_bandwidth_gbs() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((bw for name, bw in NOMINAL_BANDWIDTH_GBS.items() if name in kind), None)


def measured_bandwidth(n_bytes: int, repeats: int = 5) -> float:
    """Bytes/s of a jitted `x + 1` over an n_bytes float32 array (reads and writes it once)."""
    x = jax.numpy.zeros((n_bytes // 4,), jax.numpy.float32)
    add = jax.jit(lambda x: x + 1)
    wall, _ = time_call(lambda: add(x), warmup=2, repeats=repeats)
    return 2 * n_bytes / min(wall)


def generation_bytes(cfg: ModelConfig, rows: int, prompt_rows: int, prompt_len: int, new: int,
                     cache_len: int) -> float:
    """Bytes a generation reads at least: the weights (in the compute dtype) and the KV cache
    (every slot: a decode step attends over the whole cache) once per decode step, plus the
    prefill's weights and the prompts' cache written once."""
    weights = cfg.num_params() * np.dtype(cfg.dtype).itemsize
    per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize
    prefill = weights + prompt_rows * prompt_len * per_slot
    return float(prefill + (new - 1) * (weights + rows * cache_len * per_slot))


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller shapes (smoke test)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a model shape from grpo_jax.models.PRESETS (random weights)")
    parser.add_argument("--layers", type=int, default=None, help="override the model's layer count")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the model's vocabulary")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (the weights the sampler reads)")
    parser.add_argument("--prompts", type=int, default=None, help="one shape: prompts per batch")
    parser.add_argument("--samples", type=int, default=1, help="one shape: samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row")
    parser.add_argument("--decode-chunk", type=int, default=None,
                        help="decode steps between stop checks (default: by platform)")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers' generate")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="the device's memory bandwidth (default: the datasheet's, if known)")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("repeats", "samples", "prompt_len", "prompts", "new_tokens", "layers", "vocab_size"))
    return args


def main():
    args = parse_args()
    choices = platform_lib.choices()  # the devices this benchmark runs on
    cfg = preset(args.preset) if args.preset else MODEL
    cfg = cfg.replace(dtype=args.dtype, param_dtype=args.dtype, n_layers=args.layers or cfg.n_layers,
                      vocab_size=args.vocab_size or cfg.vocab_size, cpu_weight_grad=choices.cpu_weight_grad)
    if args.quick:
        cfg = cfg.replace(n_layers=2, vocab_size=args.vocab_size or 1024)
    new = args.new_tokens or (128 if not args.quick else 16)
    prompt_len = args.prompt_len
    if args.prompts:
        shapes = [(f"{args.prompts}x{args.samples}x{new}", args.prompts, args.samples)]
    else:
        shapes = [("32x128", 32, 1), ("4x8x128", 4, 8)]  # names of the default shapes
    if prompt_len + new > cfg.max_position_embeddings:
        raise SystemExit(f"{prompt_len} + {new} tokens exceed the model's {cfg.max_position_embeddings} positions")
    model = create_model(cfg, seed=0)
    hf = torch = None
    if not args.no_peer:
        import torch
        import transformers

        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(model, tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    peak = matmul_peak_flops()
    nominal_bw = args.bandwidth_gbs or nominal_bandwidth_gbs()
    on_cpu = choices.platform == "cpu"
    measured_bw = measured_bandwidth(64 << 20 if on_cpu else 4 << 30)
    rng = np.random.default_rng(0)
    decode_chunk = args.decode_chunk or choices.decode_chunk
    for name, n_prompts, n in shapes:
        prompts = rng.integers(10, cfg.vocab_size, size=(n_prompts, prompt_len)).astype(np.int32)
        sc = sampling.SamplingConfig(max_new_tokens=new, temperature=1.0, n=n, prompt_bucket=prompt_len,
                                     batch_bucket=min(n_prompts, 64), decode_chunk=decode_chunk)
        keys = iter(range(10_000))

        def ours():
            s = sampling.generate(model, prompts.tolist(), jax.random.key(next(keys)), sc)
            assert s.tokens.shape == (n_prompts * n, new)

        def peer():
            ids = torch.tensor(prompts, dtype=torch.long)
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                                  min_new_tokens=new, num_return_sequences=n, pad_token_id=0)
            assert out.shape == (n_prompts * n, prompt_len + new)

        runners = {"ours": ours} if hf is None else {"ours": ours, "peer": peer}
        # Called in turn (ours, peer, ours, ...) so a drift of the machine's speed hits both.
        times = interleaved_times(runners, args.repeats)
        t_ours = times["ours"][0]
        t_peer = times["peer"][0] if hf is not None else None
        # The VM's matmul rate drifts: the best of the measurements so far (a conservative
        # roofline fraction).
        peak = max(peak, matmul_peak_flops())
        rows = n_prompts * n
        flops = generation_flops(cfg, rows, prompt_len, new, n_prompts)
        # The sampler's cache: the prompt bucket + max_new_tokens rounded up to the decode chunk.
        cache_len = prompt_len + -(-new // decode_chunk) * decode_chunk
        floor_bytes = generation_bytes(cfg, rows, n_prompts, prompt_len, new, cache_len)
        fraction = lambda bw: round(floor_bytes / bw / t_ours, 3) if bw else None  # noqa: E731
        print(json.dumps({
            "benchmark": "sampler", "shape": name, "prompts": n_prompts, "samples_per_prompt": n,
            "prompt_len": prompt_len, "new_tokens": new, "cache_slots": cache_len,
            "decode_chunk": decode_chunk,
            "model": (f"{cfg.model_type} d{cfg.d_model} L{cfg.n_layers} H{cfg.n_heads}/{cfg.n_kv_heads} "
                      f"Dh{cfg.head_dim} F{cfg.d_ff} V{cfg.vocab_size} {cfg.dtype}"),
            "grpo_jax_s": round(t_ours, 4), "transformers_s": round(t_peer, 4) if t_peer else None,
            "speedup_vs_transformers": round(t_peer / t_ours, 2) if t_peer else None,
            "grpo_jax_tokens_per_s": round(rows * new / t_ours, 1),
            "transformers_tokens_per_s": round(rows * new / t_peer, 1) if t_peer else None,
            "model_gflop": round(flops / 1e9, 2),
            "grpo_jax_gflops": round(flops / t_ours / 1e9, 1),
            "matmul_peak_gflops": round(peak / 1e9, 1),
            "roofline_fraction": round(flops / t_ours / peak, 3),
            "min_gbytes": round(floor_bytes / 1e9, 3),
            "achieved_gbytes_per_s": round(floor_bytes / t_ours / 1e9, 1),
            "nominal_bandwidth_gbs": nominal_bw,
            "memory_roofline_fraction": fraction(nominal_bw * 1e9 if nominal_bw else None),
            "measured_bandwidth_gbs": round(measured_bw / 1e9, 1),
            "memory_roofline_fraction_measured": fraction(measured_bw),
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            **environment_info(),
        }), flush=True)


if __name__ == "__main__":
    main()
