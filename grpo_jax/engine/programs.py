"""The rollout engine's compiled programs: pure functions of the weights, the slots' KV cache
(donated, updated in place) and small per-slot arrays sent by the host.

The cache holds `slots` rows of `capacity` positions; slot s holds one episode's tokens at
positions 0 .. length_s - 1 (no left padding), so a row's write offset and RoPE position are
its own length (`KVCache.index` per row). Three programs, each compiled once per engine shape:

- `prefill_chunk`: up to R slots take up to C new tokens each, written at their lengths (a
  gather of those slots' cache rows, the model over [R, C], a scatter back). Unused rows name
  slot `slots` (out of range): their gather is clamped and their scatter dropped.
- `decode_steps`: K decode steps of every slot; an inactive slot computes (the shape is fixed)
  but its token is dropped and it writes only past its own length, where nothing reads.
- `copy_slots`: slot rows copied onto others (a group's shared prompt prefill, made once).

The prefill program is compiled for R a power of two up to `prefill_rows` and for C, C / 4 or
C / 16 tokens (a reply of a few tokens to one episode does not pay for R x C positions), so an
engine compiles a handful of programs, fixed by its config, none depending on the mix of
requests.

A slot's pending token (the last of its history, not yet in the cache) is fed by the next
decode step, which samples the token after it: a prefill therefore writes all new tokens but
the last, and every sampled token, the first of a turn included, comes from `decode_steps`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.models.transformer import KVCache
from grpo_jax.sampling import Layout, _map_cache
from grpo_jax.token_selection import RowSampling, keyed_uniforms, select_tokens_rows


class SlotInputs(NamedTuple):
    """Per-slot arrays [S] the host sends with each decode call (the host is their owner)."""

    last_token: jax.Array   # the pending token, fed at position `length`
    length: jax.Array       # tokens in the slot's cache
    active: jax.Array       # bool: the slot samples this call
    generated: jax.Array    # tokens sampled so far in the slot's current turn
    budget: jax.Array       # tokens the turn may sample in all
    turn: jax.Array         # the turn's index (its draws use fold_in(key, turn))
    row_id: jax.Array       # the episode's global id (its draws use it)
    key_data: jax.Array     # [S, *] uint32: the episode's key
    sampling: RowSampling
    forced: jax.Array       # [S, F] tokens fed after the pending one before sampling (a tool reply)
    forced_count: jax.Array  # [S] how many of them


class DecodeOut(NamedTuple):
    tokens: jax.Array       # [S, K] sampled tokens (pad where the slot did not sample)
    logprobs: jax.Array     # [S, K]
    count: jax.Array        # [S] tokens the slot sampled this call
    stopped: jax.Array      # [S] bool: its last token is a stop token
    steps: jax.Array        # decode steps the call ran
    fed: jax.Array          # [S] forced tokens the slot consumed


def empty_cache(model, slots: int, capacity: int, layout: Layout) -> KVCache:
    cache = model.init_cache(slots, capacity)
    cache = cache._replace(index=jnp.zeros((slots,), jnp.int32))
    return _map_cache(cache, layout.constrain)


@functools.partial(jax.jit, static_argnames=("slots", "capacity", "layout"))
def init_cache(graphdef, state, *, slots: int, capacity: int, layout: Layout):
    return empty_cache(nnx.merge(graphdef, state), slots, capacity, layout)


def _rows(cache: KVCache, slots_R) -> KVCache:
    take = lambda x: jnp.take(x, slots_R, axis=0, mode="clip")  # noqa: E731
    return cache.map_rows(take)._replace(index=jnp.take(cache.index, slots_R, mode="clip"))


def _put_rows(cache: KVCache, slots_R, rows: KVCache) -> KVCache:
    put = lambda x, y: x.at[slots_R].set(y, mode="drop")  # noqa: E731
    return cache._replace(k=tuple(map(put, cache.k, rows.k)), v=tuple(map(put, cache.v, rows.v)),
                          kv_valid=put(cache.kv_valid, rows.kv_valid))


@functools.partial(jax.jit, static_argnames=("graphdef", "layout"), donate_argnames=("cache",))
def prefill_chunk(graphdef, state, cache: KVCache, slots_R, tokens_RC, starts_R, counts_R, *, layout: Layout):
    """Writes `counts_R[r]` tokens of `tokens_RC[r]` into slot `slots_R[r]` from position
    `starts_R[r]`. The chunk's padding positions are written too (past the row's new length,
    overwritten before anything reads them: the cache has a chunk of spare positions)."""
    model = nnx.merge(graphdef, state)
    c = tokens_RC.shape[1]
    positions_RC = starts_R[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    valid_RC = jnp.arange(c)[None, :] < counts_R[:, None]
    rows = _rows(cache, slots_R)._replace(index=starts_R)
    _, rows = model.decode(tokens_RC, positions_RC, valid_RC, rows, contiguous=True)
    return _map_cache(_put_rows(cache, slots_R, rows), layout.constrain)


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("cache",))
def copy_slots(cache: KVCache, src_F, dst_F, count, *, layout: Layout):
    """Slot `src_F[f]`'s cache row copied onto slot `dst_F[f]`, for f < `count`: one row at a
    time in place (no [F, ...] temporary; the loop runs `count` times, not F)."""
    def copy_row(f, cache):
        take = lambda x: jax.lax.dynamic_index_in_dim(x, src_F[f], 0, keepdims=True)  # noqa: E731
        put = lambda x: jax.lax.dynamic_update_index_in_dim(x, take(x), dst_F[f], 0)  # noqa: E731
        return cache.map_rows(put)
    return _map_cache(jax.lax.fori_loop(0, count, copy_row, cache), layout.constrain)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "chunk", "stop_ids", "filters", "pad_id", "fuse",
                                             "layout"), donate_argnames=("cache",))
def decode_steps(graphdef, state, cache: KVCache, inputs: SlotInputs, refill_at, *, steps: int, chunk: int,
                 stop_ids: tuple[int, ...], filters: tuple[bool, bool, bool], pad_id: int, fuse: bool,
                 layout: Layout):
    """Up to `steps` decode steps of every slot; returns the cache and a `DecodeOut`. A slot
    stops sampling (for the rest of the call) at a stop token or when its turn's budget is spent.
    The call returns early, at a multiple of `chunk` steps (the platform's `decode_chunk`: the
    loop predicate goes to the host on GPU), once no slot samples or `refill_at` slots have
    ended their turn, so the host refills freed slots and hands finished turns to their
    environments without waiting for the rest."""
    model = nnx.merge(graphdef, state)
    layers = model.unstack_layers(fuse=fuse)
    stop = jnp.asarray(stop_ids or (-1,), jnp.int32)
    n = inputs.last_token.shape[0]
    rows = layout.rows
    width = -(-steps // chunk) * chunk

    def step(carry):
        i, cache, last, length, active, generated, stopped, ended, fed, tokens, logprobs = carry
        forcing = fed < inputs.forced_count
        sampling = active & ~forcing
        running = forcing | sampling
        hidden, cache = model.decode(last[:, None], length[:, None], running[:, None], cache._replace(index=length),
                                     layers, contiguous=True)
        logits = rows(model.logits_from_hidden(hidden)[:, 0])
        u = keyed_uniforms(inputs.key_data, inputs.turn, generated, inputs.row_id)
        token, logprob = select_tokens_rows(logits, u, inputs.sampling, filters=filters)
        forced = jnp.take_along_axis(inputs.forced, jnp.minimum(fed, inputs.forced.shape[1] - 1)[:, None], 1)[:, 0]
        # Sampled tokens go to the slot's next output column; forced steps write nothing.
        column = jnp.where(sampling, generated - inputs.generated, width)
        tokens = tokens.at[jnp.arange(n), column].set(token, mode="drop")
        logprobs = logprobs.at[jnp.arange(n), column].set(logprob, mode="drop")
        is_stop = jnp.isin(token, stop) & sampling
        length, generated, fed = length + running, generated + sampling, fed + forcing
        last = jnp.where(forcing, forced, jnp.where(sampling, token, last))
        still = active & ~is_stop & (generated < inputs.budget)
        ended = ended + jnp.sum(active & ~still)
        return (i + 1, _map_cache(cache, layout.constrain), rows(last), rows(length), rows(still), rows(generated),
                rows(stopped | is_stop), ended, rows(fed), rows(tokens), rows(logprobs))

    def cond(carry):
        i, active, ended = carry[0], carry[4], carry[7]
        return (i < steps) & jnp.any(active) & (ended < refill_at)

    if chunk == 1:
        body = step
    else:
        body = lambda c: jax.lax.fori_loop(0, chunk, lambda _, x: step(x), c)  # noqa: E731
    init = (jnp.zeros((), jnp.int32), _map_cache(cache, layout.constrain), inputs.last_token, inputs.length,
            inputs.active, inputs.generated, jnp.zeros((n,), bool), jnp.zeros((), jnp.int32),
            jnp.zeros((n,), jnp.int32), jnp.full((n, width), pad_id, jnp.int32), jnp.zeros((n, width), jnp.float32))
    out = jax.lax.while_loop(cond, body, init)
    cache, generated, stopped, fed, tokens, logprobs = out[1], out[5], out[6], out[8], out[9], out[10]
    return cache, DecodeOut(tokens=tokens, logprobs=logprobs, count=generated - inputs.generated, stopped=stopped,
                            steps=out[0], fed=fed)


def abstract_args(model, slots: int, capacity: int, chunk: int, prefill_rows: int, layout: Layout,
                  feed: int = 32) -> dict[str, Any]:
    """Abstract arguments of the three programs (for `jax.export` / cost analysis in tests)."""
    graphdef, state = nnx.split(model)
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))  # noqa: E731
    abstract_state = jax.tree.map(spec, state)
    cache = jax.eval_shape(lambda s: empty_cache(nnx.merge(graphdef, s), slots, capacity, layout), abstract_state)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    key_width = jax.random.key_data(jax.random.key(0)).shape[-1]
    inputs = SlotInputs(last_token=i32(slots), length=i32(slots), active=jax.ShapeDtypeStruct((slots,), bool),
                        generated=i32(slots), budget=i32(slots), turn=i32(slots), row_id=i32(slots),
                        key_data=jax.ShapeDtypeStruct((slots, key_width), jnp.uint32),
                        sampling=RowSampling(f32(slots), i32(slots), f32(slots), f32(slots)),
                        forced=i32(slots, feed), forced_count=i32(slots))
    return dict(graphdef=graphdef, state=abstract_state, cache=cache, inputs=inputs, refill_at=i32(),
                prefill=(i32(prefill_rows), i32(prefill_rows, chunk), i32(prefill_rows), i32(prefill_rows)))
