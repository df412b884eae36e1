"""Packed vs padded train batches: useful (trained) tokens per second of the same train step.

    python benchmarks/packing.py [--episodes 64] [--width 512] [--prompt 32] [--sigma 0.8]
                                 [--median 96] [--repeats 3] [--seed 0] [--quick]

Episodes: a `--prompt`-token prompt and a completion of log-normal length (median `--median`,
log-space sigma `--sigma`: heavy-tailed), clipped to 32 .. width - prompt tokens, random token
ids and sampler log-probs; made into a `Rollout` as the trainer's rollouts are
(`trajectories.pack_episodes`, lengths rounded up to 32). Both runners train the same model on
the same episodes with the same `grpo_jax.train_step` (GRPO loss, AdamW, whole batch in one
micro-batch, float32):

- "padded": one episode per row, rows as wide as the longest episode (rounded up to 32), the
  output head at each row's completion positions only (`max_loss_tokens`, as the trainer sets it
  for unpacked batches);
- "packed": `grpo_jax.packing.pack_rollout`, rows of `--width` tokens (the trainer's
  rollout.max_seq_len), first-fit decreasing, the row count bucketed as in the trainer.

Model: Qwen2-style, hidden 128, 4 layers, 4 heads / 2 KV heads (head_dim 32), intermediate 384,
vocabulary 4096, random weights. The runners are called round-robin `--repeats` times after one
warm-up (compile) call each; each reports its median. Prints one JSON line per runner with
`useful_tokens_per_s` (loss-mask tokens over the step's wall time) and the batch's shape and
padding; the packed line adds `speedup` (its useful tokens/s over the padded runner's) and
`speedup_by_cpu_time` (the same from this process's CPU seconds: a shared machine's load
inflates wall times unevenly).
`--quick`: 8 episodes, width 256, a 16-token prompt, median 40, 2 layers (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_positive, environment_info, interleaved_times  # noqa: E402

from grpo_jax import optim, packing  # noqa: E402
from grpo_jax import platform as platform_lib  # noqa: E402
from grpo_jax import train_step as ts  # noqa: E402
from grpo_jax.models import ModelConfig, create_model  # noqa: E402
from grpo_jax.trajectories import pack_episodes  # noqa: E402

MODEL = ModelConfig(model_type="qwen2", vocab_size=4096, d_model=128, n_layers=4, n_heads=4,
                    n_kv_heads=2, head_dim=32, d_ff=384, qkv_bias=True, tie_embeddings=False,
                    max_position_embeddings=1024)
MIN_COMPLETION = 32


def make_rollout(cfg: ModelConfig, episodes: int, width: int, prompt: int, median: float,
                 sigma: float, seed: int):
    """A `Rollout` of `episodes` heavy-tailed episodes (module docstring) and their advantages."""
    rng = np.random.default_rng(seed)
    completions = np.clip(np.round(rng.lognormal(np.log(median), sigma, episodes)),
                          MIN_COMPLETION, width - prompt).astype(int)
    out = []
    for completion in completions:
        length = prompt + int(completion)
        out.append({"tokens": rng.integers(10, cfg.vocab_size, length).tolist(),
                    "mask": [0] * prompt + [1] * int(completion),
                    # Near a random model's log-probs (log 1/V), so ratios are near 1.
                    "logprobs": (-np.log(cfg.vocab_size) + 0.01 * rng.standard_normal(length)).tolist(),
                    "prompt": [], "completion": [], "state": {}, "num_turns": 1,
                    "finish_reason": "completed"})
    rollout = pack_episodes(out, group_size=1, pad_id=0, length_multiple=32, max_seq_len=width)
    return rollout, rng.standard_normal(episodes).astype(np.float32)


def step_runner(cfg: ModelConfig, batch, tcfg: ts.TrainConfig):
    """A no-argument function running one train step on `batch` (the state carried over)."""
    model = create_model(cfg, seed=0)
    optimizer = optim.make_optimizer(1e-6)
    holder = {"state": ts.init_train_state(model, optimizer, jax.random.key(0))}
    step = ts.make_train_step(model, optimizer, tcfg)
    batch = jax.device_put(batch)

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

    return run


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--width", type=int, default=512, help="packed row width (max_seq_len)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per episode")
    parser.add_argument("--median", type=float, default=96.0, help="median completion length")
    parser.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of the lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 episodes, width 256, 2 layers")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("episodes", "width", "prompt", "median", "sigma", "repeats"))
    if args.quick:
        args.episodes, args.width, args.prompt, args.median = min(args.episodes, 8), 256, 16, 40.0
    if args.prompt + MIN_COMPLETION > args.width:
        parser.error(f"--prompt {args.prompt} leaves no {MIN_COMPLETION}-token completion in --width {args.width}")
    return args


def main():
    args = parse_args()
    choices = platform_lib.choices()
    cfg = MODEL.replace(cpu_weight_grad=choices.cpu_weight_grad, n_layers=2 if args.quick else MODEL.n_layers)
    rollout, advantages = make_rollout(cfg, args.episodes, args.width, args.prompt, args.median,
                                       args.sigma, args.seed)
    padded = {"tokens": rollout.tokens, "positions": rollout.positions, "segment_ids": rollout.segment_ids,
              "loss_mask": rollout.loss_mask, "old_logps": rollout.logprobs, "advantages": advantages}
    packed, stats = packing.pack_rollout(rollout, advantages, width=args.width)
    common = dict(loss_type="grpo", chunk_size=choices.logprob_chunk)
    longest_completion = int(rollout.loss_mask.sum(axis=1).max())
    batches = {"padded": (padded, ts.TrainConfig(max_loss_tokens=longest_completion, **common)),
               "packed": (packed, ts.TrainConfig(**common))}
    runners = {name: step_runner(cfg, batch, tcfg) for name, (batch, tcfg) in batches.items()}
    times = interleaved_times(runners, args.repeats)
    useful = int(rollout.loss_mask[:, 1:].sum())
    real = int(rollout.lengths.sum())
    env = environment_info()
    rates, cpu_rates = {}, {}
    for name, (batch, _) in batches.items():
        wall, cpu, walls = times[name]
        rows, width = batch["tokens"].shape
        rates[name], cpu_rates[name] = useful / wall, useful / cpu
        row = {"config": name, "episodes": args.episodes, "batch": f"{rows}x{width}",
               "useful_tokens": useful, "episode_tokens": real,
               "padding_frac": round(1 - real / (rows * width), 4),
               "step_time_s": round(wall, 4), "step_times_s": [round(w, 4) for w in walls],
               "process_cpu_s": round(cpu, 4), "useful_tokens_per_s": round(rates[name], 1),
               "model": f"d{cfg.d_model} L{cfg.n_layers} V{cfg.vocab_size} {cfg.dtype}",
               "lengths": {"prompt": args.prompt, "median": args.median, "sigma": args.sigma,
                           "min": int(rollout.lengths.min()), "max": int(rollout.lengths.max())},
               **env}
        if name == "packed":
            row["speedup"] = round(rates["packed"] / rates["padded"], 3)
            # The same ratio from this process's CPU time, which other processes' load does not inflate.
            row["speedup_by_cpu_time"] = round(cpu_rates["packed"] / cpu_rates["padded"], 3)
            row["padding_frac_unpacked"] = round(stats["train/padding_frac_unpacked"], 4)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
