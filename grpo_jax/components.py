"""Builds the pieces of an experiment from its config: env, tokenizer, model, the step configs.

Kept apart from the training loop so that notebooks, `experiments/eval.py` and the tests can
build exactly what `trainer.run` builds.
"""

from __future__ import annotations

import logging
import os
import numpy as np

from grpo_jax import platform as platform_lib
from grpo_jax import tokenizer as tokenizer_lib
from grpo_jax.evaluation import EvalConfig
from grpo_jax.rollout import RolloutConfig
from grpo_jax.sampling import SamplingConfig
from grpo_jax.train_step import TrainConfig

log = logging.getLogger(__name__)

# Markup of the tasks' protocols, kept whole by a trained sentencepiece model.
TASK_SYMBOLS = ("<calc>", "</calc>", "<answer>", "</answer>", "<think>", "</think>")


def build_env(env_config):
    env = _make_env(env_config)
    weights = dict(env_config.get("rubric_weights") or {})
    if weights:  # e.g. a rubric ablation: {"strict_format": 0.0, "tool_used": 0.0}
        env.rubric = env.rubric.reweighted(weights)
    return env


def _make_env(env_config):
    kwargs = env_config.kwargs.to_dict() if hasattr(env_config.kwargs, "to_dict") else dict(env_config.kwargs)
    name = env_config.name
    if name == "calculator":
        from grpo_jax.envs.calculator import CalculatorEnv
        return CalculatorEnv(**kwargs)
    if name == "arithmetic":
        from grpo_jax.envs.arithmetic import ArithmeticEnv
        return ArithmeticEnv(**kwargs)
    if name == "countdown":
        from grpo_jax.envs.countdown import CountdownEnv
        return CountdownEnv(**kwargs)
    if name == "gsm8k":
        from grpo_jax.envs.gsm8k import GSM8KEnv
        return GSM8KEnv(**kwargs)
    raise ValueError(f"unknown env {name!r}")


def demonstrations(env, rows, *, direct_answer_fraction: float = 0.0, seed: int = 0):
    """(prompt, completion) pairs for the warm start: the env's gold demonstration, or, for a
    `direct_answer_fraction` share of the rows, an answer without the tool: the env's
    `no_tool_completion(row)` when it has one (the calculator task restates the expression),
    else the gold final answer alone."""
    rng = np.random.default_rng(seed)
    demos = []
    for row in rows:
        prompt, _ = env.initial_state(row)
        if direct_answer_fraction and rng.random() < direct_answer_fraction:
            if hasattr(env, "no_tool_completion"):
                completion = env.no_tool_completion(row)
            else:
                completion = [{"role": "assistant", "content": env.parser.format(answer=row["answer"])}]
        else:
            completion = env.gold_completion(row)
        demos.append((prompt, completion))
    return demos


def build_tokenizer(config, env, workdir: str):
    """The HF tokenizer of `tokenizer.path` (or of the model), else a sentencepiece model trained
    on the task's demonstrations and kept in `workdir/tokenizer` (reused on resume)."""
    path = config.tokenizer.path or config.model.hf_path
    if path:
        hf_files = ("tokenizer.json", "tokenizer_config.json")
        sp_model = os.path.join(path, "tokenizer.model")
        if os.path.exists(sp_model) and not any(os.path.exists(os.path.join(path, f)) for f in hf_files):
            # A sentencepiece model with its chat template (what a tiny task's export writes).
            return tokenizer_lib.from_sentencepiece(sp_model)
        return tokenizer_lib.from_pretrained(path)
    directory = os.path.join(workdir, "tokenizer")
    model_file = os.path.join(directory, "tokenizer.model")
    if os.path.exists(model_file):
        return tokenizer_lib.from_sentencepiece(model_file)
    rows = env.dataset("train", n=config.tokenizer.corpus_rows, seed=config.env.data_seed)
    corpus = []
    for prompt, completion in demonstrations(env, rows):
        corpus.extend(m["content"] for m in prompt + completion)
        corpus.append(env.parser.format(answer=rows[0]["answer"]))
    log.info("training a %d-piece sentencepiece model on %d texts", config.tokenizer.train_vocab_size, len(corpus))
    return tokenizer_lib.train_sentencepiece(corpus, directory, vocab_size=config.tokenizer.train_vocab_size,
                                             extra_symbols=TASK_SYMBOLS)


def platform_choices(config) -> platform_lib.PlatformChoices:
    """The run's platform settings: `config.platform`, or the platform of its devices."""
    return platform_lib.choices(config.get("platform", "auto"))


def model_config(config, tokenizer):
    from grpo_jax.models import ModelConfig

    m = config.model
    return ModelConfig(
        model_type=m.model_type, vocab_size=m.vocab_size or tokenizer.vocab_size, d_model=m.d_model,
        n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, d_ff=m.d_ff,
        max_position_embeddings=m.max_position_embeddings, qkv_bias=m.model_type == "qwen2",
        qk_norm=m.model_type == "qwen3", tie_embeddings=m.tie_embeddings, dtype=m.dtype,
        param_dtype=m.param_dtype, remat=m.remat, cpu_weight_grad=platform_choices(config).cpu_weight_grad,
        eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id,
        pad_token_id=tokenizer.pad_id)


def build_model(config, tokenizer, mesh=None):
    from grpo_jax.models import create_model, load_hf

    if config.model.hf_path:
        model = load_hf(config.model.hf_path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                        mesh=mesh, remat=config.model.remat,
                        cpu_weight_grad=platform_choices(config).cpu_weight_grad)
    else:
        model = create_model(model_config(config, tokenizer), seed=config.seed, mesh=mesh)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{model.config.vocab_size} embeddings")
    return model


def _positive_or_none(x):
    return x if x else None


def sampling_config(config, tokenizer, model) -> SamplingConfig:
    s = config.sampling
    return SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                          top_p=s.top_p, min_p=s.min_p, stop_token_ids=tuple(tokenizer.stop_ids),
                          pad_id=tokenizer.pad_id, max_length=model.config.max_position_embeddings,
                          prompt_bucket=s.prompt_bucket, batch_bucket=s.batch_bucket,
                          geometric_batch_buckets=s.geometric_batch_buckets,
                          decode_chunk=platform_choices(config).decode_chunk,
                          gather_weights=s.gather_weights)


def rollout_config(config, tokenizer) -> RolloutConfig:
    r = config.rollout
    return RolloutConfig(group_size=r.group_size, max_turns=r.max_turns,
                         max_new_tokens=config.sampling.max_new_tokens, max_seq_len=r.max_seq_len,
                         mask_truncated=r.mask_truncated, pad_id=tokenizer.pad_id,
                         length_multiple=r.length_multiple)


def train_config(config) -> TrainConfig:
    g = config.grpo
    tis = _positive_or_none(g.tis_cap)
    # The rollout appends at most max_new_tokens model tokens per turn: the most loss tokens a row
    # can hold (dr_grpo's constant and the output head's bound).
    completion_budget = config.sampling.max_new_tokens * config.rollout.max_turns
    return TrainConfig(loss_type=g.loss_type, epsilon=g.epsilon, epsilon_high=_positive_or_none(g.epsilon_high),
                       delta=_positive_or_none(g.delta), beta=g.beta,
                       max_completion_length=completion_budget, max_loss_tokens=completion_budget,
                       importance_sampling_level=g.importance_sampling_level,
                       temperature=config.sampling.temperature, num_iterations=g.num_iterations,
                       micro_batch_size=_positive_or_none(g.micro_batch_size),
                       chunk_size=g.chunk_size or platform_choices(config).logprob_chunk,
                       # With TIS the old log-probs are the trainer's own and the sampler's
                       # reweight them; without, the sampler's log-probs are the old policy.
                       use_sampler_logps_as_old=tis is None, tis_cap=tis)


def eval_config(config) -> EvalConfig:
    e = config.eval
    return EvalConfig(correct_fn=e.correct_fn, greedy=e.greedy, k=e.k, temperature=e.temperature,
                      num_samples_logged=e.num_samples_logged)


def optimizer(config, total_updates: int):
    import optax

    from grpo_jax.optim import make_optimizer

    o = config.optim
    inner = make_optimizer(o.learning_rate, schedule=o.schedule, warmup_steps=o.warmup_steps,
                           total_steps=max(total_updates, o.warmup_steps + 1), weight_decay=o.weight_decay,
                           b2=o.b2, max_grad_norm=_positive_or_none(o.max_grad_norm))
    # A non-finite gradient skips the update (the trainer then stops with a clear message).
    return optax.apply_if_finite(inner, max_consecutive_errors=1 << 30)

