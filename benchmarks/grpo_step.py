"""One full GRPO step of grpo_jax vs TRL's GRPOTrainer (PyTorch CPU), same weights and shapes.

    python benchmarks/grpo_step.py [--steps 3] [--trl-steps 2] [--micro-batch-size 8] [--quick]

A random Qwen2-style checkpoint (hidden 512, 8 layers, 8 heads / 2 KV heads, intermediate 1408,
vocab 8192), 4 prompts x 8 completions, prompts of 64 tokens, completions of exactly 128 tokens,
for beta 0.04 (reference model on) and beta 0, the update in micro-batches of 8 rows on both
sides (gradient accumulation; on CPU a smaller working set runs faster). One JSON line per beta
with the median step time of each side, the ratio, our step split into sampling / reference /
update, and the compute floor (the step's matmul FLOPs over a float32 matmul peak measured in
the same run: the best of three measurements, before, between and after the two sides).

Our step, as the trainer runs it: `sampling.generate` (one prefill per prompt shared by its
group of 8, 128 decode steps) -> rewards on the host -> `group_advantages` -> the compiled train
step (reference log-probs inside it when beta > 0). The split: sampling is timed on its own;
the reference forward is timed on its own with the same shapes; update = train step - reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment_info, load_average, matmul_peak_flops  # noqa: E402
from sampler import MODEL, generation_flops  # noqa: E402
from trl_peer import measure_trl_grpo_step  # noqa: E402

from grpo_jax import optim, sampling  # noqa: E402
from grpo_jax import platform as platform_lib  # noqa: E402
from grpo_jax import train_step as ts  # noqa: E402
from grpo_jax.advantages import group_advantages  # noqa: E402
from grpo_jax.models import create_model, save_hf  # noqa: E402

PROMPTS, GROUP, PROMPT_LEN, NEW = 4, 8, 64, 128


def our_step(model, cfg, prompt_ids, beta: float, steps: int, micro_batch_size: int | None):
    """Median seconds of a whole step and of its parts over `steps` steps (after one warm-up)."""
    optimizer = optim.make_optimizer(1e-6)
    state = ts.init_train_state(model, optimizer, jax.random.key(0))
    graphdef, _, rest = ts.split_params(model)
    ref_params = jax.tree.map(jnp.copy, state.params) if beta > 0 else None
    # max_loss_tokens as the trainer sets it (the completion budget): the head runs at the
    # completion's positions only, as TRL's logits_to_keep does.
    tcfg = ts.TrainConfig(loss_type="grpo", beta=beta, temperature=1.0, micro_batch_size=micro_batch_size,
                          max_loss_tokens=NEW, chunk_size=platform_lib.choices().logprob_chunk)
    step_fn = ts.make_train_step(model, optimizer, tcfg)
    sc = sampling.SamplingConfig(max_new_tokens=NEW, temperature=1.0, n=GROUP, prompt_bucket=PROMPT_LEN,
                                 batch_bucket=PROMPTS)
    advantages_fn = jax.jit(group_advantages, static_argnums=(1,))

    n_micro = PROMPTS * GROUP // (micro_batch_size or PROMPTS * GROUP)

    @jax.jit
    def reference(params, batch):  # as the step runs it: the same micro-batches, one by one
        ref_model = nnx.merge(graphdef, params, rest)
        data = ts.prepare_batch(batch, tcfg)
        micro = ts._to_micro({k: data[k] for k in ("tokens", "positions", "segment_ids", "mask")},
                             n_micro, lambda x: x)
        return jax.lax.map(lambda m: ts.score_tokens(ref_model, m, tcfg, fuse=True), micro)

    times = {"step": [], "sampling": [], "train_step": [], "reference": []}
    for i in range(steps + 1):
        start = time.perf_counter()
        policy = nnx.merge(graphdef, state.params, rest)
        samples = sampling.generate(policy, prompt_ids[i % len(prompt_ids)], jax.random.key(i), sc)
        sampled = time.perf_counter()
        prompts = np.repeat(np.asarray(prompt_ids[i % len(prompt_ids)], np.int32), GROUP, axis=0)
        tokens = np.concatenate([prompts, samples.tokens], axis=1)
        length = tokens.shape[1]
        mask = np.zeros_like(tokens, np.float32)
        mask[:, PROMPT_LEN:] = 1.0
        old = np.zeros_like(mask)
        old[:, PROMPT_LEN:] = samples.logprobs
        rewards = (samples.tokens % 7 == 0).mean(axis=1).astype(np.float32)  # a cheap host reward
        batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape),
                 "segment_ids": np.ones_like(tokens), "loss_mask": mask, "old_logps": old,
                 "advantages": advantages_fn(jnp.asarray(rewards), GROUP)}
        state, metrics = step_fn(state, batch, ref_params)
        jax.block_until_ready(metrics)
        end = time.perf_counter()
        if beta > 0:  # the reference forward on its own, for the split
            r0 = time.perf_counter()
            jax.block_until_ready(reference(ref_params, batch))
            ref_s = time.perf_counter() - r0
        else:
            ref_s = 0.0
        if i == 0:
            continue  # compile
        times["step"].append(end - start)
        times["sampling"].append(sampled - start)
        times["train_step"].append(end - sampled)
        times["reference"].append(ref_s)
    return {k: statistics.median(v) for k, v in times.items()}


def step_flops(cfg, beta: float) -> float:
    """Matmul FLOPs of one step: generation + policy forward/backward (3x forward) + reference;
    the training forward's output head at the NEW completion positions of each row only (what
    both sides compute: `max_loss_tokens` here, `logits_to_keep` in TRL)."""
    length = PROMPT_LEN + NEW
    head = 2 * cfg.d_model * cfg.vocab_size
    train_forward = (cfg.flops_per_token(length) * length - head * (length - NEW)) * PROMPTS * GROUP
    return generation_flops(cfg, PROMPTS * GROUP, PROMPT_LEN, NEW, PROMPTS) + (3 + (beta > 0)) * train_forward


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3, help="timed steps of ours (after one warm-up)")
    parser.add_argument("--trl-steps", type=int, default=2, help="timed TRL steps")
    parser.add_argument("--trl-warmup", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 layers (smoke test)")
    parser.add_argument("--betas", default="0.04,0")
    parser.add_argument("--micro-batch-size", type=int, default=8,
                        help="rows per forward/backward, both sides (gradient accumulation); 0: all 32")
    args = parser.parse_args()

    cfg = MODEL.replace(n_layers=2, vocab_size=1024) if args.quick else MODEL
    cfg = cfg.replace(cpu_weight_grad=platform_lib.choices().cpu_weight_grad)
    model = create_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    n_sets = max(args.steps + 1, args.trl_steps + args.trl_warmup)
    prompt_sets = [rng.integers(10, cfg.vocab_size, size=(PROMPTS, PROMPT_LEN)).tolist() for _ in range(n_sets)]
    with tempfile.TemporaryDirectory() as checkpoint:
        save_hf(model, checkpoint)
        for beta in (float(b) for b in args.betas.split(",")):
            # The VM's matmul rate drifts (up to 2x within minutes): the peak is the best of
            # three measurements around the two runs, so the floor is never too high.
            peaks = [matmul_peak_flops()]
            micro = args.micro_batch_size or None
            ours = our_step(model, cfg, prompt_sets, beta, args.steps, micro)
            peaks.append(matmul_peak_flops())
            trl = measure_trl_grpo_step(
                checkpoint, num_prompts=PROMPTS, group_size=GROUP, prompt_len=PROMPT_LEN, completion_len=NEW,
                beta=beta, steps=args.trl_steps, warmup=args.trl_warmup,
                prompt_ids=[p for s in prompt_sets[: args.trl_steps + args.trl_warmup] for p in s],
                micro_batch_size=micro)
            peaks.append(matmul_peak_flops())
            peak = max(peaks)
            flops = step_flops(cfg, beta)
            floor_s = flops / peak
            print(json.dumps({
                "benchmark": "grpo_step", "beta": beta, "prompts": PROMPTS, "group_size": GROUP,
                "prompt_len": PROMPT_LEN, "completion_len": NEW, "micro_batch_size": micro or PROMPTS * GROUP,
                "grpo_jax_step_s": round(ours["step"], 3), "trl_step_s": round(trl["median_step_s"], 3),
                "speedup_vs_trl": round(trl["median_step_s"] / ours["step"], 2),
                "grpo_jax_split_s": {"sampling": round(ours["sampling"], 3),
                                     "reference": round(ours["reference"], 3),
                                     "update": round(ours["train_step"] - ours["reference"], 3)},
                "trl_split_s": {k: round(trl[k], 3) for k in ("sampling_s", "reference_s", "update_s")
                                if k in trl},
                "step_gflop": round(flops / 1e9, 1), "matmul_peak_gflops": round(peak / 1e9, 1),
                "matmul_peak_gflops_measured": [round(p / 1e9, 1) for p in peaks],
                "compute_floor_s": round(floor_s, 3), "vs_floor": round(ours["step"] / floor_s, 2),
                "peer_versions": trl.get("versions"),
                "trl_attn_implementation": trl.get("attn_implementation"),
                **environment_info(), "load_avg_end": load_average(),
            }), flush=True)


if __name__ == "__main__":
    main()
