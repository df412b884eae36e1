"""The experiment config: its validation and the typed settings made from it (the schema, every
field commented, is `grpo_jax.config_schema.default_config`, re-exported here).

Configs in `configs/` start from `default_config()`, change what they need and return it locked
(`config.lock()`), so a mistyped `--config.grpo.bta=0.1` fails instead of adding a field. A field
that can be off is a typed placeholder whose off is None (`--config.grpo.tis_cap=0.5` still
parses); `parse_args("runlocal,steps=3", defaults)` reads the `:ARGS` of `--config FILE:ARGS`.

The library's typed settings are made here from their groups, field by field under the same
names (`train_config`: TrainConfig of `grpo`, `rollout_config`, `sampling_config`,
`eval_config`); their `__post_init__` checks are the checks of those fields. `validate(config)`
makes them (a failure becomes a `ConfigError` naming `group.field`) and adds the checks across
groups, once, before anything is built or compiled.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import ml_collections

from grpo_jax import config_schema
from grpo_jax import sharding as sharding_lib
from grpo_jax import utils
from grpo_jax.envs import datasets, registry
from grpo_jax import platform as platform_lib
from grpo_jax.advantages import ADVANTAGE_SCALES, BASELINES
from grpo_jax.engine import EngineConfig
from grpo_jax.evaluation import EvalConfig
from grpo_jax.rollout import RolloutConfig
from grpo_jax.sampling import SamplingConfig
from grpo_jax.train_step import TrainConfig



ConfigError = utils.ConfigError  # noqa: F811 - one class for every bad config (experiment or model)
default_config = config_schema.default_config  # re-export: configs start from it


def _fail(field: str, message: str):
    raise ConfigError(f"config.{field}: {message}")


# ---------------------------------------------------------------------------------------------
# The library's typed settings, made from their groups under the same field names.


def _settings(cls, sources: dict[str, tuple[str, Any]]):
    """`cls(**values)` from `sources` (field -> ("group.field", value)); a `ValueError` of its
    checks becomes a `ConfigError` naming the config field its message names first."""
    try:
        return cls(**{name: value for name, (_, value) in sources.items()})
    except ValueError as e:
        message = str(e)
        found = ((re.search(rf"\b{name}\b", message), where) for name, (where, _) in sources.items())
        named = sorted((m.start(), where) for m, where in found if m)
        _fail(named[0][1] if named else cls.__name__, message)


def _group(cls, config, group: str) -> dict[str, tuple[str, Any]]:
    """The fields of `cls` that `config[group]` has, as `_settings` sources."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: (f"{group}.{k}", v) for k, v in config[group].items() if k in names}


def platform_choices(config) -> platform_lib.PlatformChoices:
    """The run's platform settings: `config.platform`, or the platform of its devices."""
    return platform_lib.choices(config.get("platform", "auto"))


def model_platform_fields(config) -> dict[str, Any]:
    """The `ModelConfig` fields set by the platform (with `config.model`'s overrides) and by
    `config.lora`."""
    fields = platform_choices(config).model_fields()
    model = config.get("model") or {}
    fields = {k: model.get(k) or v for k, v in fields.items()}
    lora = config.get("lora") or {}
    if lora.get("rank"):
        if lora.get("dropout"):
            _fail("lora.dropout", f"{lora.get('dropout')}: must be 0 (a random adapter output makes the "
                  "policy's log-probs random: the ratio of on-policy tokens would not be 1)")
        fields.update(lora_rank=int(lora["rank"]), lora_alpha=float(lora.get("alpha", 16.0)),
                      lora_targets=tuple(t.strip() for t in str(lora.get("targets", "")).split(",") if t.strip()))
    return fields


def packed_micro_rows(config) -> int | None:
    """Rows per micro-batch of a packed run: grpo.micro_batch_tokens // rollout.max_seq_len (at
    least 1), or grpo.micro_batch_size; None: the whole batch."""
    g = config.grpo
    if g.get("micro_batch_tokens"):
        return max(g.micro_batch_tokens // config.rollout.max_seq_len, 1)
    return g.micro_batch_size


def train_config(config) -> TrainConfig:
    """The `TrainConfig` of `config.grpo`; chunk_size None: the platform's. Packed (grpo.pack):
    micro-batches of `packed_micro_rows` rows and no per-row loss-token bound (a row holds
    several episodes)."""
    g = config.grpo
    # The rollout appends at most max_new_tokens model tokens per turn: the most loss tokens an
    # episode can hold (dr_grpo's constant and, one episode per row, the output head's bound).
    budget = ("sampling.max_new_tokens", config.sampling.max_new_tokens * config.rollout.max_turns)
    packed = {}
    if g.get("pack", False):
        packed = {"max_loss_tokens": ("grpo.pack", None),
                  "micro_batch_size": ("grpo.micro_batch_tokens" if g.get("micro_batch_tokens")
                                       else "grpo.micro_batch_size", packed_micro_rows(config))}
    return _settings(TrainConfig, {
        **_group(TrainConfig, config, "grpo"),
        "max_completion_length": budget, "max_loss_tokens": budget, **packed,
        "temperature": ("sampling.temperature", config.sampling.temperature),
        "chunk_size": ("grpo.chunk_size", g.chunk_size or platform_choices(config).logprob_chunk),
        # With TIS the old log-probs are the trainer's own and the sampler's reweight them;
        # without, the sampler's log-probs are the old policy.
        "use_sampler_logps_as_old": ("grpo.tis_cap", g.tis_cap is None)})


def sampling_config(config, *, stop_token_ids=(), pad_id: int = 0, max_length: int | None = None) -> SamplingConfig:
    """The `SamplingConfig` of `config.sampling` (the tokenizer's stop and pad ids, the model's
    context as `max_length`)."""
    return _settings(SamplingConfig, {
        **_group(SamplingConfig, config, "sampling"), "stop_token_ids": ("tokenizer", tuple(stop_token_ids)),
        "pad_id": ("tokenizer", pad_id), "max_length": ("model.max_position_embeddings", max_length),
        "decode_chunk": ("platform", platform_choices(config).decode_chunk)})


def rollout_config(config, *, pad_id: int | None = None) -> RolloutConfig:
    """The `RolloutConfig` of `config.rollout` (max_new_tokens: the sampler's)."""
    return _settings(RolloutConfig, {
        **_group(RolloutConfig, config, "rollout"), "pad_id": ("tokenizer", pad_id),
        "max_new_tokens": ("sampling.max_new_tokens", config.sampling.max_new_tokens)})


def engine_config(config, *, stop_token_ids=(), pad_id: int = 0) -> EngineConfig | None:
    """The `EngineConfig` of `config.engine` (None with rollout.mode = "lockstep"): an episode
    holds up to rollout.max_seq_len positions; slots None: the episodes this process rolls out
    per step."""
    if config.rollout.mode != "engine":
        return None
    episodes = -(-config.train.prompts_per_step // jax.process_count()) * config.rollout.group_size
    e = config.engine
    return _settings(EngineConfig, {
        **_group(EngineConfig, config, "engine"), "slots": ("engine.slots", e.slots or episodes),
        "max_length": ("rollout.max_seq_len", config.rollout.max_seq_len),
        "stop_token_ids": ("tokenizer", tuple(stop_token_ids)), "pad_id": ("tokenizer", pad_id),
        "gather_weights": ("sampling.gather_weights", config.sampling.gather_weights),
        "decode_chunk": ("platform", platform_choices(config).decode_chunk)})


def eval_config(config) -> EvalConfig:
    """The `EvalConfig` of `config.eval`."""
    return _settings(EvalConfig, _group(EvalConfig, config, "eval"))


# ---------------------------------------------------------------------------------------------
# Validation: the settings' own checks, then those across groups.


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the field for anything that would fail later."""
    c = config
    _check_env(c.env)
    if c.platform != "auto" and c.platform not in platform_lib._ALIASES:
        _fail("platform", f"{c.platform!r}: use auto, {', '.join(platform_lib.PLATFORMS)}")
    for make in (rollout_config, sampling_config, train_config, eval_config, engine_config):
        make(c)
    if c.grpo.advantage_scale not in ADVANTAGE_SCALES:
        _fail("grpo.advantage_scale", f"{c.grpo.advantage_scale!r} is not one of {ADVANTAGE_SCALES}")
    if c.grpo.advantage_baseline not in BASELINES:
        _fail("grpo.advantage_baseline", f"{c.grpo.advantage_baseline!r} is not one of {BASELINES}")
    if c.rollout.group_size < 2:
        _fail("rollout.group_size", f"GRPO needs at least 2 completions per prompt, got {c.rollout.group_size}")
    if c.sampling.temperature <= 0:
        _fail("sampling.temperature", "GRPO samples at a temperature > 0 (greedy rollouts give "
              "identical groups)")
    _check_sizes(c)
    _check_files(c)
    _check_devices(c)
    _check_variants(c.grpo, c.train)


CREDITS = ("episode", "turn")
MULTI_REWARDS = ("sum", "normalize_then_sum")


def _check_variants(g, train) -> None:
    """The GRPO variants the loop (not the train step) carries out (`grpo_jax.collector`)."""
    if g.credit not in CREDITS:
        _fail("grpo.credit", f"{g.credit!r} is not one of {CREDITS}")
    if g.multi_reward not in MULTI_REWARDS:
        _fail("grpo.multi_reward", f"{g.multi_reward!r} is not one of {MULTI_REWARDS}")
    if g.credit == "turn" and g.multi_reward != "sum":
        _fail("grpo.multi_reward", "per-turn credit (grpo.credit = 'turn') takes the summed reward: use 'sum'")
    if not 0.0 < g.turn_discount <= 1.0:
        _fail("grpo.turn_discount", f"a discount in (0, 1], got {g.turn_discount}")
    if g.max_sampling_rounds < 1:
        _fail("grpo.max_sampling_rounds", f"at least one rollout per step, got {g.max_sampling_rounds}")
    if g.dynamic_sampling and not g.pack and jax.process_count() > 1:
        _fail("grpo.dynamic_sampling", "on several processes it needs grpo.pack = True (processes keep "
              "unequal numbers of episodes)")
    if g.ref_sync_every < 0:
        _fail("grpo.ref_sync_every", f"a step count >= 0 (0 = never), got {g.ref_sync_every}")
    if train.staleness < 0:
        _fail("train.staleness", f"a number of updates >= 0, got {train.staleness}")


def dataset_spec(env_config) -> dict[str, Any] | None:
    """The `grpo_jax.envs.datasets` spec of `env.dataset` (set fields only); None when its type is."""
    spec = {k: v for k, v in env_config.dataset.items() if v is not None and v != ()}
    return spec if env_config.dataset.type else None


def _check_env(env) -> None:
    try:
        registry.find_factory(env.name)
    except ValueError as e:
        _fail("env.name", str(e))
    if env.name == "group":
        if not env.envs:
            _fail("env.envs", "env.name = 'group' needs its envs: {task: {'name': ..., 'kwargs': {...}, "
                  "'weight': w}}")
        for task, spec in env.envs.items():
            if not hasattr(spec, "keys") or set(spec.keys()) - {"name", "kwargs", "weight"} or "name" not in spec:
                _fail(f"env.envs.{task}", "takes 'name', 'kwargs' and 'weight' ('name' required)")
            if spec["name"] == "group":
                _fail(f"env.envs.{task}.name", "groups do not nest")
            try:
                registry.find_factory(spec["name"])
            except ValueError as e:
                _fail(f"env.envs.{task}.name", str(e))
            weight = spec.get("weight", 1.0)
            if not isinstance(weight, (int, float)) or not weight > 0:
                _fail(f"env.envs.{task}.weight", f"a mixture weight must be a positive number, got {weight!r}")
        if env.rubric.funcs:
            _fail("env.rubric.funcs", "a group scores each task with its own env's rubric; configure it per task")
        if env.dataset.type:
            _fail("env.dataset.type", "a group's rows are its tasks'; give a task rows with name 'single_turn' "
                  "and kwargs {'dataset': {...}}")
    elif env.envs:
        _fail("env.envs", f"only used with env.name = 'group' (env.name is {env.name!r})")
    spec = dataset_spec(env)
    if spec is not None:
        try:
            datasets.check_spec(spec)
        except ValueError as e:
            key, _, message = str(e).partition(": ")
            _fail(f"env.dataset.{key}" if key.isidentifier() else "env.dataset", message if key.isidentifier()
                  else str(e))
    elif env.name == "single_turn" and not env.kwargs.get("dataset"):
        _fail("env.dataset.type", "a single_turn env reads its rows from env.dataset (jsonl | hf | tfds)")
    for metric, value in env.rubric.funcs.items():
        value = value.to_dict() if hasattr(value, "to_dict") else value
        weight = value.get("weight", 1.0) if isinstance(value, dict) else value
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            _fail(f"env.rubric.funcs.{metric}", f"a weight (number) or {{'weight': w, ...}}, got {value!r}")
        try:
            registry.reward_factory(value.get("fn", metric) if isinstance(value, dict) else metric)
        except ValueError as e:
            _fail(f"env.rubric.funcs.{metric}", str(e))


def _check_sizes(c) -> None:
    batch = c.train.prompts_per_step * c.rollout.group_size
    if c.train.prompts_per_step < 1:
        _fail("train.prompts_per_step", f"must be >= 1, got {c.train.prompts_per_step}")
    if c.grpo.micro_batch_tokens is not None and not c.grpo.pack:
        _fail("grpo.micro_batch_tokens", "sizes the micro-batches of packed rows: set grpo.pack = True "
              "or use grpo.micro_batch_size")
    if c.grpo.micro_batch_tokens is not None and c.grpo.micro_batch_size is not None:
        _fail("grpo.micro_batch_tokens", "and grpo.micro_batch_size both size the micro-batches: set one")
    if c.grpo.micro_batch_tokens is not None and c.grpo.micro_batch_tokens < 1:
        _fail("grpo.micro_batch_tokens", f"must be >= 1 or None, got {c.grpo.micro_batch_tokens}")
    if not c.grpo.pack and c.grpo.micro_batch_size and batch % c.grpo.micro_batch_size:
        _fail("grpo.micro_batch_size", f"{c.grpo.micro_batch_size} does not divide the batch of "
              f"{batch} rows (train.prompts_per_step * rollout.group_size)")
    if not c.model.hf_path and c.rollout.max_seq_len > c.model.max_position_embeddings:
        _fail("rollout.max_seq_len", f"{c.rollout.max_seq_len} (prompt + completion budget) is over the "
              f"model's context of {c.model.max_position_embeddings} (model.max_position_embeddings)")
    for name in ("num_steps", "eval_every", "log_every"):
        if c.train[name] < 0 or (name != "num_steps" and c.train[name] == 0):
            _fail(f"train.{name}", f"must be positive, got {c.train[name]}")
    if c.checkpoint.every < 1 or c.checkpoint.keep < 1:
        _fail("checkpoint.every", "checkpoint.every and checkpoint.keep must be >= 1")
    if not 0 <= c.sft.direct_answer_fraction <= 1:
        _fail("sft.direct_answer_fraction", f"must be in [0, 1], got {c.sft.direct_answer_fraction}")
    if c.sft.mixed_trained_tokens is not None and c.sft.mixed_trained_tokens < 1:
        _fail("sft.mixed_trained_tokens", f"must be >= 1 (None = all tokens), got {c.sft.mixed_trained_tokens}")
    if (c.sft.steps or c.sft.mixed_steps) and c.sft.num_demos < c.sft.batch_size:
        _fail("sft.num_demos", f"{c.sft.num_demos} demonstrations cannot fill a batch of {c.sft.batch_size}")
    if c.eval.num_examples < 1:
        _fail("eval.num_examples", f"must be >= 1, got {c.eval.num_examples}")
    for name in ("dtype", "param_dtype"):
        if c.model[name] not in ("float32", "bfloat16"):
            _fail(f"model.{name}", f"{c.model[name]!r}: use float32 or bfloat16")
    if model_platform_fields(c)["attention"] == "splash":  # its tiles: rows a multiple of 128 tokens
        field, width = (("rollout.max_seq_len", c.rollout.max_seq_len) if c.grpo.pack
                        else ("rollout.length_multiple", c.rollout.length_multiple))
        if width % 128:
            _fail(field, f"{width}: splash attention (TPU) takes train rows in multiples of 128 tokens")


def _check_files(c) -> None:
    for field in ("model.hf_path", "tokenizer.path"):
        group, name = field.split(".")
        path = c[group][name]
        if path and not os.path.isdir(path):
            _fail(field, f"{path!r} is not a directory (a local HF checkpoint or tokenizer directory; "
                  "nothing is downloaded)")
    if c.env.name == "gsm8k" and not c.env.kwargs.get("data_dir"):
        _fail("env.kwargs.data_dir", "gsm8k needs the directory of its prepared TFDS dataset")


def _check_devices(c) -> None:
    """The batch splits over the processes (whole groups each) and the data-parallel devices."""
    processes = jax.process_count()
    if c.train.prompts_per_step % processes:
        _fail("train.prompts_per_step", f"{c.train.prompts_per_step} prompts do not split evenly over "
              f"{processes} processes (each rolls out whole groups)")
    mesh = sharding_lib.mesh_from_config(c.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = c.train.prompts_per_step * c.rollout.group_size
    if c.grpo.pack:  # the packed row count is rounded to a multiple of the micro-batch rows
        micro = packed_micro_rows(c)
        if micro is not None and micro % shards:
            field = "grpo.micro_batch_tokens" if c.grpo.micro_batch_tokens else "grpo.micro_batch_size"
            _fail(field, f"micro-batches of {micro} packed rows of rollout.max_seq_len="
                  f"{c.rollout.max_seq_len} tokens must split evenly over the {shards} data-parallel "
                  "devices (mesh data x fsdp)")
        micro = micro or rows
    else:
        micro = c.grpo.micro_batch_size or rows
    mini = c.grpo.get("num_mini_batches", 1)
    if not c.grpo.pack and rows % (mini * (c.grpo.micro_batch_size or 1)):
        micro_rows = f" of whole micro-batches of {c.grpo.micro_batch_size} rows" if c.grpo.micro_batch_size else ""
        _fail("grpo.num_mini_batches", f"{mini} mini-batches{micro_rows} do not split the batch of {rows} "
              "rows evenly")
    if rows % shards or micro % shards:
        _fail("train.prompts_per_step", f"the batch of {rows} rows (micro-batches of {micro}) must split "
              f"evenly over the {shards} data-parallel devices (mesh data x fsdp)")


# ---------------------------------------------------------------------------------------------
# The `:ARGS` of `--config configs/NAME.py:ARGS`.


def shrink_for_smoke_test(c: ml_collections.ConfigDict, *, max_new_tokens: int = 8,
                          num_steps: int = 2) -> None:
    """The sizes of a tiny task's seconds-long `:runlocal` variant (what the tests run), in place:
    a one-layer model, a small tokenizer corpus and dataset, groups of 2 over 4 prompts,
    `num_steps` steps with an evaluation of 4 problems at the end. Warm-start steps are the
    config's to set."""
    c.model.d_model, c.model.n_layers, c.model.head_dim, c.model.d_ff = 32, 1, 8, 64
    c.tokenizer.corpus_rows = 200
    c.env.num_train = 64
    c.sft.batch_size, c.sft.num_demos, c.sft.log_every = 8, 16, 1
    c.sampling.max_new_tokens = max_new_tokens
    c.rollout.group_size = 2
    c.train.num_steps, c.train.prompts_per_step, c.train.eval_every = num_steps, 4, num_steps
    c.eval.num_examples = 4
    c.checkpoint.every = 2


def parse_args(arg: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """`"runlocal,steps=3"` -> `{**defaults, "runlocal": True, "steps": 3}`: comma-separated
    `key=value` pairs (a bare `key` is True), each value cast to its default's type; an unknown
    key is an error listing the known ones."""
    out = dict(defaults)
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, has_value, value = item.partition("=")
        if key not in defaults:
            raise ConfigError(f"config argument {key!r}: not one of {sorted(defaults)}")
        default = defaults[key]
        if not has_value:
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"config argument {key}={value!r}: use true or false")
            out[key] = value.lower() in ("true", "1")
        else:
            out[key] = value if default is None else type(default)(value)
    return out
