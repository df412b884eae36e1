r"""A few steps of the GSM8K config on random Qwen2.5-0.5B-shaped weights, with no network.

    python benchmarks/gsm8k_random_steps.py --workdir DIR [--steps 3] [--tiny]

What `configs/gsm8k_qwen2_5_0_5b.py` runs (64 prompts x 8 samples of up to 512 tokens, GRPO
with beta 0.001, full remat, bfloat16 compute on float32 master weights, AdamW), except what
needs a download: the model is built from the 0.5B preset's shape with random weights
(`model.hf_path` empty), the tokenizer is the tests' tiny byte-level BPE with a ChatML template
(`tests/tokenizer_fixtures.py`: the model's 151936-row vocabulary is kept, so sampled ids
outside the tokenizer's decode to nothing), and GSM8K is 64 generated word problems in the
official JSONL format, prepared through TFDS like the real files. A random model never
answers, so every completion runs to 512 tokens: the rollout's longest case. Evaluation (before
and after) is cut to 8 problems. `--tiny`: the config's `runlocal` variant on a tiny model
(a smoke test on CPU).

Prints one JSON line (the trainer's progress goes to stderr): per train step its wall time (`step_time_s`, rollout included) and rollout
time, the run's total, and the last step's loss, KL and completion length.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tokenizer_fixtures

from grpo_jax.models import preset  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "gsm8k_qwen2_5_0_5b.py")
TINY_MODEL = dict(model_type="qwen2", vocab_size=0, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, tie_embeddings=True, max_position_embeddings=512)


def write_problems(manual_dir: str, train: int, test: int) -> None:
    """GSM8K-format JSONL: a question and a worked answer ending "#### N"."""
    os.makedirs(manual_dir, exist_ok=True)
    for split, count, offset in (("train", train, 0), ("test", test, 10_000)):
        with open(os.path.join(manual_dir, f"{split}.jsonl"), "w") as f:
            for i in range(offset, offset + count):
                a, b = 3 + i % 17, 5 + i % 11
                question = (f"Tom has {a} boxes with {b} apples in each box. He gives away {a} apples. "
                            "How many apples does he have left?")
                answer = f"{a}*{b}=<<{a}*{b}={a * b}>>{a * b} apples, minus {a} is {a * b - a}.\n#### {a * b - a}"
                f.write(json.dumps({"question": question, "answer": answer}) + "\n")


def load_config(arg: str):
    spec = importlib.util.spec_from_file_location("gsm8k_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def build_config(workdir: str, steps: int, tiny: bool):
    from tokenizer_fixtures import build_hf_tokenizer_dir

    tokenizer_dir = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        build_hf_tokenizer_dir(tokenizer_dir)
    manual = os.path.join(workdir, "manual")
    c0 = load_config("runlocal" if tiny else "")
    write_problems(manual, train=max(64, c0.train.prompts_per_step), test=8)
    config = load_config(f"data_dir={os.path.join(workdir, 'tfds')},manual_dir={manual}"
                         + (",runlocal" if tiny else ""))
    config.tokenizer.path = tokenizer_dir
    config.model.hf_path = ""  # built from the fields below, random weights
    if tiny:
        fields = TINY_MODEL
    else:
        shape = preset("qwen2.5-0.5b")
        fields = dict(model_type=shape.model_type, vocab_size=shape.vocab_size, d_model=shape.d_model,
                      n_layers=shape.n_layers, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
                      head_dim=shape.head_dim, d_ff=shape.d_ff, tie_embeddings=shape.tie_embeddings,
                      max_position_embeddings=config.rollout.max_seq_len)
    for key, value in fields.items():
        config.model[key] = value
    config.env.num_train = max(config.train.prompts_per_step, 4)
    config.train.num_steps = steps
    config.train.eval_every = steps
    config.checkpoint.every = steps
    config.eval.num_examples = min(config.eval.num_examples, 8)
    return config


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the runlocal variant on a tiny model (CPU)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    os.makedirs(args.workdir, exist_ok=True)
    from grpo_jax import trainer
    from grpo_jax.metrics import read_metrics

    import jax

    config = build_config(args.workdir, args.steps, args.tiny)
    run_dir = os.path.join(args.workdir, "run")
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's progress lines: stdout is the JSON
        summary = trainer.run(config, run_dir)
    total = time.perf_counter() - start
    train_rows = [r for r in read_metrics(run_dir) if "loss" in r]
    last = train_rows[-1]
    print(json.dumps({
        "benchmark": "gsm8k_random_steps", "tiny": args.tiny, "steps": summary["last_step"],
        "rows_per_step": config.train.prompts_per_step * config.rollout.group_size,
        "max_new_tokens": config.sampling.max_new_tokens,
        "model": f"d{config.model.d_model} L{config.model.n_layers} V{config.model.vocab_size or 'tokenizer'} "
                 f"{config.model.dtype} (weights {config.model.param_dtype}), remat {config.model.remat}",
        "step_time_s": [round(r["step_time"], 3) for r in train_rows],
        "rollout_time_s": [round(r["time/rollout_s"], 3) for r in train_rows],
        "total_s": round(total, 1),
        "loss": last["loss"], "kl": last.get("kl"), "completion_length": last.get("completion_length"),
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
    }), flush=True)


if __name__ == "__main__":
    main()
