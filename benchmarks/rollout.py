"""Multi-turn rollout speed: the engine vs the lockstep sampler vs a transformers loop, same work.

    python benchmarks/rollout.py [--episodes 64 --group 8] [--slots 16,32,64 --decode-steps 4,8,16]
        [--repeats 3] [--no-peer] [--quick]

A 3-turn tool task emulated at the token level, so every runner does exactly the same work:
`--episodes` episodes (`--episodes / --group` random prompts of 48-64 ids, each a group); every
(episode, turn) pair has a target completion length, heavy-tailed: an eighth of the pairs are 8x
longer (16 vs 128 tokens). A turn ends at its target (no stop token: the random model would not
stop). After turns 1 and 2 a tool answers after 30-70 ms (uniform) with 12 fixed reply ids.

- engine: `grpo_jax.engine.Engine`, each episode a coroutine (generate, the tool's sleep,
  generate on the kept cache with the reply's ids, ...), `max_new_tokens` = its target;
- lockstep: one `sampling.generate` per turn over every episode, each history re-prefilled,
  `max_new_tokens` = the turn's longest target, each row then cut at its own target (what a
  batch with real stop tokens does: short rows idle until the longest is done); the tools of a
  turn run concurrently, the turn waits for the slowest;
- transformers: `generate` once per turn on the left-padded batch of histories (ids, as TRL's
  tool loop re-tokenizes them), the same cut and tool wait; torch on the CPU.

Every runner runs once untimed (compilation; the engine's programs compile once per
`EngineConfig`, and the timed runs reuse the same engine), then `--repeats` times round-robin;
each prints one JSON line with its median. `--slots` / `--decode-steps` take comma lists: one
engine per combination, each line with its speedups over the two others (episodes/s ratios).
The engine's lines also give its stats over one timed run: slot utilisation (sampled tokens
over slot-steps), decode calls, prefill tokens, evictions, `device_s` (the engine's own timing
of its device calls, `stats["busy_s"]`) against the wall time, and a profile: the wall seconds
in its copy / prefill / decode calls and `between_calls_s`, the rest (the scheduler on the
event loop, and waits while every episode is at its tool). Prefill and copy calls return before
their work is done (it lands in the next decode's wait) unless `--profile` waits for each.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_positive, environment_info  # noqa: E402
from sampler import MODEL  # noqa: E402

from grpo_jax import platform as platform_lib  # noqa: E402
from grpo_jax import sampling  # noqa: E402
from grpo_jax.engine import Engine, EngineConfig, GenerationParams  # noqa: E402
from grpo_jax.models import create_model, save_hf  # noqa: E402

TURNS = 3


@dataclasses.dataclass(frozen=True)
class Task:
    prompts: list[list[int]]        # one per group
    group: int
    targets: np.ndarray             # [episodes, TURNS] tokens kept per turn
    latency: np.ndarray             # [episodes, TURNS - 1] seconds of the tool after each turn
    replies: list[list[int]]        # [TURNS - 1] the tool's reply ids after each turn

    @property
    def episodes(self) -> int:
        return len(self.targets)

    def prompt_of(self, e: int) -> list[int]:
        return self.prompts[e // self.group]

    def max_history(self) -> int:
        """The longest history any runner builds (the prompt, every turn and reply)."""
        replies = sum(len(r) for r in self.replies)
        return max(len(self.prompt_of(e)) + int(self.targets[e].sum()) + replies for e in range(self.episodes))


def make_task(episodes: int, group: int, prompt_len: tuple[int, int], short: int, long: int, reply_len: int,
              latency_s: tuple[float, float], vocab: int, seed: int = 0) -> Task:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, vocab, size=int(rng.integers(prompt_len[0], prompt_len[1] + 1))).tolist()
               for _ in range(episodes // group)]
    pairs = episodes * TURNS
    targets = np.full(pairs, short, np.int64)
    targets[rng.permutation(pairs)[: max(pairs // 8, 1)]] = long  # exactly an eighth of the pairs: the tail
    latency = rng.uniform(*latency_s, size=(episodes, TURNS - 1))
    replies = [rng.integers(10, vocab, size=reply_len).tolist() for _ in range(TURNS - 1)]
    return Task(prompts, group, targets.reshape(episodes, TURNS), latency, replies)


# -- the runners: each returns the kept tokens, [episode][turn] -> ids ---------------------------
def run_engine(engine: Engine, task: Task, key) -> list[list[list[int]]]:
    async def episode(e: int, session) -> list[list[int]]:
        kept, new_ids = [], []
        try:
            for k in range(TURNS):
                out = await engine.generate(session, new_ids, GenerationParams(
                    max_new_tokens=int(task.targets[e, k]), temperature=1.0))
                kept.append(out.tokens)
                if k < TURNS - 1:
                    await asyncio.sleep(task.latency[e, k])  # this episode's tool; the others decode meanwhile
                    new_ids = task.replies[k]
        finally:
            engine.release(session)
        return kept

    async def main():
        plays = []
        for p, prompt in enumerate(task.prompts):
            ids = list(range(p * task.group, (p + 1) * task.group))
            plays += [episode(e, s) for e, s in zip(ids, engine.open(prompt, ids, key))]
        return await asyncio.gather(*plays)

    return asyncio.run(main())


def run_lockstep(model, task: Task, key, base: sampling.SamplingConfig) -> list[list[list[int]]]:
    histories = [list(task.prompt_of(e)) for e in range(task.episodes)]
    kept = [[] for _ in range(task.episodes)]
    for k in range(TURNS):
        cfg = dataclasses.replace(base, max_new_tokens=int(task.targets[:, k].max()), n=task.group if k == 0 else 1)
        prompts = task.prompts if k == 0 else histories  # turn 1: a group shares its prompt's prefill
        s = sampling.generate(model, prompts, jax.random.fold_in(key, k), cfg, row_ids=list(range(task.episodes)))
        for e in range(task.episodes):
            ids = s.tokens[e, : task.targets[e, k]].tolist()
            kept[e].append(ids)
            histories[e] += ids
        if k < TURNS - 1:
            time.sleep(task.latency[:, k].max())  # the turn's tools run concurrently: the slowest one
            for h in histories:
                h += task.replies[k]
    return kept


def run_transformers(hf, torch, task: Task, seed: int, max_new: int | None = None) -> list[list[list[int]]]:
    torch.manual_seed(seed)
    histories = [list(task.prompt_of(e)) for e in range(task.episodes)]
    kept = [[] for _ in range(task.episodes)]
    for k in range(TURNS):
        m = max_new or int(task.targets[:, k].max())
        width = max(map(len, histories))
        ids = torch.zeros((task.episodes, width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for e, h in enumerate(histories):  # left padding, as a batch of re-tokenized histories
            ids[e, width - len(h):] = torch.tensor(h)
            mask[e, width - len(h):] = 1
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=m, min_new_tokens=m, pad_token_id=0)
        for e in range(task.episodes):
            new = out[e, width: width + int(task.targets[e, k])].tolist()
            kept[e].append(new)
            histories[e] += new
        if k < TURNS - 1:
            time.sleep(task.latency[:, k].max())
            for h in histories:
                h += task.replies[k]
    return kept


def time_engine_calls(engine: Engine, seconds: collections.Counter, sync: bool):
    """Wraps the engine's device calls (copy, prefill, decode: each the host's preparation, the
    program and the results' transfer) to add their wall seconds to `seconds` (a profile: the
    rest of the wall time is the scheduler, the event loop, and waits when every episode is at
    its tool). Copies and prefills are dispatched asynchronously (their work lands in the next
    call that waits for results) unless `sync` waits for each call's cache."""
    for name in ("_copy", "_prefill", "_decode"):
        async def timed(*args, _call=getattr(engine, name), _name=name[1:]):
            t0 = time.perf_counter()
            try:
                out = await _call(*args)
                if sync:
                    jax.block_until_ready(engine._cache)
                return out
            finally:
                seconds[_name + "_s"] += time.perf_counter() - t0
        setattr(engine, name, timed)


def warm_engine(engine: Engine, task: Task):
    """Compiles every program of the engine (`Engine.warmup`), then plays a short episode pair."""
    engine.warmup([GenerationParams(temperature=1.0)])

    async def main():
        sessions = engine.open(task.prompts[0][:8], [0, 1], jax.random.key(123))
        params = GenerationParams(max_new_tokens=2, temperature=1.0)
        await asyncio.gather(*(engine.generate(s, (), params) for s in sessions))
        await asyncio.gather(*(engine.generate(s, task.replies[0], params) for s in sessions))
        for s in sessions:
            engine.release(s)

    asyncio.run(main())


def int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated (got {text!r})")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=None, help="episodes (default 64; --quick 8)")
    parser.add_argument("--group", type=int, default=None, help="episodes per prompt (default 8; --quick 4)")
    parser.add_argument("--slots", type=int_list, default=None, help="engine slots, a comma list (default 32)")
    parser.add_argument("--decode-steps", type=int_list, default=None,
                        help="engine decode steps per call at most, a comma list (default 16)")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="engine prefill chunk (default: the engine's)")
    parser.add_argument("--prefill-rows", type=int, default=None,
                        help="engine rows per prefill call at most (default: the engine's)")
    parser.add_argument("--short", type=int, default=None, help="the common target length (default 16)")
    parser.add_argument("--long", type=int, default=None, help="the tail's target length (default 8 x short)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers loop")
    parser.add_argument("--no-lockstep", action="store_true", help="skip the lockstep rollout")
    parser.add_argument("--profile", action="store_true",
                        help="wait for each engine call's result, so copy_s / prefill_s / decode_s split its time")
    parser.add_argument("--decode-attention", default=None, choices=("full", "blocked", "pallas_gpu"),
                        help="the model's decode attention (default: the platform's, `grpo_jax.platform`)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and task (smoke test)")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("episodes", "group", "prefill_chunk", "prefill_rows", "short", "long", "repeats"))
    return args


def main():
    args = parse_args()
    choices = platform_lib.choices()
    quick = args.quick
    episodes = args.episodes or (8 if quick else 64)
    group = args.group or (4 if quick else 8)
    if episodes % group:
        raise SystemExit(f"--episodes {episodes} is not a multiple of --group {group}")
    short = args.short or (4 if quick else 16)
    long = args.long or 8 * short
    cfg = MODEL.replace(**choices.model_fields())
    if args.decode_attention:
        cfg = cfg.replace(decode_attention=args.decode_attention)
    if quick:
        cfg = cfg.replace(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, n_layers=2, vocab_size=512)
    task = make_task(episodes, group, (12, 16) if quick else (48, 64), short, long, 4 if quick else 12,
                     (0.003, 0.007) if quick else (0.03, 0.07), cfg.vocab_size, seed=args.seed)
    max_length = -(-(task.max_history() + 1) // 32) * 32  # room for the longest episode, in 32s
    if max_length > cfg.max_position_embeddings:
        raise SystemExit(f"the longest episode needs {max_length} positions, over the model's "
                         f"{cfg.max_position_embeddings}")
    model = create_model(cfg, seed=0)
    key = jax.random.key(args.seed)
    runners, engines, call_seconds = {}, {}, {}

    # Defaults: the best of the sweep on 2 CPU cores (slots 16/32/64 x decode steps 4/8/16).
    slot_counts, step_counts = args.slots or [8 if quick else 32], args.decode_steps or [8 if quick else 16]
    for slots, steps in itertools.product(slot_counts, step_counts):
        sizes = {k: v for k, v in (("prefill_chunk", args.prefill_chunk or (16 if quick else None)),
                                   ("prefill_rows", args.prefill_rows)) if v}  # else the engine's defaults
        engine = Engine(model, EngineConfig(slots=slots, max_length=max_length, decode_steps=steps,
                                            decode_chunk=choices.decode_chunk, **sizes))
        warm_engine(engine, task)
        name = f"engine s{slots} k{steps}"
        engines[name] = engine
        call_seconds[name] = collections.Counter()
        time_engine_calls(engine, call_seconds[name], sync=args.profile)
        runners[name] = lambda engine=engine: run_engine(engine, task, key)
    if not args.no_lockstep:
        sampler_model = sampling.sampling_model(model)  # made once, as the rollout's lockstep sampler does
        base = sampling.SamplingConfig(temperature=1.0, prompt_bucket=16 if quick else 32, batch_bucket=8,
                                       decode_chunk=choices.decode_chunk)
        runners["lockstep"] = lambda: run_lockstep(sampler_model, task, key, base)
        runners["lockstep"]()  # the identical run compiles every turn's programs (their shapes)
    torch = None
    if not args.no_peer:
        import torch
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            save_hf(model, tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        run_transformers(hf, torch, task, seed=args.seed, max_new=2)  # first-call costs (nothing compiles)
        runners["transformers"] = lambda: run_transformers(hf, torch, task, seed=args.seed)

    wall = {name: [] for name in runners}
    outputs, stats = {}, {}
    for _ in range(args.repeats):
        for name, run in runners.items():  # round-robin: a drift of the machine's speed hits all alike
            before = dict(engines[name].stats) if name in engines else None
            if name in engines:
                call_seconds[name].clear()  # the profile of the last timed run
            t0 = time.perf_counter()
            outputs[name] = run()
            wall[name].append(time.perf_counter() - t0)
            if before is not None:
                stats[name] = {k: v - before.get(k, 0) for k, v in engines[name].stats.items()}

    kept_tokens = int(task.targets.sum())
    for name, kept in outputs.items():  # every runner kept exactly the targets
        assert [list(map(len, e)) for e in kept] == task.targets.tolist(), name
    common = {"benchmark": "rollout", "episodes": episodes, "group": group, "turns": TURNS,
              "targets": f"{short}/{long} (an eighth {long})", "kept_tokens": kept_tokens,
              "tool_latency_ms": [round(1e3 * task.latency.min()), round(1e3 * task.latency.max())],
              "reply_tokens": len(task.replies[0]), "max_length": max_length, "repeats": args.repeats,
              "model": (f"{cfg.model_type} d{cfg.d_model} L{cfg.n_layers} H{cfg.n_heads}/{cfg.n_kv_heads} "
                        f"Dh{cfg.head_dim} F{cfg.d_ff} V{cfg.vocab_size} {cfg.dtype}")}
    env = environment_info()
    median = {name: statistics.median(times) for name, times in wall.items()}
    eps = {name: episodes / t for name, t in median.items()}
    for name in runners:
        line = {**common, "runner": name.split()[0], "wall_s": round(median[name], 4),
                "wall_s_all": [round(t, 4) for t in wall[name]], "episodes_per_s": round(eps[name], 3),
                "tokens_per_s": round(kept_tokens / median[name], 1)}
        if name in engines:
            e, s = engines[name].config, stats[name]
            same = (sum(outputs[name][i] == outputs["lockstep"][i] for i in range(episodes))
                    if "lockstep" in outputs else None)
            line.update({
                "slots": e.slots, "decode_steps": e.decode_steps, "prefill_chunk": e.prefill_chunk,
                "prefill_rows": e.prefill_rows,
                "decode_chunk": e.decode_chunk, "decode_attention": cfg.decode_attention,
                "slot_utilisation": round(s.get("sampled_tokens", 0) / max(s.get("slot_steps", 0), 1), 3),
                "decode_calls": s.get("decode_calls", 0), "decode_steps_run": s.get("decode_steps", 0),
                "slot_steps": s.get("slot_steps", 0), "prefill_calls": s.get("prefill_calls", 0),
                "prefill_tokens": s.get("prefill_tokens", 0), "prefill_positions": s.get("prefill_positions", 0),
                "copies": s.get("copies", 0),
                "evictions": s.get("evictions", 0), "sampled_tokens": s.get("sampled_tokens", 0),
                "device_s": round(s.get("busy_s", 0.0), 3),
                "device_fraction": round(s.get("busy_s", 0.0) / wall[name][-1], 3),
                # Wall seconds in each kind of device call (host preparation included), and the
                # rest: the scheduler, the event loop and waits with every episode at its tool.
                **{k: round(call_seconds[name][k], 3) for k in ("copy_s", "prefill_s", "decode_s")},
                "between_calls_s": round(wall[name][-1] - sum(call_seconds[name].values()), 3),
                "profile_synced": args.profile,
                # The engine draws what the lockstep sampler draws (same keys): the episodes whose
                # every token agrees (float differences between the programs may flip a draw).
                "episodes_same_as_lockstep": same,
                "speedup_vs_lockstep": round(eps[name] / eps["lockstep"], 3) if "lockstep" in eps else None,
                "speedup_vs_transformers": (round(eps[name] / eps["transformers"], 3)
                                            if "transformers" in eps else None),
            })
        elif name == "transformers":
            line["torch_threads"] = torch.get_num_threads()
        print(json.dumps({**line, **env}), flush=True)


if __name__ == "__main__":
    main()
