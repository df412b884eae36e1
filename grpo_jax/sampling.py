"""Pure-functional sampling: prefill + a compiled decode loop over a donated KV cache.

`generate(model, prompts, key, config)` takes prompts as token-id lists of any lengths and
returns `Samples` (tokens, log-probs, lengths, why each row stopped). Under the hood:

1. Validation on the host (empty prompt, id out of the vocabulary, prompt + budget over the
   context) raises `SamplingError` before anything is compiled.
2. Prompts are left-padded to a length bucket and the batch to a batch bucket, so a training
   run compiles once per bucket instead of once per step.
3. `prefill` (one program) runs the prompts through the model once and writes the cache. With
   `n > 1` samples per prompt the prompt's cache is then repeated for its group, so a GRPO group
   of 8-64 completions pays for one prefill.
4. `decode` (a second program) is a `lax.while_loop` that samples one token per row per step
   and leaves as soon as every row has stopped (checked once every `decode_chunk` steps); the
   cache is donated, so XLA updates it in place.

The weights it reads are `sampling_model(model)`: the compute dtype (a bfloat16 copy of float32
master weights) and, on a mesh, gathered over fsdp. On a mesh the rows, and the KV cache with
them, are split over the data x fsdp devices and the cache's KV heads over tp (`Layout`), so a
device holds and reads only its own rows' cache and rollouts scale with the chips.

Log-prob convention: `logprobs[i, t] = log softmax(z / tau)[token]` over the *full* vocabulary,
where z are the model's float32 logits and tau the temperature (tau = 1 for greedy). Top-k, top-p
and min-p only choose which tokens may be drawn; they do not renormalise the reported log-probs.
The train step scores completions with the same `grpo_jax.models.logprobs.token_logprobs` at
the same temperature, so new/old ratios are exactly 1 on-policy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import sharding as sharding_lib
from grpo_jax.models import lora
from grpo_jax.token_selection import categorical, filter_logits, row_uniforms, select_tokens  # noqa: F401
from grpo_jax.utils import dataclass_from, is_var, round_up

STOP_LENGTH, STOP_TOKEN = 0, 1  # values of Samples.stop_reason


class SamplingError(ValueError):
    """Bad sampling input (prompt, config), raised before anything is compiled."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    min_p: float = 0.0                # 0 = off
    n: int = 1                        # samples per prompt (a GRPO group), rows prompt-major
    stop_token_ids: tuple[int, ...] = ()
    pad_id: int = 0
    max_length: int | None = None     # context limit; default: the model's max_position_embeddings
    prompt_bucket: int = 32           # prompt lengths are rounded up to a multiple of this
    batch_bucket: int = 8             # prompt counts are rounded up to a multiple of this
    geometric_batch_buckets: bool = False  # ... and then to batch_bucket x a power of two
    # Decode steps between stop checks (`grpo_jax.platform`: 16 on GPU, where a `while`
    # predicate goes to the host every iteration; 1 elsewhere). The loop may run up to
    # decode_chunk - 1 steps after every row stopped (`Samples.idle_steps`); tokens are the same.
    decode_chunk: int = 1
    # On a mesh: read a compute-dtype copy of the weights gathered over fsdp (split over tp only),
    # made once by `sampling_model` (`grpo_jax.sharding.sampling_rules`); False: the train layout.
    gather_weights: bool = True

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.n >= 1, "n must be >= 1"),
            (self.prompt_bucket >= 1 and self.batch_bucket >= 1, "buckets must be >= 1"),
            (self.decode_chunk >= 1, "decode_chunk must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(f"sampling config: {message} (got {self})")

    @classmethod
    def from_any(cls, config: "SamplingConfig | Mapping[str, Any] | Any") -> "SamplingConfig":
        """Accepts a SamplingConfig, a dict or a ConfigDict with (a subset of) these fields."""
        return dataclass_from(cls, config, what="sampling config", error=SamplingError)


class Samples(NamedTuple):
    """Host (numpy) results; N = len(prompts) * n rows, prompt-major (prompt i's samples are
    rows i*n .. i*n + n - 1, the layout `group_advantages` expects)."""

    tokens: np.ndarray         # [N, max_new_tokens] int32, pad_id after `lengths`
    logprobs: np.ndarray       # [N, max_new_tokens] float32, 0 after `lengths`
    lengths: np.ndarray        # [N] generated tokens, the stop token included
    stop_reason: np.ndarray    # [N] STOP_TOKEN or STOP_LENGTH
    prompt_index: np.ndarray   # [N] which prompt each row continues
    decode_steps: int = -1     # steps the decode loop ran (the first token, from the prefill, counts)
    idle_steps: int = 0        # of those, steps after every row had stopped (< decode_chunk)

    def completion(self, i: int) -> list[int]:
        return self.tokens[i, : self.lengths[i]].tolist()


# ---------------------------------------------------------------------------------------------
# Layout on a mesh: rows over the batch axes, the KV cache by rows and KV heads.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the sampler's arrays live (static under jit). `mesh` None: one device, no constraint.

    Rows (prompts, samples, the cache) are split over the mesh's batch axes (data x fsdp); the
    KV cache's heads over tp (replicated there when tp does not divide them). Each device then
    holds and reads the cache of its own rows and heads: a decode step moves no cache between
    devices, only tp's activation all-reduces and the [N, V] logits' reductions over vocab.
    """

    mesh: Any = None
    rules: tuple = sharding_lib.DEFAULT_RULES

    @property
    def row_shards(self) -> int:
        if self.mesh is None:
            return 1
        spec = sharding_lib.logical_to_spec(("batch",), None, self.mesh, self.rules)
        return math.prod(self.mesh.shape[a] for a in jax.tree.leaves(tuple(spec)))

    def sharding(self, logical_axes, shape):
        return sharding_lib.named_sharding(self.mesh, logical_axes, shape, self.rules)

    def constrain(self, x, logical_axes):
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes, x.shape))

    def rows(self, x):
        """`x` [N, ...] constrained to rows over the batch axes."""
        return self.constrain(x, _row_axes(x.ndim))

    def loop(self, s: "_LoopState") -> "_LoopState":
        return _map_loop(s, self.constrain)


def _row_axes(ndim: int) -> tuple:
    return ("batch",) + (None,) * (ndim - 1)


def _map_cache(cache, place):
    """`place(x, logical_axes)` applied to the KV cache's arrays (not its index)."""
    return cache.map_axes(place)


def _map_loop(s: "_LoopState", place) -> "_LoopState":
    """`place(x, logical_axes)` applied to every array of the loop state but the counters."""
    rows = lambda x: place(x, _row_axes(len(x.shape)))  # noqa: E731
    return s._replace(cache=_map_cache(s.cache, place), last_token=rows(s.last_token), position=rows(s.position),
                      done=rows(s.done), tokens=rows(s.tokens), logprobs=rows(s.logprobs))


def sampling_model(model, *, gather_weights: bool = True, rules=sharding_lib.DEFAULT_RULES,
                   merge_adapters: bool = True):
    """The weights the sampler reads: the model in its compute dtype and, on a mesh, in the
    sampling layout (`grpo_jax.sharding.sampling_rules`).

    Training keeps float32 master weights under bfloat16 compute; a decode step reads every
    weight, so the sampler reads a bfloat16 copy (half the bytes), made here in one compiled
    cast-and-reshard. Call it once per rollout and drop the result after it (the trainer does):
    the copy lives only while it is referenced. Returns `model` itself when nothing would change.
    LoRA adapters are merged into the copy (`models.lora.merged`) unless `merge_adapters` is
    False (then every decode step runs their two thin matmuls per target; `benchmarks/lora_sampling.py`).
    """
    if merge_adapters and lora.has_adapters(model):  # once per rollout: no adapter matmuls per step
        model = lora.merged(model)
    graphdef, state = nnx.split(model)
    cfg = model.config
    mesh = sharding_lib.mesh_of(state)
    variables = jax.tree.leaves(state, is_leaf=is_var)
    arrays, treedef = jax.tree.flatten(state)
    compute = jnp.dtype(cfg.dtype)
    dtypes = [compute if isinstance(v, nnx.Param) and jnp.issubdtype(a.dtype, jnp.floating) else a.dtype
              for v, a in zip(variables, arrays)]
    if mesh is None:
        shardings = [a.sharding for a in arrays]
    else:
        sample_rules = sharding_lib.sampling_rules(rules, gather_weights=gather_weights)
        shardings = [sharding_lib.named_sharding(mesh, sharding_lib.logical_axes_of(v), a.shape, sample_rules)
                     for v, a in zip(variables, arrays)]
    if all(a.dtype == d and a.sharding == sh for a, d, sh in zip(arrays, dtypes, shardings)):
        return model
    cast = _cast_program(tuple(map(jnp.dtype, dtypes)), tuple(shardings))
    copy = nnx.merge(graphdef, jax.tree.unflatten(treedef, cast(arrays)))
    copy.config = cfg.replace(param_dtype=cfg.dtype)
    return copy


@functools.lru_cache(maxsize=8)
def _cast_program(dtypes: tuple, shardings: tuple):
    """One jitted cast-and-reshard per (dtypes, shardings): every rollout of a run reuses it
    (a fresh `jax.jit` each call would trace and compile again every step)."""
    return jax.jit(lambda xs: [x.astype(d) for x, d in zip(xs, dtypes)], out_shardings=list(shardings))


# ---------------------------------------------------------------------------------------------
# The two compiled programs.
# ---------------------------------------------------------------------------------------------
class _LoopState(NamedTuple):
    cache: Any
    last_token: jax.Array   # [N]
    position: jax.Array     # [N] RoPE position of last_token
    done: jax.Array         # [N] bool
    tokens: jax.Array       # [N, M'] (M' = `_token_columns`)
    logprobs: jax.Array     # [N, M']
    step: jax.Array         # scalar: tokens generated so far (column to write next)


def _token_columns(cfg: SamplingConfig) -> int:
    """Token columns the loop writes: the prefill's first token, then whole chunks of decode
    steps, the last of which may run past max_new_tokens (trimmed on the host)."""
    return 1 + round_up(cfg.max_new_tokens - 1, cfg.decode_chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "cache_length", "layout"))
def _prefill(graphdef, state, tokens_BP, valid_BP, row_ids_N, real_N, key, *, cfg: SamplingConfig,
             cache_length: int, layout: Layout = Layout()):
    model = nnx.merge(graphdef, state)
    tokens_BP, valid_BP = layout.rows(tokens_BP), layout.rows(valid_BP)
    b, p = tokens_BP.shape
    positions = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0).astype(jnp.int32)
    cache = _map_cache(model.init_cache(b, cache_length), layout.constrain)
    hidden, cache = model.decode(tokens_BP, positions, valid_BP, cache, fresh=True)
    logits = model.logits_from_hidden(hidden[:, -1:])[:, 0]           # [B, V]
    if cfg.n > 1:  # share the prompt's prefill with its whole group (rows stay on their device)
        cache = cache.repeat_rows(cfg.n)
        logits, positions = jnp.repeat(logits, cfg.n, axis=0), jnp.repeat(positions, cfg.n, axis=0)
    first, first_lp = select_tokens(layout.rows(logits), jax.random.fold_in(key, 0), cfg, row_ids_N)
    n_rows = first.shape[0]
    stop_ids = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)
    width = _token_columns(cfg)
    tokens = jnp.full((n_rows, width), cfg.pad_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((n_rows, width), jnp.float32).at[:, 0].set(first_lp)
    # Bucket-padding rows start done: their output is dropped, and a row that never samples a
    # stop token would otherwise keep the loop running to max_new_tokens for everyone.
    return layout.loop(_LoopState(cache=cache, last_token=first, position=positions[:, -1] + 1,
                                  done=jnp.isin(first, stop_ids) | ~real_N, tokens=tokens, logprobs=logprobs,
                                  step=jnp.ones((), jnp.int32)))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "fuse", "layout"), donate_argnames=("loop",))
def _decode(graphdef, state, loop: _LoopState, row_ids_N, key, *, cfg: SamplingConfig, fuse: bool,
            layout: Layout = Layout()):
    """Steps until every row stopped or max_new_tokens: a `while` whose body runs
    `cfg.decode_chunk` steps (a loop of known trip count), so the stop check, which XLA:GPU
    copies to the host, comes once a chunk. A step past max_new_tokens (the last chunk's tail)
    writes padding into columns the host drops."""
    model = nnx.merge(graphdef, state)
    layers = model.unstack_layers(fuse=fuse)  # sliced (and fused) once, outside the loop
    stop_ids = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)

    def cond(s: _LoopState):
        return (s.step < cfg.max_new_tokens) & ~jnp.all(s.done)

    def one_step(s: _LoopState):
        valid = ~s.done[:, None]
        hidden, cache = model.decode(s.last_token[:, None], s.position[:, None], valid, s.cache, layers)
        logits = model.logits_from_hidden(hidden)[:, 0]
        token, logprob = select_tokens(logits, jax.random.fold_in(key, s.step), cfg, row_ids_N)
        idle = s.done | (s.step >= cfg.max_new_tokens)
        token = jnp.where(idle, cfg.pad_id, token)
        logprob = jnp.where(idle, 0.0, logprob)
        return layout.loop(_LoopState(
            cache=cache, last_token=token, position=s.position + 1,
            done=s.done | (jnp.isin(token, stop_ids) & ~idle),
            tokens=jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step)),
            logprobs=jax.lax.dynamic_update_slice(s.logprobs, logprob[:, None], (0, s.step)),
            step=s.step + 1))

    if cfg.decode_chunk == 1:
        body = one_step
    else:
        body = lambda s: jax.lax.fori_loop(0, cfg.decode_chunk, lambda _, x: one_step(x), s)  # noqa: E731
    return jax.lax.while_loop(cond, body, layout.loop(loop))


# ---------------------------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------------------------
def _token_ids(i: int, prompt) -> list[int]:
    """Prompt i as a list of ints; anything but integers (1.5, "7", None) raises `SamplingError`
    rather than being truncated or failing deep inside numpy."""
    if isinstance(prompt, (str, bytes)):
        raise SamplingError(f"prompt {i} is a string; tokenize it first (prompts are token-id lists)")
    ids = prompt.tolist() if isinstance(prompt, np.ndarray) else list(prompt)
    bad = [x for x in ids if isinstance(x, bool) or not isinstance(x, (int, np.integer))]
    if bad:
        raise SamplingError(f"prompt {i} holds {bad[0]!r} ({type(bad[0]).__name__}): token ids must be integers")
    return [int(x) for x in ids]


def _validate(prompts, cfg: SamplingConfig, vocab_size: int, context: int):
    if len(prompts) == 0:
        raise SamplingError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise SamplingError(f"prompt {i} is empty (it needs at least one token, e.g. BOS)")
        ids = np.asarray(prompt)
        if ids.dtype.kind not in "iu":
            raise SamplingError(f"prompt {i} holds non-integer values ({ids.dtype})")
        if ids.min() < 0 or ids.max() >= vocab_size:
            bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
            raise SamplingError(f"prompt {i} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
        if len(prompt) + cfg.max_new_tokens > context:
            raise SamplingError(
                f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={cfg.max_new_tokens} it "
                f"needs {len(prompt) + cfg.max_new_tokens} positions, more than the context of {context}")
    for t in cfg.stop_token_ids:
        if not 0 <= t < vocab_size:
            raise SamplingError(f"stop token id {t} is outside the vocabulary [0, {vocab_size})")


def batch_rows(count: int, cfg: SamplingConfig, row_shards: int = 1) -> int:
    """Prompt rows of a batch of `count` prompts: rounded up to the batch bucket (and a power of
    two of it with geometric buckets), and to a multiple of the devices rows are split over."""
    bucket = math.lcm(cfg.batch_bucket, row_shards)
    b = round_up(count, bucket)
    if cfg.geometric_batch_buckets:  # log2 as many shapes when counts vary (later turns of episodes)
        b = bucket * 2 ** math.ceil(math.log2(b // bucket))
    return b


def pad_prompts(prompts: Sequence[Sequence[int]], cfg: SamplingConfig, row_shards: int = 1):
    """Left-pads to [B, P] with B (`batch_rows`), P rounded up to the buckets; returns tokens,
    valid, count."""
    count = len(prompts)
    b = batch_rows(count, cfg, row_shards)
    p = round_up(max(len(x) for x in prompts), cfg.prompt_bucket)
    tokens = np.full((b, p), cfg.pad_id, np.int32)
    valid = np.zeros((b, p), bool)
    for i, prompt in enumerate(prompts):
        tokens[i, p - len(prompt):] = prompt
        valid[i, p - len(prompt):] = True
    valid[count:, -1] = True  # filler rows: one valid token so their rows are well defined
    return tokens, valid, count


def _fuse(layout: Layout, cfg: SamplingConfig) -> bool:
    return sharding_lib.can_fuse_projections(
        layout.mesh, sharding_lib.sampling_rules(layout.rules, gather_weights=cfg.gather_weights))


def _cache_length(prompt_len: int, cfg: SamplingConfig) -> int:
    return prompt_len + _token_columns(cfg)


def programs(model, num_prompts: int, prompt_len: int, config, *, rules=sharding_lib.DEFAULT_RULES):
    """The sampler's two programs with abstract arguments, for `lower`, `jax.export` and cost
    analysis: {"prefill": (jitted, args), "decode": (jitted, args)}; `jitted.lower(*args)`.

    `model` may be abstract (`models.abstract_model`) and is read as the sampler reads it: pass
    `sampling_model(model)` for a placed one. `num_prompts` is rounded up like a real batch.
    """
    cfg = SamplingConfig.from_any(config)
    graphdef, state = nnx.split(model)
    layout = Layout(sharding_lib.mesh_of(state), tuple(rules))
    b = batch_rows(num_prompts, cfg, layout.row_shards)
    n = b * cfg.n
    spec = lambda shape, dtype, axes=None: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=None if layout.mesh is None else layout.sharding(axes, shape))
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                                  state)
    key = jax.eval_shape(lambda: jax.random.key(0))
    rows = lambda shape, dtype: spec(shape, dtype, _row_axes(len(shape)))  # noqa: E731
    prefill_args = (graphdef, abstract_state, rows((b, prompt_len), jnp.int32), rows((b, prompt_len), bool),
                    rows((n,), jnp.int32), rows((n,), bool), key)
    prefill = functools.partial(_prefill, cfg=cfg, cache_length=_cache_length(prompt_len, cfg), layout=layout)
    loop = jax.eval_shape(prefill, *prefill_args)
    if layout.mesh is not None:  # the loop state arrives as the prefill lays it out
        loop = _map_loop(loop, lambda x, axes: spec(x.shape, x.dtype, axes))
    decode = functools.partial(_decode, cfg=cfg, fuse=_fuse(layout, cfg), layout=layout)
    return {"prefill": (jax.jit(prefill, static_argnums=0), prefill_args),
            "decode": (jax.jit(decode, static_argnums=0), (graphdef, abstract_state, loop, rows((n,), jnp.int32), key))}


def generate(model, prompts: Sequence[Sequence[int]], key, config, *, row_ids=None,
             rules=sharding_lib.DEFAULT_RULES) -> Samples:
    """Samples `config.n` completions per prompt (see the module docstring for the conventions).

    Args:
      model: a `grpo_jax.models.Transformer` (its parameters may be sharded on a mesh: the rows
        are then split over the mesh's batch axes, see `Layout`). Weights not already in the
        sampling form are copied by `sampling_model` for this call; a caller sampling several
        times from the same weights (a multi-turn rollout) passes `sampling_model(model)` once.
      prompts: token-id lists of any lengths.
      key: a `jax.random` key; the same key, prompts and config give the same samples.
      config: a `SamplingConfig`, or a dict / ConfigDict of its fields.
      row_ids: optional global ids of the N = len(prompts) * n output rows. A row's random draws
        depend only on (key, its id), so a batch split over hosts samples what the whole batch
        would (default: 0 .. N - 1).
      rules: the logical-axis rules the weights were placed with.
    """
    cfg = SamplingConfig.from_any(config)
    mcfg = model.config
    context = cfg.max_length or mcfg.max_position_embeddings
    prompts = [_token_ids(i, p) for i, p in enumerate(prompts)]
    _validate(prompts, cfg, mcfg.vocab_size, context)
    model = sampling_model(model, gather_weights=cfg.gather_weights, rules=rules)
    graphdef, state = nnx.split(model)
    layout = Layout(sharding_lib.mesh_of(state), tuple(rules))
    tokens, valid, count = pad_prompts(prompts, cfg, layout.row_shards)
    rows = count * cfg.n
    real = np.arange(rows) if row_ids is None else np.asarray(row_ids, np.int64)
    if real.shape != (rows,):
        raise SamplingError(f"row_ids must hold {rows} ids (prompts x n), got shape {real.shape}")
    filler = real.max() + 1 + np.arange(tokens.shape[0] * cfg.n - rows)  # bucket padding rows
    row_ids_N = jnp.asarray(np.concatenate([real, filler]), jnp.int32)
    real_N = jnp.asarray(np.arange(tokens.shape[0] * cfg.n) < rows)
    if layout.mesh is not None:
        put = lambda x: jax.device_put(x, layout.sharding(_row_axes(x.ndim), x.shape))  # noqa: E731
        tokens, valid, row_ids_N, real_N = map(put, (tokens, valid, np.asarray(row_ids_N), np.asarray(real_N)))
    loop = _prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid), row_ids_N, real_N, key, cfg=cfg,
                    cache_length=_cache_length(tokens.shape[1], cfg), layout=layout)
    loop = _decode(graphdef, state, loop, row_ids_N, key, cfg=cfg, fuse=_fuse(layout, cfg), layout=layout)
    out_tokens, out_logprobs, done, steps = jax.device_get((loop.tokens, loop.logprobs, loop.done, loop.step))
    m = cfg.max_new_tokens
    out_tokens, out_logprobs, done = out_tokens[:rows, :m], out_logprobs[:rows, :m], done[:rows]
    stopped = np.isin(out_tokens, np.asarray(cfg.stop_token_ids or (-1,)))
    first_stop = np.where(stopped.any(1), stopped.argmax(1) + 1, m)
    longest = int(first_stop.max(initial=0))
    return Samples(tokens=out_tokens, logprobs=out_logprobs, lengths=first_stop.astype(np.int32),
                   stop_reason=np.where(done, STOP_TOKEN, STOP_LENGTH).astype(np.int32),
                   prompt_index=np.repeat(np.arange(count), cfg.n), decode_steps=int(steps),
                   idle_steps=max(int(steps) - longest, 0))
