"""Sampling from a LoRA model: adapters merged into the sampler's copy once per rollout (the
default, `sampling.sampling_model`) vs applied unmerged at every decode step.

    python benchmarks/lora_sampling.py            # one JSON line per form, interleaved runs
    python benchmarks/lora_sampling.py --quick    # tiny shapes (the smoke test)

Each timed call is a whole `sampling.generate` (the merge included in the merged form's time),
the same prompts, key and weights; `same_tokens` checks the two forms sampled the same tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import environment_info, interleaved_times  # noqa: E402
from grpo_jax import sampling  # noqa: E402
from grpo_jax.models import ModelConfig, create_model, lora  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                          max_position_embeddings=128)
        prompts, new, repeats = 4, 8, 1
    else:
        cfg = ModelConfig(vocab_size=2048, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, d_ff=1536,
                          max_position_embeddings=512)
        prompts, new, repeats = 32, 128, args.repeats
    model = create_model(cfg.replace(lora_rank=args.rank, lora_alpha=2.0 * args.rank), seed=0)
    state = nnx.state(model, lora.LoRAParam)  # adapters that act (B != 0)
    nnx.update(model, jax.tree.map(lambda x: x + 0.01, state))
    rng = np.random.default_rng(0)
    batch = [rng.integers(4, cfg.vocab_size, size=64 if not args.quick else 8).tolist() for _ in range(prompts)]
    sampling_cfg = dict(max_new_tokens=new, temperature=1.0, n=1)
    key = jax.random.key(0)
    plain = sampling.sampling_model
    outputs = {}

    def run(form):
        merge = form == "merged"
        sampling.sampling_model = functools.partial(plain, merge_adapters=merge)
        try:
            out = sampling.generate(model, batch, key, sampling_cfg)
        finally:
            sampling.sampling_model = plain
        outputs[form] = out.tokens
        return out.tokens

    times = interleaved_times({"merged": lambda: run("merged"), "unmerged": lambda: run("unmerged")}, repeats)
    same = bool(np.array_equal(outputs["merged"], outputs["unmerged"]))
    for form, (wall, cpu, _) in times.items():
        print(json.dumps({"benchmark": "lora_sampling", "form": form, "rank": args.rank, "prompts": prompts,
                          "new_tokens": new, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "wall_s": wall,
                          "cpu_s": cpu, "merged_over_unmerged": times["merged"][0] / times["unmerged"][0],
                          "same_tokens": same, **environment_info()}))


if __name__ == "__main__":
    main()
