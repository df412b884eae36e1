"""The experiment config schema (every field commented), and its validation.

Configs in `configs/` start from `default_config()`, change what they need and return it locked
(`config.lock()`), so a mistyped `--config.grpo.bta=0.1` fails instead of adding a field.
`validate(config)` runs before anything is built or compiled and names the offending field.
"""

from __future__ import annotations

import os

import ml_collections

from grpo_jax import grpo
from grpo_jax import platform as platform_lib
from grpo_jax.advantages import ADVANTAGE_SCALES

ENV_NAMES = ("calculator", "arithmetic", "countdown", "gsm8k")


class ConfigError(ValueError):
    """An inconsistent or malformed experiment config; the message names the field."""


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0                         # root of all randomness: per-step keys are fold_in(key, step)
    c.platform = "auto"                # cpu | gpu | tpu | auto (the run's devices): the platform
    #                                    choices of `grpo_jax.platform` (gradient forms, chunk sizes)
    c.allow_config_change = False      # resume a workdir whose config.json differs in what was built

    c.model = ml_collections.ConfigDict()
    c.model.hf_path = ""               # HF checkpoint directory; "" = build from the fields below
    c.model.dtype = "float32"          # compute dtype: float32 | bfloat16 (accelerators)
    c.model.param_dtype = "float32"    # storage/master dtype of the trained weights: float32 keeps
    #                                    master weights under bfloat16 compute; "bfloat16" turns
    #                                    masters off (half the weight memory; updates below
    #                                    bfloat16's resolution are lost)
    c.model.remat = "dots"             # what a layer keeps for the backward: none | dots | full
    c.model.model_type = "qwen2"       # from-scratch architecture: llama | qwen2 | qwen3
    c.model.vocab_size = 0             # 0 = the tokenizer's vocabulary size
    c.model.d_model = 128              # hidden size
    c.model.n_layers = 4               # decoder layers
    c.model.n_heads = 4                # attention heads
    c.model.n_kv_heads = 2             # key/value heads (grouped-query attention)
    c.model.head_dim = 32              # per-head dimension
    c.model.d_ff = 384                 # MLP hidden size
    c.model.max_position_embeddings = 256  # context length of a from-scratch model
    c.model.tie_embeddings = True      # share the input embedding and the output head

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""              # HF tokenizer dir; "" = model.hf_path, or train one (below)
    c.tokenizer.train_vocab_size = 320  # vocabulary of the sentencepiece model trained for tiny tasks
    c.tokenizer.corpus_rows = 2000     # training rows whose demonstrations form its corpus

    c.env = ml_collections.ConfigDict()
    c.env.name = "calculator"          # calculator | arithmetic | countdown | gsm8k
    c.env.kwargs = ml_collections.ConfigDict()  # keyword arguments of the env class
    c.env.rubric_weights = ml_collections.ConfigDict()  # reward function -> weight overrides (0 = metric only)
    c.env.num_train = 4000             # training problems (procedural tasks generate them)
    c.env.data_seed = 0                # seed of the procedural datasets (train/test disjoint)

    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 0                    # warm-start steps on the env's gold demonstrations (0 = none)
    c.sft.batch_size = 32              # demonstrations per step
    c.sft.learning_rate = 3e-3         # AdamW peak learning rate (cosine decay, warm-up below)
    c.sft.warmup_steps = 20            # linear warm-up steps
    c.sft.num_demos = 2000             # demonstrations built from training rows
    c.sft.mixed_steps = 0              # then steps on demos of which direct_answer_fraction skip the tool
    c.sft.mixed_learning_rate = 1e-3   # peak learning rate of those steps
    c.sft.direct_answer_fraction = 0.0  # tool envs: share of mixed demos that skip the tool (env.no_tool_completion)
    c.sft.mixed_trained_tokens = 0     # > 0: mixed demos train only their first N completion tokens (the choice)
    c.sft.log_every = 50               # progress line every N steps

    c.sampling = ml_collections.ConfigDict()
    c.sampling.temperature = 1.0       # rollout temperature (the train step scores at the same one)
    c.sampling.top_k = 0               # 0 = off
    c.sampling.top_p = 1.0             # 1 = off
    c.sampling.min_p = 0.0             # 0 = off
    c.sampling.max_new_tokens = 32     # tokens per assistant turn
    c.sampling.prompt_bucket = 32      # prompt lengths rounded up to a multiple (fewer compiles)
    c.sampling.batch_bucket = 8        # prompt counts rounded up to a multiple (fewer compiles)
    # ... and then to batch_bucket x a power of two: a multi-turn rollout's later turns carry
    # however many episodes are still running, which would compile one sampler per multiple.
    c.sampling.geometric_batch_buckets = True
    # The sampler reads a compute-dtype copy of the weights gathered over fsdp once per rollout
    # (kept split over tp); False: the train layout (models whose gathered copy does not fit).
    c.sampling.gather_weights = True

    c.rollout = ml_collections.ConfigDict()
    c.rollout.group_size = 8           # completions per prompt (G)
    c.rollout.max_turns = 3            # assistant turns per episode
    c.rollout.max_seq_len = 192        # sequence budget of an episode (<= the model's context)
    c.rollout.mask_truncated = False   # no loss on truncated episodes (DAPO's overlong filtering)
    c.rollout.length_multiple = 32     # trajectory length rounded up to a multiple (fewer compiles)

    c.grpo = ml_collections.ConfigDict()
    c.grpo.loss_type = "grpo"          # grpo | bnpo | dr_grpo | dapo | gspo | cispo
    c.grpo.advantage_scale = "group"   # group | batch | none (Dr. GRPO)
    c.grpo.epsilon = 0.2               # clip range below: ratio >= 1 - epsilon
    c.grpo.epsilon_high = 0.0          # clip range above; 0 = epsilon (cispo needs it set)
    c.grpo.delta = 0.0                 # two-sided clip cap of the ratio (INTELLECT-2); 0 = off
    c.grpo.beta = 0.0                  # KL(pi || pi_ref) weight, k3 estimator; > 0 keeps a reference
    c.grpo.importance_sampling_level = "token"  # token | sequence (GSPO)
    c.grpo.num_iterations = 1          # mu: updates per batch of rollouts
    c.grpo.micro_batch_size = 0        # rows per gradient-accumulation step; 0 = the whole batch
    c.grpo.chunk_size = 0              # vocabulary chunk of the log-prob computation; 0 = by
    #                                    platform (`grpo_jax.platform`: 1024 on CPU, 8192 elsewhere)
    c.grpo.tis_cap = 0.0               # truncated importance sampling cap; 0 = off

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4       # peak learning rate
    c.optim.schedule = "constant"      # constant | linear | cosine
    c.optim.warmup_steps = 0           # linear warm-up updates
    c.optim.weight_decay = 0.0         # AdamW decoupled weight decay
    c.optim.b2 = 0.99                  # Adam second-moment decay
    c.optim.max_grad_norm = 1.0        # global-norm gradient clipping; 0 = off

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 50             # GRPO steps (one batch of rollouts and its updates each)
    c.train.prompts_per_step = 8       # prompts per step; the batch is prompts * group_size rows
    c.train.log_every = 1              # progress line every N steps (metrics.jsonl gets every step)
    c.train.eval_every = 25            # evaluate every N steps (and before the first, after the last)

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 100          # held-out problems
    c.eval.correct_fn = "correct_answer"  # rubric function that decides correctness
    c.eval.greedy = True               # greedy accuracy
    c.eval.k = 0                       # samples per problem for pass@k / mean@k (0 = off)
    c.eval.temperature = 1.0           # temperature of those samples
    c.eval.num_samples_logged = 3      # conversations written to samples.txt per evaluation

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1                    # pure data parallelism
    c.mesh.fsdp = -1                   # fully sharded data parallelism (-1 = remaining devices)
    c.mesh.tp = 1                      # tensor parallelism

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 25            # save every N steps (and on SIGTERM and at the end)
    c.checkpoint.keep = 3              # checkpoints kept
    c.checkpoint.async_save = True     # write in the background
    return c


def _fail(field: str, message: str):
    raise ConfigError(f"config.{field}: {message}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the field for anything that would fail later."""
    c = config
    if c.env.name not in ENV_NAMES:
        _fail("env.name", f"{c.env.name!r} is not one of {ENV_NAMES}")
    if c.grpo.loss_type not in grpo.LOSS_TYPES:
        _fail("grpo.loss_type", f"{c.grpo.loss_type!r} is not one of {grpo.LOSS_TYPES}")
    if c.grpo.advantage_scale not in ADVANTAGE_SCALES:
        _fail("grpo.advantage_scale", f"{c.grpo.advantage_scale!r} is not one of {ADVANTAGE_SCALES}")
    if c.grpo.importance_sampling_level not in grpo.IMPORTANCE_SAMPLING_LEVELS:
        _fail("grpo.importance_sampling_level",
              f"{c.grpo.importance_sampling_level!r} is not one of {grpo.IMPORTANCE_SAMPLING_LEVELS}")
    if c.grpo.loss_type == "cispo" and not c.grpo.epsilon_high > 0:
        _fail("grpo.epsilon_high", "cispo needs epsilon_high > 0 (its truncation level)")
    if c.grpo.beta < 0:
        _fail("grpo.beta", f"must be >= 0, got {c.grpo.beta}")
    if c.rollout.group_size < 2:
        _fail("rollout.group_size", f"GRPO needs at least 2 completions per prompt, got {c.rollout.group_size}")
    batch = c.train.prompts_per_step * c.rollout.group_size
    if c.train.prompts_per_step < 1:
        _fail("train.prompts_per_step", f"must be >= 1, got {c.train.prompts_per_step}")
    if c.grpo.micro_batch_size and batch % c.grpo.micro_batch_size:
        _fail("grpo.micro_batch_size", f"{c.grpo.micro_batch_size} does not divide the batch of "
              f"{batch} rows (train.prompts_per_step * rollout.group_size)")
    if c.sampling.max_new_tokens >= c.rollout.max_seq_len:
        _fail("rollout.max_seq_len", f"{c.rollout.max_seq_len} leaves no room for a prompt with "
              f"sampling.max_new_tokens={c.sampling.max_new_tokens}")
    for field in ("model.hf_path", "tokenizer.path"):
        group, name = field.split(".")
        path = c[group][name]
        if path and not os.path.isdir(path):
            _fail(field, f"{path!r} is not a directory (a local HF checkpoint or tokenizer directory; "
                  "nothing is downloaded)")
    if not c.model.hf_path and c.rollout.max_seq_len > c.model.max_position_embeddings:
        _fail("rollout.max_seq_len", f"{c.rollout.max_seq_len} (prompt + completion budget) is over the "
              f"model's context of {c.model.max_position_embeddings} (model.max_position_embeddings)")
    if c.sampling.temperature <= 0:
        _fail("sampling.temperature", "GRPO samples at a temperature > 0 (greedy rollouts give "
              "identical groups)")
    for name in ("num_steps", "eval_every", "log_every"):
        if c.train[name] < 0 or (name != "num_steps" and c.train[name] == 0):
            _fail(f"train.{name}", f"must be positive, got {c.train[name]}")
    if c.checkpoint.every < 1 or c.checkpoint.keep < 1:
        _fail("checkpoint.every", "checkpoint.every and checkpoint.keep must be >= 1")
    if not 0 <= c.sft.direct_answer_fraction <= 1:
        _fail("sft.direct_answer_fraction", f"must be in [0, 1], got {c.sft.direct_answer_fraction}")
    if c.sft.mixed_trained_tokens < 0:
        _fail("sft.mixed_trained_tokens", f"must be >= 0 (0 = all tokens), got {c.sft.mixed_trained_tokens}")
    if (c.sft.steps or c.sft.mixed_steps) and c.sft.num_demos < c.sft.batch_size:
        _fail("sft.num_demos", f"{c.sft.num_demos} demonstrations cannot fill a batch of {c.sft.batch_size}")
    if c.eval.num_examples < 1:
        _fail("eval.num_examples", f"must be >= 1, got {c.eval.num_examples}")
    if c.platform != "auto" and c.platform not in platform_lib._ALIASES:
        _fail("platform", f"{c.platform!r}: use auto, {', '.join(platform_lib.PLATFORMS)}")
    for name in ("dtype", "param_dtype"):
        if c.model[name] not in ("float32", "bfloat16"):
            _fail(f"model.{name}", f"{c.model[name]!r}: use float32 or bfloat16")
    if c.env.name == "gsm8k" and not c.env.kwargs.get("data_dir"):
        _fail("env.kwargs.data_dir", "gsm8k needs the directory of its prepared TFDS dataset")
