"""Sampler speed: grpo_jax.sampling.generate vs transformers' generate (PyTorch CPU), same weights.

    python benchmarks/sampler.py [--repeats 3] [--quick]

Prints one JSON line per shape:
- "32x128": 32 prompts of 64 tokens, 128 new tokens each, temperature 1;
- "4x8x128": 4 prompts x 8 samples (the GRPO shape), 128 new tokens.
Both sides generate exactly 128 tokens (no stop token) from a random Qwen2-style model (hidden
512, 8 layers, 8 heads / 2 KV heads, intermediate 1408, vocab 8192). The two sides are called in
turn (`--repeats` times each, after a warm-up), each reporting its median. The roofline fraction
is the model's matmul FLOPs per second over a float32 matmul peak measured in the same run (the
best of the measurements before and after each shape).
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
from common import environment_info, interleaved_times, matmul_peak_flops  # noqa: E402

from grpo_jax import sampling  # noqa: E402
from grpo_jax.models import ModelConfig, create_model, save_hf  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller shapes (smoke test)")
    args = parser.parse_args()

    import torch
    import transformers

    torch.manual_seed(0)
    cfg = MODEL if not args.quick else MODEL.replace(n_layers=2, vocab_size=1024)
    model = create_model(cfg, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    peak = matmul_peak_flops()
    rng = np.random.default_rng(0)
    new = 128 if not args.quick else 16
    shapes = [("32x128", 32, 1), ("4x8x128", 4, 8)]
    for name, n_prompts, n in shapes:
        prompts = rng.integers(10, cfg.vocab_size, size=(n_prompts, 64)).astype(np.int32)
        sc = sampling.SamplingConfig(max_new_tokens=new, temperature=1.0, n=n, prompt_bucket=64,
                                     batch_bucket=4)
        keys = iter(range(10_000))

        def ours():
            s = sampling.generate(model, prompts.tolist(), jax.random.key(next(keys)), sc)
            assert s.tokens.shape == (n_prompts * n, new)

        ids = torch.tensor(prompts, dtype=torch.long)

        def peer():
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                                  min_new_tokens=new, num_return_sequences=n, pad_token_id=0)
            assert out.shape == (n_prompts * n, 64 + new)

        # Called in turn (ours, peer, ours, ...) so a drift of the machine's speed hits both.
        times = interleaved_times({"ours": ours, "peer": peer}, args.repeats)
        t_ours, t_peer = times["ours"][0], times["peer"][0]
        # The VM's matmul rate drifts: the best of the measurements so far (a conservative
        # roofline fraction).
        peak = max(peak, matmul_peak_flops())
        flops = generation_flops(cfg, n_prompts * n, 64, new, n_prompts)
        print(json.dumps({
            "benchmark": "sampler", "shape": name, "prompts": n_prompts, "samples_per_prompt": n,
            "prompt_len": 64, "new_tokens": new,
            "grpo_jax_s": round(t_ours, 4), "transformers_s": round(t_peer, 4),
            "speedup_vs_transformers": round(t_peer / t_ours, 2),
            "grpo_jax_tokens_per_s": round(n_prompts * n * new / t_ours, 1),
            "transformers_tokens_per_s": round(n_prompts * n * new / t_peer, 1),
            "model_gflop": round(flops / 1e9, 2),
            "grpo_jax_gflops": round(flops / t_ours / 1e9, 1),
            "matmul_peak_gflops": round(peak / 1e9, 1),
            "roofline_fraction": round(flops / t_ours / peak, 3),
            "torch_threads": torch.get_num_threads(),
            **environment_info(),
        }), flush=True)


if __name__ == "__main__":
    main()
