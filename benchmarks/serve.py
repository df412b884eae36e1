"""The OpenAI-compatible server's overhead: concurrent `openai` clients vs direct engine calls, same work.

    python benchmarks/serve.py [--clients 64 --turns 3 --max-tokens 32 --slots 64] [--repeats 3] [--quick]

One engine on a random model (`sampler.MODEL`, its vocabulary the tokenizer's: a byte-level BPE
trained here like the tests' `build_hf_tokenizer_dir`), served by `grpo_jax.serve.serve` in its
background thread. `--clients` episodes run concurrently, each `--turns` chat turns: a user
question, the assistant's reply (`--max-tokens`, temperature 1, a seed per request), a fixed tool
result (a user message), the next reply, ...

- server: one `openai.AsyncOpenAI` per episode (its `X-Episode-Id` header), all on one event
  loop with `asyncio.gather`; the server renders, tokenizes, generates (continuing the
  episode's kept cache when the new prompt extends it), detokenizes, answers JSON.
- direct: the same episodes on the same engine from this thread's event loop: each turn's
  messages rendered with `tokenizer.encode_chat`, `engine.open` / `engine.generate` with the
  rendered extension as the server does it (a kept session when the prompt extends its history,
  else a fresh one; the same seed per request, so both paths draw the same tokens), the reply
  detokenized for the next turn's messages.

A random model's reply, decoded and rendered again, rarely re-tokenizes to the ids it sampled,
so most turns do not extend the kept history and prefill it again, in both paths alike
(`kept_turns` counts those that continued).

Both paths run once untimed, then `--repeats` times alternately; each prints one JSON line with
its medians (episodes/s, completion tokens/s), the engine's work over its last run (prefill
tokens, kept turns, device seconds) and the CPU seconds of this thread / the server's thread /
the rest (XLA's and the engine's worker threads); a summary line gives
`server_overhead = 1 - server_eps / direct_eps` and whether both paths drew the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from common import check_positive, environment_info  # noqa: E402
from sampler import MODEL  # noqa: E402
from tokenizer_fixtures import build_hf_tokenizer_dir  # noqa: E402

from grpo_jax import platform as platform_lib  # noqa: E402
from grpo_jax.engine import GenerationParams  # noqa: E402
from grpo_jax.models import create_model  # noqa: E402
from grpo_jax.serve import build_engine, create_app, serve  # noqa: E402
from grpo_jax.tokenizer import from_pretrained  # noqa: E402

TOOL_REPLY = "<tool_response>\nThe result is 391.\n</tool_response>"
MODEL_NAME = "bench"


def question(e: int) -> str:
    return f"Use the calculator tool to compute {e} * 23, then add 30."


def seed_of(run: int, e: int, turn: int, turns: int) -> int:
    return (run * 100_003 + e * turns + turn) % (1 << 31)


def visible_text(tokenizer, tokens) -> str:
    """The reply's text as the server answers it: without a trailing stop token."""
    ids = tokens[:-1] if tokens and tokens[-1] in tokenizer.stop_ids else tokens
    return tokenizer.decode(ids)


def next_messages(messages: list[dict], reply: str, last: bool) -> list[dict]:
    tool = [] if last else [{"role": "user", "content": TOOL_REPLY}]
    return messages + [{"role": "assistant", "content": reply}] + tool


# -- the runners: each returns [episode] -> [(reply text, sampled tokens)] per turn ----------------
async def server_episodes(url: str, clients: int, turns: int, max_tokens: int, run: int, clock) -> tuple:
    import openai

    # Clients exist before the clock starts (a real agent holds its client); connections do not.
    apis = [openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600,
                               default_headers={"X-Episode-Id": f"run{run}-ep{e}"}) for e in range(clients)]

    async def episode(e: int):
        messages, out = [{"role": "user", "content": question(e)}], []
        for k in range(turns):
            r = await apis[e].chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                                      temperature=1.0, seed=seed_of(run, e, k, turns))
            reply = r.choices[0].message.content or ""
            out.append((reply, r.usage.completion_tokens))
            messages = next_messages(messages, reply, k == turns - 1)
        return out

    try:
        start = clock()
        result = await asyncio.gather(*(episode(e) for e in range(clients)))
        return result, [b - a for a, b in zip(start, clock())]
    finally:
        await asyncio.gather(*(api.close() for api in apis))


async def direct_episodes(engine, tokenizer, clients: int, turns: int, max_tokens: int, run: int, clock,
                          counts: collections.Counter) -> tuple:
    limit = engine.config.max_length

    async def episode(e: int):
        messages, out, session = [{"role": "user", "content": question(e)}], [], None
        try:
            for k in range(turns):
                prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)
                key = jax.random.key(seed_of(run, e, k, turns))
                params = GenerationParams(max_new_tokens=max(1, min(max_tokens, limit - len(prompt))), temperature=1.0)
                held = session.tokens if session is not None else None
                if held is not None and len(prompt) > len(held) and prompt[:len(held)] == held:
                    # What the server does with a kept session: the key reset to this request's
                    # seed (turn 0), so the turn draws what a fresh session would.
                    session.key_data, session.turn = np.asarray(jax.random.key_data(key), np.uint32), 0
                    new_ids = prompt[len(held):]
                    counts["kept_turns"] += 1
                else:  # a history the re-rendered prompt does not extend: prefilled again
                    if session is not None:
                        engine.release(session)
                    (session,) = engine.open(prompt, row_ids=[0], key=key)
                    new_ids = []
                done = await engine.generate(session, new_ids, params)
                reply = visible_text(tokenizer, done.tokens)
                out.append((reply, len(done.tokens)))
                messages = next_messages(messages, reply, k == turns - 1)
        finally:
            if session is not None:
                engine.release(session)
        return out

    start = clock()
    result = await asyncio.gather(*(episode(e) for e in range(clients)))
    return result, [b - a for a, b in zip(start, clock())]


def add_release_route(app):
    """`POST /bench/release`: frees the sessions the server keeps for finished episodes (a client
    never says its episode is over; their slots would wait `evict_idle_s` before the next run
    could take them), on the server's own loop, where the engine's state is touched."""
    service, engine = app.state.service, app.state.engine

    async def release():
        kept = service._kept
        while kept:
            engine.release(kept.popitem()[1])
        return {"released": True}

    app.add_api_route("/bench/release", release, methods=["POST"])


def post(url: str):
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def thread_cpu_s(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def clock_for(server_thread: threading.Thread):
    """(wall, this thread's CPU, the server thread's CPU, the process's CPU) seconds."""
    return lambda: (time.perf_counter(), time.thread_time(), thread_cpu_s(server_thread), time.process_time())


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=None, help="concurrent episodes (default 64; --quick 8)")
    parser.add_argument("--turns", type=int, default=None, help="chat turns per episode (default 3; --quick 2)")
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens per reply (default 32; --quick 8)")
    parser.add_argument("--slots", type=int, default=None, help="engine slots (default: --clients)")
    parser.add_argument("--max-length", type=int, default=None, help="engine max_length (default 512; --quick 256)")
    parser.add_argument("--decode-steps", type=int, default=None, help="engine decode steps per call (default 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, 8 clients, few tokens (a smoke test)")
    args = parser.parse_args(argv)
    check_positive(parser, args, ["clients", "turns", "max_tokens", "slots", "max_length", "decode_steps", "repeats"])
    return args


def main():
    args = parse_args()
    quick = args.quick
    clients = args.clients or (8 if quick else 64)
    turns = args.turns or (2 if quick else 3)
    max_tokens = args.max_tokens or (8 if quick else 32)
    slots = args.slots or clients
    max_length = args.max_length or (256 if quick else 512)
    choices = platform_lib.choices()

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = from_pretrained(build_hf_tokenizer_dir(tmp))
    # The model samples only ids the tokenizer can decode: its vocabulary is the tokenizer's.
    cfg = MODEL.replace(vocab_size=tokenizer.vocab_size, cpu_weight_grad=choices.cpu_weight_grad)
    if quick:
        cfg = cfg.replace(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, n_layers=2)
    if max_length > cfg.max_position_embeddings:
        raise SystemExit(f"--max-length {max_length} is over the model's {cfg.max_position_embeddings} positions")
    model = create_model(cfg, seed=0)
    sizes = dict(prefill_chunk=64, prefill_rows=4) if quick else {}  # fewer shapes to compile in the smoke test
    engine = build_engine(model, tokenizer, slots=slots, max_length=max_length, decode_chunk=choices.decode_chunk,
                          **({"decode_steps": args.decode_steps} if args.decode_steps else {}), **sizes)
    engine.warmup([GenerationParams(temperature=1.0)])

    app = create_app(engine, tokenizer, model_name=MODEL_NAME)
    add_release_route(app)
    with serve(app) as server:
        counts, clock = collections.Counter(), clock_for(server._thread)
        runners = {
            "server": lambda run: asyncio.run(server_episodes(server.url, clients, turns, max_tokens, run, clock)),
            "direct": lambda run: asyncio.run(direct_episodes(engine, tokenizer, clients, turns, max_tokens, run,
                                                              clock, counts)),
        }
        wall = {name: [] for name in runners}
        outputs, stats, cpu = {}, {}, {}
        for run in range(args.repeats + 1):  # run 0: the untimed warm-up of both paths
            for name, runner in runners.items():  # alternately: a drift of the machine's speed hits both
                counts.clear()
                before = dict(engine.stats)
                # Same seeds in both paths of a run (the draws compare); each run its own seeds.
                outputs[name], (seconds, main_s, serve_s, total_s) = runner(run)
                if name == "server":
                    post(server.url + "/bench/release")  # after the clock: the next run starts with free slots
                if run == 0:
                    continue
                wall[name].append(seconds)
                stats[name] = {k: v - before.get(k, 0) for k, v in engine.stats.items()}
                stats[name]["kept_turns"] = stats[name].get("server_kept_turns", 0) + counts["kept_turns"]
                cpu[name] = {"cpu_main_thread_s": round(main_s, 3), "cpu_server_thread_s": round(serve_s, 3),
                             "cpu_other_threads_s": round(total_s - main_s - serve_s, 3),
                             "cpu_process_s": round(total_s, 3)}

    tokens = {name: sum(n for episode in out for _, n in episode) for name, out in outputs.items()}
    same = sum(a == b for a, b in zip(outputs["server"], outputs["direct"]))
    median = {name: statistics.median(times) for name, times in wall.items()}
    eps = {name: clients / t for name, t in median.items()}
    common = {"benchmark": "serve", "clients": clients, "turns": turns, "max_tokens": max_tokens, "slots":
              engine.config.slots, "max_length": max_length, "decode_steps": engine.config.decode_steps,
              "repeats": args.repeats,
              "model": (f"{cfg.model_type} d{cfg.d_model} L{cfg.n_layers} H{cfg.n_heads}/{cfg.n_kv_heads} "
                        f"Dh{cfg.head_dim} F{cfg.d_ff} V{cfg.vocab_size} {cfg.dtype}")}
    env = environment_info()
    for name in runners:
        s = stats[name]
        print(json.dumps({
            **common, "runner": name, "wall_s": round(median[name], 4), "wall_s_all": [round(t, 4) for t in wall[name]],
            "episodes_per_s": round(eps[name], 3), "completion_tokens": tokens[name],
            "completion_tokens_per_s": round(tokens[name] / median[name], 1),
            # The engine's work over the last run: equal in both paths when the same turns are kept.
            "turns_run": clients * turns, "kept_turns": s["kept_turns"], "prefill_tokens": s.get("prefill_tokens", 0),
            "decode_calls": s.get("decode_calls", 0), "sampled_tokens": s.get("sampled_tokens", 0),
            "device_s": round(s.get("busy_s", 0.0), 3), **cpu[name], **env}), flush=True)
    print(json.dumps({
        **common, "runner": "summary", "server_episodes_per_s": round(eps["server"], 3),
        "direct_episodes_per_s": round(eps["direct"], 3),
        "server_overhead": round(1 - eps["server"] / eps["direct"], 4), "overhead_limit": 0.15,
        "completion_tokens_server": tokens["server"], "completion_tokens_direct": tokens["direct"],
        # Same prompts, seeds and row: the episodes whose every reply agrees between the paths.
        "episodes_same": same, **env}), flush=True)


if __name__ == "__main__":
    main()
