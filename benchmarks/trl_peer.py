"""Peer measurement for the GRPO step benchmark: one optimizer step of TRL's GRPOTrainer on CPU.

    python benchmarks/trl_peer.py [--steps 2] [--warmup 1] [--quick]

``measure_trl_grpo_step(checkpoint_dir, ...)`` runs TRL's ``GRPOTrainer`` (PyTorch, CPU, float32,
generation by transformers' ``generate``) on an HF checkpoint directory and returns the wall time
of each optimizer step. The standalone run builds the benchmark's random Qwen2-style model (hidden
512, 8 layers, 8 heads / 2 KV heads, head_dim 64, intermediate 1408, vocab 8192) and prints one
JSON line per beta (0.04 with a reference model, 0 without). On 2 shared CPU cores a step took
1.8-3.4 minutes (about 60% sampling), so the default run (1 + 2 steps per beta) takes ~16 minutes;
``--quick`` (2 layers, vocab 1024, 16 new tokens) takes about one.

What one TRL step contains (transformers ``Trainer`` inner loop, TRL ``GRPOTrainer``): the
callback event ``on_step_begin`` fires before ``training_step``, whose ``_prepare_inputs`` calls
``_generate_and_score_completions`` (tokenise, ``generate``, decode, reference log-probs when
beta != 0, rewards, group advantages); then the policy forward + backward, gradient clipping, the
AdamW step, and ``on_step_end``. So [on_step_begin, on_step_end] holds the whole GRPO step:
sampling, reference, reward and update. Fetching the 32 prompt strings from the data loader happens
just before ``on_step_begin`` and is left out (microseconds).

Shapes match one step of ours: ``num_prompts`` prompts of ``prompt_len`` tokens, ``group_size``
completions each, all exactly ``completion_len`` tokens (``min_new_tokens`` keeps EOS out), one
``generate`` call of all num_prompts * group_size rows and one optimizer step per generation
(``num_iterations = 1``; with ``micro_batch_size``, ``per_device_train_batch_size`` is the
micro-batch and ``gradient_accumulation_steps = steps_per_generation`` the number of micro-batches;
TRL skips the separate old-policy forward and uses the detached current log-probs). Gradient
checkpointing (on by default in TRL) is turned off and float32 is used, as on our side. TRL repeats
each prompt ``group_size`` times in the ``generate`` batch (32 rows prefilled, no shared prefix),
with transformers' default attention (sdpa) and dynamic KV cache.

Prompts are given to TRL as text: a word-level tokenizer maps the word ``t<i>`` to token id ``i``,
so a prompt of 64 words is exactly 64 tokens and any token-id prompt can be passed through.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
from transformers import TrainerCallback

FIRST_PROMPT_TOKEN = 10  # prompt ids are drawn from [10, vocab), clear of the special tokens


def word_tokenizer(vocab_size: int, eos_token_id: int, pad_token_id: int | None):
    """A ``PreTrainedTokenizerFast`` where the word ``t<i>`` is token ``i`` (no BOS, no merges).

    The EOS (and pad, when distinct) ids get the names ``<eos>`` / ``<pad>``; when the checkpoint has
    no pad token, TRL uses EOS for padding.
    """
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [f"t{i}" for i in range(vocab_size)]
    names[eos_token_id] = "<eos>"
    if pad_token_id is not None and pad_token_id != eos_token_id:
        names[pad_token_id] = "<pad>"
    model = tokenizers.models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<eos>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    specials = {"eos_token": "<eos>"}
    if "<pad>" in names:
        specials["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def prompts_as_text(prompt_ids: list[list[int]]) -> list[str]:
    return [" ".join(f"t{i}" for i in ids) for ids in prompt_ids]


def checkpoint_special_ids(checkpoint_dir: str) -> tuple[int, int, int | None]:
    """(vocab_size, eos_token_id, pad_token_id) from the checkpoint's config.json."""
    with open(os.path.join(checkpoint_dir, "config.json")) as f:
        cfg = json.load(f)
    eos = cfg.get("eos_token_id")
    eos = (eos[0] if isinstance(eos, list) else eos)
    eos = 1 if eos is None else eos
    return cfg["vocab_size"], eos, cfg.get("pad_token_id")


def measure_trl_grpo_step(checkpoint_dir: str, *, num_prompts: int = 4, group_size: int = 8,
                          prompt_len: int = 64, completion_len: int = 128, beta: float = 0.04,
                          steps: int = 3, warmup: int = 1, prompt_ids: list[list[int]] | None = None,
                          loss_type: str = "grpo", torch_threads: int | None = None,
                          seed: int = 0, micro_batch_size: int | None = None) -> dict:
    """Median wall time of one TRL ``GRPOTrainer`` optimizer step on CPU, with its split.

    Runs ``warmup + steps`` optimizer steps; the first ``warmup`` are dropped. ``prompt_ids``
    (``num_prompts * (warmup + steps)`` rows of ``prompt_len`` ids) default to uniform random ids
    in [10, vocab). Returns seconds: ``median_step_s``, ``step_s`` (per timed step) and the
    per-step medians of ``sampling_s`` (tokenise + generate + decode), ``reference_s`` (reference
    log-probs), ``reward_s`` and ``update_s`` (the rest: policy forward/backward, clipping,
    AdamW, advantages), plus ``optimizer_s`` (AdamW alone), what TRL logged (completion lengths,
    KL), the checked shapes and the library versions.
    """
    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(torch_threads or os.cpu_count() or 1)
    vocab, eos_id, pad_id = checkpoint_special_ids(checkpoint_dir)
    total_steps = warmup + steps
    if prompt_ids is None:
        rng = np.random.default_rng(seed)
        prompt_ids = rng.integers(FIRST_PROMPT_TOKEN, vocab,
                                  size=(num_prompts * total_steps, prompt_len)).tolist()
    if len(prompt_ids) < num_prompts * total_steps:
        raise ValueError(f"need {num_prompts * total_steps} prompts, got {len(prompt_ids)}")
    rows = num_prompts * group_size
    micro = micro_batch_size or rows
    if rows % micro:
        raise ValueError(f"micro_batch_size={micro} must divide the {rows} rows of a step")
    tokenizer = word_tokenizer(vocab, eos_id, pad_id)
    dataset = datasets.Dataset.from_dict({"prompt": prompts_as_text(prompt_ids)})

    seen = {"completion_lens": [], "prompt_lens": [], "rows": []}

    def reward_even_tokens(prompts, completions, completion_ids, **kwargs):
        """Fraction of even token ids: cheap, and varies within a group so advantages are not 0."""
        seen["completion_lens"].extend(len(c) for c in completion_ids)
        seen["rows"].append(len(completion_ids))
        return [sum(1 for t in c if t % 2 == 0) / max(len(c), 1) for c in completion_ids]

    with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL's own use of renamed arguments
        config = trl.GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            per_device_train_batch_size=micro, gradient_accumulation_steps=rows // micro,
            num_generations=group_size, num_iterations=1, max_completion_length=completion_len,
            generation_kwargs={"min_new_tokens": completion_len},  # exactly completion_len tokens
            temperature=1.0, top_p=1.0, top_k=0, beta=beta, loss_type=loss_type,
            learning_rate=1e-6, lr_scheduler_type="constant", max_steps=total_steps,
            shuffle_dataset=False, seed=seed, dataloader_num_workers=0,
            logging_strategy="steps", logging_steps=1, report_to="none", disable_tqdm=True,
            save_strategy="no", eval_strategy="no", log_completions=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
        timer = StepTimer()
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_even_tokens, args=config,
                                  train_dataset=dataset, processing_class=tokenizer,
                                  callbacks=[timer])
        trainer.remove_callback(transformers.PrinterCallback)  # logs go to `timer`, not stdout
        _time_phases(trainer, timer, seen)
        trainer.train()

    timed, n = slice(warmup, None), len(timer.step_s)
    phases = {"sampling_s": [], "reference_s": [], "reward_s": [], **timer.phases}
    per_step = {k: (v + [0.0] * (n - len(v)))[timed] for k, v in phases.items()}  # 0: phase absent
    step_s = timer.step_s[timed]
    per_step["update_s"] = [t - s - r - w for t, s, r, w in zip(
        step_s, per_step["sampling_s"], per_step["reference_s"], per_step["reward_s"])]
    logs = timer.logs[timed]
    kls = [log["kl"] for log in logs if "kl" in log]
    median = lambda xs: round(statistics.median(xs), 4) if xs else None  # noqa: E731
    return {
        "median_step_s": median(step_s),
        "step_s": [round(t, 4) for t in step_s],
        **{k: median(v) for k, v in sorted(per_step.items())},
        "trl_step_time_s": median([log["step_time"] for log in logs if "step_time" in log]),
        "completion_len_min": min(seen["completion_lens"]),
        "completion_len_max": max(seen["completion_lens"]),
        "prompt_len_min": min(seen["prompt_lens"]),
        "prompt_len_max": max(seen["prompt_lens"]),
        "completions_per_step": sorted(set(seen["rows"])),
        "reference_model": trainer.ref_model is not None,
        "kl_median": statistics.median(kls) if kls else None,
        "beta": beta, "loss_type": loss_type, "steps": steps, "warmup": warmup,
        "attn_implementation": model.config._attn_implementation,
        "optimizer": config.optim, "max_grad_norm": config.max_grad_norm,
        "torch_threads": torch.get_num_threads(),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "accelerate": accelerate.__version__,
                     "datasets": datasets.__version__},
    }


class StepTimer(TrainerCallback):
    """Per-step wall clock from the Trainer's callback events; phase times are added by wrappers."""

    def __init__(self):
        self.step_s, self.logs, self.phases = [], [], {}
        self._start = self._opt_start = None

    def add(self, phase: str, seconds: float):
        row = self.phases.setdefault(phase, [])
        while len(row) <= len(self.step_s):
            row.append(0.0)
        row[len(self.step_s)] += seconds

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._opt_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.add("optimizer_s", time.perf_counter() - self._opt_start)

    def on_step_end(self, args, state, control, **kwargs):
        self.step_s.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def _time_phases(trainer, timer, seen: dict) -> None:
    """Wrap the trainer's sampling, log-prob and reward methods to time them inside each step."""
    generate, logps, rewards = (trainer._generate, trainer._get_per_token_logps_and_entropies,
                                trainer._calculate_rewards)

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        timer.add("sampling_s", time.perf_counter() - start)
        seen["prompt_lens"].extend(len(ids) for ids in out[0])  # out[0]: prompt token ids per row
        return out

    def timed_logps(model, *args, **kwargs):
        start = time.perf_counter()
        out = logps(model, *args, **kwargs)
        if model is trainer.ref_model:
            timer.add("reference_s", time.perf_counter() - start)
        return out

    def timed_rewards(*args, **kwargs):
        start = time.perf_counter()
        out = rewards(*args, **kwargs)
        timer.add("reward_s", time.perf_counter() - start)
        return out

    trainer._generate = timed_generate
    trainer._get_per_token_logps_and_entropies = timed_logps
    trainer._calculate_rewards = timed_rewards


def build_random_checkpoint(path: str, *, quick: bool = False, seed: int = 0) -> str:
    """The benchmark's random Qwen2-style model (float32, untied head) saved with save_pretrained."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=1024 if quick else 8192, hidden_size=512, num_hidden_layers=2 if quick else 8,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=1408,
        max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=1, pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 layers, vocab 1024, 16 new tokens")
    args = parser.parse_args()
    completion_len = 16 if args.quick else 128
    with tempfile.TemporaryDirectory() as ckpt:
        build_random_checkpoint(ckpt, quick=args.quick)
        for beta in (0.04, 0.0):
            result = measure_trl_grpo_step(ckpt, beta=beta, steps=args.steps, warmup=args.warmup,
                                           completion_len=completion_len)
            print(json.dumps({"benchmark": "trl_grpo_step", "prompts": 4, "group_size": 8,
                              "prompt_len": 64, "completion_len": completion_len, **result}),
                  flush=True)


if __name__ == "__main__":
    main()
