"""Supervised warm start on demonstrations, tokenized exactly as the rollout tokenizes episodes.

A demonstration is a prompt plus completion messages (assistant turns and env replies). It is
encoded the way `grpo_jax.rollout` builds a trajectory, so the warm-started model writes what
the RL loop will later read back:

    encode_chat(prompt, add_generation_prompt=True)                       mask 0
    for each assistant message:   encode(content) + end_of_turn_ids        mask 1
    for each run of env messages: encode_turn_suffix(messages)             mask 0

The end-of-turn token (e.g. `<|im_end|>`) is the sampler's stop token, so it is learned too.
The loss is the token-level mean negative log-likelihood over mask-1 tokens (log-probs in
vocabulary chunks, `grpo_jax.models.logprobs.token_logprobs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from grpo_jax.config_utils import ConfigError
from grpo_jax.models.logprobs import token_logprobs
from grpo_jax.models.lora import BASE
from grpo_jax.optim import keep_state_dtypes
from grpo_jax.sharding import can_fuse_projections, mesh_of
from grpo_jax.train_step import TrainState, init_train_state, split_params
from grpo_jax.utils import round_up

log = logging.getLogger(__name__)


def encode_demonstration(tokenizer, prompt: Sequence[Mapping[str, str]],
                         completion: Sequence[Mapping[str, str]],
                         trained_tokens: int | None = None, *, tools=None) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on the assistant's own tokens) of one demonstration.

    `trained_tokens`: only the first that many of the assistant's tokens carry loss (e.g. 1: the
    choice between calling a tool and answering, not what follows it). `tools`: the env's native
    tool schemas, rendered as the rollout renders them (`Environment.tool_schemas`).
    """
    tokens = list(tokenizer.encode_chat(list(prompt), add_generation_prompt=True, tools=tools))
    mask = [0] * len(tokens)
    i = 0
    while i < len(completion):
        message = completion[i]
        if message["role"] == "assistant":
            ids = list(tokenizer.encode(message["content"])) + list(tokenizer.end_of_turn_ids)
            tokens += ids
            mask += [1] * len(ids)
            i += 1
            continue
        j = i
        while j < len(completion) and completion[j]["role"] != "assistant":
            j += 1
        more = j < len(completion)
        ids = list(tokenizer.encode_turn_suffix(list(completion[i:j]), add_generation_prompt=more, tools=tools))
        tokens += ids
        mask += [0] * len(ids)
        i = j
    if trained_tokens is not None:
        seen = np.cumsum(mask)
        mask = [int(m and n <= trained_tokens) for m, n in zip(mask, seen)]
    return tokens, mask


def pack(examples: Sequence[tuple[list[int], list[int]]], pad_id: int, length: int | None = None,
         multiple: int = 16) -> dict[str, np.ndarray]:
    """Right-padded arrays: tokens, loss_mask, positions, segment_ids [N, T]."""
    longest = max(len(t) for t, _ in examples)
    t = length or round_up(longest, multiple)
    if longest > t:
        raise ValueError(f"a demonstration has {longest} tokens, more than the length {t}")
    n = len(examples)
    out = {"tokens": np.full((n, t), pad_id, np.int32), "loss_mask": np.zeros((n, t), np.float32),
           "positions": np.zeros((n, t), np.int32), "segment_ids": np.zeros((n, t), np.int32)}
    for i, (ids, mask) in enumerate(examples):
        out["tokens"][i, : len(ids)] = ids
        out["loss_mask"][i, : len(ids)] = mask
        out["positions"][i, : len(ids)] = np.arange(len(ids))
        out["segment_ids"][i, : len(ids)] = 1
    return out


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = 200
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    chunk_size: int | None = None  # log-prob vocabulary chunk; None: logprobs.DEFAULT_CHUNK_SIZE
    log_every: int = 50


def make_sft_step(model: nnx.Module, optimizer: optax.GradientTransformation,
                  chunk_size: int | None = None):
    """A jitted `(state, batch) -> (state, metrics)` minimising the masked token NLL."""
    graphdef, params, rest = split_params(model, BASE)  # the base (adapters, if any, stay off)
    fuse = can_fuse_projections(mesh_of(params))  # the default rules placed them

    def loss_fn(params, batch):
        policy = nnx.merge(graphdef, params, rest)
        hidden = policy.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], fuse=fuse)
        logps = token_logprobs(hidden[:, :-1], policy.unembedding(), batch["tokens"][:, 1:],
                               chunk_size=chunk_size)
        mask = batch["loss_mask"][:, 1:]
        count = jnp.maximum(mask.sum(), 1.0)
        nll = -(logps * mask).sum() / count
        # Fraction of target tokens the model already puts more than half its mass on.
        confident = ((logps > np.log(0.5)) * mask).sum() / count
        return nll, confident

    @jax.jit
    def step(state: TrainState, batch):
        (nll, confident), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        opt_state = keep_state_dtypes(opt_state, state.opt_state)
        params = optax.apply_updates(state.params, updates)
        metrics = {"sft/loss": nll, "sft/token_confident": confident,
                   "sft/grad_norm": optax.global_norm(grads)}
        return TrainState(params, opt_state, state.step + 1, state.key), metrics

    return step


def run_sft(model: nnx.Module, data: Mapping[str, np.ndarray], config: SFTConfig, *, seed: int = 0,
            log_fn: Callable[[int, dict], None] | None = None) -> nnx.Module:
    """Trains `model` in place on packed demonstrations `data` (see `pack`); returns it.

    Batches are drawn without replacement from a fixed permutation per epoch (seeded), so a run
    is reproducible. `log_fn(step, metrics)` receives host floats every `config.log_every` steps.
    """
    from grpo_jax.optim import make_optimizer

    n = len(data["tokens"])
    if n < config.batch_size:
        raise ValueError(f"SFT needs at least batch_size={config.batch_size} demonstrations, got {n}")
    optimizer = make_optimizer(config.learning_rate, schedule="cosine" if config.steps > config.warmup_steps
                               else "constant", warmup_steps=config.warmup_steps, total_steps=config.steps,
                               end_fraction=0.1, weight_decay=config.weight_decay,
                               max_grad_norm=config.max_grad_norm)
    state = init_train_state(model, optimizer, jax.random.key(seed), which=BASE)
    step_fn = make_sft_step(model, optimizer, config.chunk_size)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    cursor = 0
    start = time.perf_counter()
    multi_process = jax.process_count() > 1
    for step in range(1, config.steps + 1):
        if cursor + config.batch_size > n:
            order, cursor = rng.permutation(n), 0
        idx = np.sort(order[cursor: cursor + config.batch_size])
        cursor += config.batch_size
        state, metrics = step_fn(state, {k: v[idx] for k, v in data.items()})
        if multi_process:  # CPU collectives of many queued steps can interleave across processes
            jax.block_until_ready(metrics)
        if log_fn is not None and (step % config.log_every == 0 or step == config.steps):
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            host["sft/elapsed_s"] = time.perf_counter() - start
            log_fn(step, host)
    nnx.update(model, state.params)
    return model


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


def warm_start(run, writer) -> None:
    """Supervised warm start of `run.model` (a `components.Run`) as `config.sft` says, in place:
    `steps` on the env's gold demonstrations, then `mixed_steps` on demonstrations of which
    `direct_answer_fraction` skip the tool (with `mixed_trained_tokens`, only their first
    completion tokens carry loss). Progress goes to `writer` (a `metrics.MetricsWriter`)."""
    c, seed = run.config.sft, warm_start_seed(run.config)
    rows = run.env.dataset("train", n=c.num_demos, seed=run.config.env.data_seed)
    stages = [("gold", 0.0, c.steps, c.learning_rate, seed, None)]
    if c.mixed_steps:
        stages.append(("mixed", c.direct_answer_fraction, c.mixed_steps, c.mixed_learning_rate,
                       seed + 1, c.mixed_trained_tokens))
    done, total = 0, sum(stage[2] for stage in stages)
    for name, fraction, steps, learning_rate, stage_seed, trained_tokens in stages:
        if not steps:
            continue
        demos = demonstrations(run.env, rows, direct_answer_fraction=fraction, seed=stage_seed)
        tools = run.env.tool_schemas()
        data = pack([encode_demonstration(run.tokenizer, p, q, trained_tokens, tools=tools) for p, q in demos],
                    run.tokenizer.pad_id)
        if data["tokens"].shape[1] > run.model.config.max_position_embeddings:
            raise ConfigError(f"config.model.max_position_embeddings: demonstrations "
                              f"need {data['tokens'].shape[1]} positions")

        def log_fn(step, metrics, offset=done, name=name):
            writer.write(0, {**metrics, "sft/step": float(offset + step)})
            if writer.is_writer:
                print(f"sft ({name}) step {offset + step}/{total} | loss {metrics['sft/loss']:.3f} | "
                      f"confident tokens {metrics['sft/token_confident']:.2f} | "
                      f"{metrics['sft/elapsed_s']:.0f}s", flush=True)

        run_sft(run.model, data, SFTConfig(
            steps=steps, batch_size=c.batch_size, learning_rate=learning_rate,
            warmup_steps=min(c.warmup_steps, steps // 2), chunk_size=run.train.chunk_size,
            log_every=c.log_every), seed=stage_seed, log_fn=log_fn)
        done += steps


# What a warm start is a function of (with `seed` and `platform`): the cache key's config groups.
WARM_START_GROUPS = ("model", "lora", "tokenizer", "env", "sft", "mesh")
# The seed enters as `warm_start_seed`; demonstrations are not scored (the rubric).
_NOT_IN_KEY = {"sft": ("cache_dir", "log_every", "seed"), "env": ("rubric_weights", "rubric")}


def warm_start_seed(config) -> int:
    """The seed of the initial weights and the warm start: `sft.seed`, or the run's `seed`."""
    seed = config.sft.get("seed")
    return config.seed if seed is None else seed


def warm_start_key(config) -> str:
    """A digest of everything the warm-started weights depend on (`WARM_START_GROUPS`, the
    warm-start seed and the platform): runs whose keys match start GRPO from the same weights."""
    groups = {name: {k: v for k, v in config[name].to_dict().items() if k not in _NOT_IN_KEY.get(name, ())}
              for name in WARM_START_GROUPS}
    groups.update(seed=warm_start_seed(config), platform=config.platform)
    text = json.dumps(groups, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_warm_start(run, writer) -> None:
    """`warm_start`, or its weights read back from `config.sft.cache_dir` when a run with the same
    `warm_start_key` left them there (ablation variants and seeds' re-runs share one warm start;
    the weights are those the warm start would make, bitwise on the same machine). A cache
    entry that does not restore is warned about and the warm start runs (and rewrites it)."""
    cache = run.config.sft.cache_dir
    if not cache:
        return warm_start(run, writer)
    path = os.path.abspath(os.path.join(cache, f"warm_start_{warm_start_key(run.config)}"))
    state = nnx.state(run.model, nnx.Param)
    if os.path.isdir(path):
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                restored = checkpointer.restore(path, jax.tree.map(_abstract, nnx.to_pure_dict(state)))
            nnx.replace_by_pure_dict(state, restored)
            nnx.update(run.model, state)
            if writer.is_writer:
                print(f"warm start read from {path}", flush=True)
            return None
        except Exception as error:  # noqa: BLE001  (a bad entry costs a warm start, not the run)
            log.warning("warm-start cache %s does not restore (%s: %s): warm-starting again",
                        path, type(error).__name__, error)
    warm_start(run, writer)
    state = nnx.state(run.model, nnx.Param)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, nnx.to_pure_dict(state), force=True)
    if writer.is_writer:
        print(f"warm start kept in {path}", flush=True)
    return None


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
