"""The rollout engine: continuous batching over a fixed set of KV-cache slots, each episode's
cache kept across its turns, one async API.

    engine = Engine(model, EngineConfig(slots=64, max_length=1024, stop_token_ids=(eos,)))
    sessions = engine.open(prompt_ids, row_ids=[0, 1, 2, 3], key=key)    # a group of 4
    done = await engine.generate(sessions[0], (), GenerationParams(max_new_tokens=64))
    more = await engine.generate(sessions[0], tool_reply_ids, params)    # prefills only these
    engine.release(sessions[0])

Why fixed slots and not a paged cache: a slot is one row of the sampler's own [rows, heads,
positions] cache, so the decode step is the model's `decode` on a batch of rows (the same
numerics as the trainer's forward and the lockstep sampler), lowers on every platform without
a paged-attention kernel, and shards over the mesh exactly as the sampler's rows do. The cost is
capacity: a slot reserves `max_length` positions whether the episode uses them or not (paging
would pack short episodes tighter); `slots` is the knob (`docs/engine.md`).

The scheduler (`_run`, one task on the caller's event loop) repeats, while requests remain:
admit waiting requests into free slots (evicting the least recently used idle session when
none is free: its next turn prefills its history again); copy a group's prompt prefill onto
members that join it; prefill up to `prefill_rows` x `prefill_chunk` pending tokens; run
`decode_steps` steps of every slot; hand finished turns back. Device calls run in a worker
thread, so the event loop stays free for environments and tools: an episode awaiting a tool
holds its slot (and cache) but no other episode waits for it.

Random draws: token t of turn k of the episode with id r under key K is drawn with
`fold_in(fold_in(fold_in(K, k), t), r)`, the number `sampling.generate` draws for row r with
key `fold_in(K, k)`: an episode samples the same tokens in any slot, next to any other episodes,
on any process.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from grpo_jax import sharding as sharding_lib
from grpo_jax.engine import programs
from grpo_jax.engine.types import (Completion, EngineConfig, EngineError, GenerationParams, Session, _Group,
                                   _Request)
from grpo_jax.sampling import Layout, SamplingConfig, _fuse, _token_ids, sampling_model
from grpo_jax.token_selection import RowSampling
from grpo_jax.utils import round_up

logger = logging.getLogger(__name__)


class Engine:
    """Continuous batching on `model` (see the module docstring). `detokenize(ids) -> str` is
    needed only for stop strings. The weights are read as the sampler reads them
    (`sampling.sampling_model`, made here once); make a new engine for new weights."""

    def __init__(self, model, config: EngineConfig | Mapping[str, Any], *,
                 detokenize: Callable[[Sequence[int]], str] | None = None, rules=sharding_lib.DEFAULT_RULES):
        cfg = EngineConfig.from_any(config)
        mcfg = model.config
        cfg = dataclasses.replace(cfg, max_length=cfg.max_length or mcfg.max_position_embeddings)
        if cfg.max_length > mcfg.max_position_embeddings:
            raise EngineError(f"engine max_length {cfg.max_length} exceeds the model's context "
                              f"{mcfg.max_position_embeddings}")
        for t in cfg.stop_token_ids:
            if not 0 <= t < mcfg.vocab_size:
                raise EngineError(f"stop token id {t} is outside the vocabulary [0, {mcfg.vocab_size})")
        model = sampling_model(model, gather_weights=cfg.gather_weights, rules=rules)
        self.graphdef, self.state = nnx.split(model)
        self.layout = Layout(sharding_lib.mesh_of(self.state), tuple(rules))
        self.config = cfg = dataclasses.replace(cfg, slots=round_up(cfg.slots, self.layout.row_shards))
        self.vocab_size = mcfg.vocab_size
        # A chunk's padding may run past max_length; a multiple of 16 is what the GPU decode
        # kernel's blocks need (`models.attention.decode_blocks`).
        self.capacity = round_up(cfg.max_length + cfg.prefill_chunk, 16)
        self.detokenize = detokenize
        self._fuse = _fuse(self.layout, SamplingConfig(gather_weights=cfg.gather_weights))
        self._cache = None
        self._key_width = jax.random.key_data(jax.random.key(0)).shape[-1]
        self._owner: list[Session | None] = [None] * cfg.slots
        self._requests: list[_Request] = []
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self.stats = collections.Counter()

    # -- public API -----------------------------------------------------------------------------
    def open(self, prompt_ids: Sequence[int], row_ids: Sequence[int], key) -> list[Session]:
        """Sessions of one prompt, one per id in `row_ids` (a GRPO group: the prompt is prefilled
        once and copied to the others). `key`: a `jax.random` key (the episodes' draws)."""
        prompt = self._checked(prompt_ids, "prompt")
        if not prompt:
            raise EngineError("the prompt is empty (it needs at least one token, e.g. BOS)")
        if len(prompt) >= self.config.max_length:
            raise EngineError(f"the prompt has {len(prompt)} tokens: no room to sample in max_length="
                              f"{self.config.max_length}")
        key_data = np.asarray(jax.random.key_data(key), np.uint32)
        group = _Group(tuple(prompt[:-1])) if len(row_ids) > 1 else None
        sessions = [Session(int(r), key_data, list(prompt), group) for r in row_ids]
        if group is not None:
            group.members.extend(sessions)
        return sessions

    async def generate(self, session: Session, new_ids: Sequence[int] = (),
                       params: GenerationParams | None = None, *,
                       on_tokens: Callable[[list[int], list[float]], None] | None = None) -> Completion:
        """Appends `new_ids` to the session's history (e.g. an env reply), then samples one turn.
        The history's part already in the session's cache is not computed again. `on_tokens(ids,
        logprobs)` is called on the event loop with each batch of new tokens as they come
        (streaming); with stop strings, tokens past the stop string may have been passed to it
        before the turn ends (the `Completion` is what counts)."""
        params = params or GenerationParams()
        if session.released:
            raise EngineError("generate on a released session")
        if session.busy:
            raise EngineError("the session is already generating (one turn at a time)")
        if params.stop and self.detokenize is None:
            raise EngineError("stop strings need the engine's detokenize")
        new_ids = self._checked(new_ids, "new_ids")
        room = self.config.max_length - len(session.tokens) - len(new_ids)
        if room < 1:
            raise EngineError(f"the history would hold {len(session.tokens) + len(new_ids)} tokens: no room to "
                              f"sample in max_length={self.config.max_length}")
        session.tokens.extend(new_ids)
        session.busy = True
        request = _Request(session, params, asyncio.get_running_loop().create_future(),
                           budget=min(params.max_new_tokens, room), queued=session.slot is None, on_tokens=on_tokens)
        self._requests.append(request)
        self._ensure_running()
        try:
            return await request.future
        finally:  # a cancelled turn leaves the schedule; its session keeps what was sampled
            if request in self._requests:
                self._requests.remove(request)
            session.busy = False
            session.last_used = time.monotonic()

    def release(self, session: Session) -> None:
        """Frees the session's slot (its cache); the session cannot generate again. A turn it
        has under way is cancelled."""
        for r in [r for r in self._requests if r.session is session]:
            self._requests.remove(r)
            r.future.cancel()
        if session.slot is not None:
            self._owner[session.slot] = None
            session.slot = None
        session.released, session.cached = True, 0
        if self._wake is not None:
            self._wake.set()

    def warmup(self, params: Sequence[GenerationParams] = (GenerationParams(),)) -> None:
        """Compiles every program this engine can run (each prefill shape, the copy, the decode
        of each filter set `params` use) by running it with nothing to do: prefill rows aimed
        past the last slot (their writes are dropped), no copies, no active slot. Otherwise a
        program compiles the first time a request needs its shape, inside someone's turn."""
        cfg = self.config
        cache = self._cache_ready()
        shapes = {self._prefill_shape(rows, longest) for rows in range(1, cfg.prefill_rows + 1)
                  for longest in range(1, cfg.prefill_chunk + 1)}
        for r, c in sorted(shapes):
            nowhere = np.full(r, cfg.slots, np.int32)  # rows aimed past the last slot: writes dropped
            cache = programs.prefill_chunk(self.graphdef, self.state, cache, *map(self._put, (
                nowhere, np.zeros((r, c), np.int32), np.zeros(r, np.int32), np.zeros(r, np.int32))),
                layout=self.layout)
        zeros = np.zeros(cfg.slots, np.int32)
        cache = programs.copy_slots(cache, zeros, zeros, np.int32(0), layout=self.layout)
        inputs = programs.SlotInputs(
            *map(self._put, (zeros, zeros, np.zeros(cfg.slots, bool), zeros, zeros, zeros, zeros,
                             np.zeros((cfg.slots, self._key_width), np.uint32))),
            sampling=RowSampling(*map(self._put, (np.ones(cfg.slots, np.float32), zeros, np.ones(cfg.slots, np.float32),
                                                  np.zeros(cfg.slots, np.float32)))),
            forced=self._put(np.zeros((cfg.slots, cfg.feed_tokens), np.int32)), forced_count=self._put(zeros))
        for filters in sorted({(p.top_k > 0, p.top_p < 1, p.min_p > 0) for p in params}):
            cache, _ = programs.decode_steps(
                self.graphdef, self.state, cache, inputs, np.int32(1), steps=cfg.decode_steps,
                chunk=cfg.decode_chunk, stop_ids=cfg.stop_token_ids, filters=filters, pad_id=cfg.pad_id,
                fuse=self._fuse, layout=self.layout)
        self._cache = jax.block_until_ready(cache)

    # -- input checks ---------------------------------------------------------------------------
    def _checked(self, ids, what: str) -> list[int]:
        ids = _token_ids(0, ids)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(f"{what} holds token id {bad[0]}, outside the vocabulary [0, {self.vocab_size})")
        return ids

    # -- the scheduler ----------------------------------------------------------------------------
    def _ensure_running(self):
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        self._wake.set()

    async def _run(self):
        try:
            while self._requests:
                self._admit()
                chunk = self._plan_prefill()
                if chunk:
                    await self._prefill(chunk)
                copies = self._plan_copies()  # after the prefill: a group's prompt is ready at once
                if copies:
                    await self._copy(copies)
                decoding = [r for r in self._requests if self._phase(r) == "decode"]
                if decoding:
                    out, slots = await self._decode(decoding)
                    self._deliver(decoding, out, slots)
                if not (copies or chunk or decoding):
                    self._wake.clear()
                    try:  # a new request or a released slot wakes it; so does an idle session's expiry
                        await asyncio.wait_for(self._wake.wait(), self._eviction_wait())
                    except asyncio.TimeoutError:
                        pass
                else:
                    await asyncio.sleep(0)  # let episodes and tools run between calls
        except BaseException as error:  # fail every waiting turn rather than hang it
            for r in self._requests:
                if not r.future.done():
                    r.future.set_exception(error if isinstance(error, Exception) else RuntimeError(repr(error)))
            self._requests.clear()
            if not isinstance(error, Exception):
                raise

    def _admit(self):
        for r in [r for r in self._requests if r.queued]:
            slot = self._free_slot()
            if slot is None:
                return
            self._owner[slot], r.session.slot, r.session.cached, r.queued = r.session, slot, 0, False
            self.stats["admitted"] += 1

    def _free_slot(self) -> int | None:
        for slot, owner in enumerate(self._owner):
            if owner is None:
                return slot
        now = time.monotonic()
        idle = [s for s in self._owner if s is not None and not s.busy
                and now - s.last_used >= self.config.evict_idle_s]
        if not idle:
            return None
        victim = min(idle, key=lambda s: s.last_used)  # its next turn prefills its history again
        slot, victim.slot, victim.cached = victim.slot, None, 0
        self._owner[slot] = None
        self.stats["evictions"] += 1
        return slot

    def _eviction_wait(self) -> float | None:
        """Seconds until an idle session may be evicted, when a queued request waits for one."""
        if not any(r.queued for r in self._requests):
            return None
        idle = [s.last_used for s in self._owner if s is not None and not s.busy]
        if not idle:
            return None
        return max(0.0, min(idle) + self.config.evict_idle_s - time.monotonic()) + 1e-3

    def _donor(self, session: Session) -> Session | None:
        """A group member whose cache holds the shared prompt prefix, if any."""
        group = session.group
        if group is None or session.cached > 0 or not group.prefix:
            return None
        for m in group.members:
            if m is not session and m.slot is not None and m.cached >= len(group.prefix):
                return m
        return None

    def _prefiller(self, group: _Group) -> Session | None:
        """The group member that prefills the shared prompt: one already under way, else the
        first admitted member still without it."""
        without = [m for m in group.members if m.slot is not None and m.busy and m.cached < len(group.prefix)]
        started = [m for m in without if m.cached > 0]
        return (started or without or [None])[0]

    def _phase(self, r: _Request) -> str:
        s = r.session
        if r.queued:
            return "queued"
        if self._donor(s) is not None:
            return "copy"
        if s.group is not None and s.cached == 0 and s.group.prefix and self._prefiller(s.group) is not s:
            return "wait"  # a member is prefilling the shared prompt
        return "prefill" if len(s.tokens) - s.cached - 1 > self._feedable(s) else "decode"

    def _feedable(self, s: Session) -> int:
        """Pending tokens decode steps may feed: a continuation's (a tool reply); a prompt is
        prefilled (a group waits for it, and one call beats one step per token there)."""
        return self.config.feed_tokens if s.turn > 0 and s.cached > 0 else 0

    def _plan_copies(self) -> list[tuple[Session, Session]]:
        return [(self._donor(r.session), r.session) for r in self._requests if self._phase(r) == "copy"]

    def _plan_prefill(self) -> list[tuple[Session, int]]:
        cfg = self.config
        todo = [r.session for r in self._requests if self._phase(r) == "prefill"]
        # Prefill down to what decode steps feed (a reply's last feed_tokens ride along with decoding).
        return [(s, min(cfg.prefill_chunk, len(s.tokens) - 1 - s.cached - self._feedable(s))) for s in
                todo[: cfg.prefill_rows]]

    # -- device calls (in a worker thread; the host state is touched only on the loop) ------------
    def _cache_ready(self):
        if self._cache is None:
            self._cache = programs.init_cache(self.graphdef, self.state, slots=self.config.slots,
                                              capacity=self.capacity, layout=self.layout)
        return self._cache

    def _put(self, x):
        x = np.asarray(x)
        if self.layout.mesh is None:
            return x
        axes = ("batch",) + (None,) * (x.ndim - 1)
        return jax.device_put(x, self.layout.sharding(axes, x.shape))

    # Each call's inputs are read from the host state on the event loop, the device call runs in
    # a worker thread (the loop stays free), and its results are applied on the loop again, to
    # sessions still in the slot they had: a turn cancelled (and its session released) during
    # the call is left alone.
    async def _on_device(self, call):
        t0 = time.perf_counter()
        self._cache, out = await asyncio.to_thread(call, self._cache_ready())
        self.stats["busy_s"] += time.perf_counter() - t0
        return out

    async def _copy(self, pairs):
        src, dst = np.zeros(self.config.slots, np.int32), np.zeros(self.config.slots, np.int32)
        for i, (donor, member) in enumerate(pairs):
            src[i], dst[i] = donor.slot, member.slot
        count = np.int32(len(pairs))
        await self._on_device(lambda cache: (programs.copy_slots(cache, src, dst, count, layout=self.layout), None))
        for (_, member), slot in zip(pairs, dst):
            if member.slot == slot:
                member.cached = len(member.group.prefix)
        self.stats["copies"] += len(pairs)

    def _prefill_shape(self, rows: int, longest: int) -> tuple[int, int]:
        """The prefill program's [R, C] for `rows` slots of at most `longest` new tokens: a few
        shapes only, R a power of two (at most prefill_rows), C the chunk, a quarter or a 16th."""
        cfg = self.config
        r = min(1 << (rows - 1).bit_length(), cfg.prefill_rows)
        c = cfg.prefill_chunk
        while c % 4 == 0 and c // 4 >= 8 and longest <= c // 4 and c > cfg.prefill_chunk // 16:
            c //= 4
        return r, c

    async def _prefill(self, chunk):
        cfg = self.config
        r, c = self._prefill_shape(len(chunk), max(n for _, n in chunk))
        slots = np.full(r, cfg.slots, np.int32)
        tokens = np.full((r, c), cfg.pad_id, np.int32)
        starts, counts = np.zeros(r, np.int32), np.zeros(r, np.int32)
        for i, (s, n) in enumerate(chunk):
            slots[i], starts[i], counts[i] = s.slot, s.cached, n
            tokens[i, :n] = s.tokens[s.cached:s.cached + n]
        args = tuple(map(self._put, (slots, tokens, starts, counts)))
        await self._on_device(lambda cache: (programs.prefill_chunk(self.graphdef, self.state, cache, *args,
                                                                    layout=self.layout), None))
        for (s, n), slot, start in zip(chunk, slots, starts):
            if s.slot == slot and s.cached == start:
                s.cached += n
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += int(counts.sum())
        self.stats["prefill_positions"] += r * c

    async def _decode(self, decoding):
        cfg = self.config
        n = cfg.slots
        last, length, generated, budget, turn, row_id = (np.zeros(n, np.int32) for _ in range(6))
        active = np.zeros(n, bool)
        key_data = np.zeros((n, self._key_width), np.uint32)
        temperature, top_p, min_p = np.ones(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.float32)
        top_k = np.zeros(n, np.int32)
        for slot, s in enumerate(self._owner):
            if s is not None:
                length[slot] = s.cached  # idle slots write past their own history only
        forced, forced_count = np.zeros((n, cfg.feed_tokens), np.int32), np.zeros(n, np.int32)
        for r in decoding:
            s, p, slot = r.session, r.params, r.session.slot
            pending = s.tokens[s.cached:]  # fed first, then sampling starts
            forced[slot, :len(pending) - 1], forced_count[slot] = pending[1:], len(pending) - 1
            last[slot], active[slot], generated[slot], budget[slot] = pending[0], True, len(r.tokens), r.budget
            turn[slot], row_id[slot], key_data[slot] = s.turn, s.row_id, s.key_data
            temperature[slot], top_k[slot], top_p[slot], min_p[slot] = p.temperature, p.top_k, p.top_p, p.min_p
        filters = (bool((top_k[active] > 0).any()), bool((top_p[active] < 1).any()), bool((min_p[active] > 0).any()))
        inputs = programs.SlotInputs(*map(self._put, (last, length, active, generated, budget, turn, row_id, key_data)),
                                     sampling=RowSampling(*map(self._put, (temperature, top_k, top_p, min_p))),
                                     forced=self._put(forced), forced_count=self._put(forced_count))
        refill_at = np.int32(max(1, len(decoding) // 8))  # return once an eighth of the turns ended

        def call(cache):
            cache, out = programs.decode_steps(
                self.graphdef, self.state, cache, inputs, refill_at, steps=cfg.decode_steps, chunk=cfg.decode_chunk,
                stop_ids=cfg.stop_token_ids, filters=filters, pad_id=cfg.pad_id, fuse=self._fuse, layout=self.layout)
            return cache, jax.device_get(out)

        out = await self._on_device(call)
        self.stats["decode_steps"] += int(out.steps)
        self.stats["decode_calls"] += 1
        self.stats["slot_steps"] += n * int(out.steps)
        self.stats["sampled_tokens"] += int(out.count.sum())
        self.stats["fed_tokens"] += int(out.fed.sum())
        return out, [r.session.slot for r in decoding]

    # -- results ----------------------------------------------------------------------------------
    def _deliver(self, decoding, out: programs.DecodeOut, slots):
        for r, slot in zip(decoding, slots):
            s = r.session
            if r not in self._requests or s.slot != slot:  # cancelled (or released) during the call
                continue
            k = int(out.count[slot])
            new = [int(t) for t in out.tokens[slot, :k]]
            s.tokens.extend(new)
            s.cached += int(out.fed[slot]) + k  # each step cached the token it fed; the newest is pending
            r.tokens.extend(new)
            r.logprobs.extend(float(x) for x in out.logprobs[slot, :k])
            if r.on_tokens is not None and k:
                try:
                    r.on_tokens(new, r.logprobs[-k:])
                except Exception:  # a streaming consumer's failure is its own
                    logger.exception("engine: on_tokens callback raised")
            reason = self._finished(r, bool(out.stopped[slot]))
            if reason is None:
                continue
            if reason == "stop_string":  # keep the tokens up to the one completing the stop string
                end = self._stop_string_end(r)
                del s.tokens[len(s.tokens) - (len(r.tokens) - end):], r.tokens[end:], r.logprobs[end:]
                s.cached = min(s.cached, len(s.tokens) - 1)
            s.turn += 1
            self._requests.remove(r)
            if not r.future.done():
                r.future.set_result(Completion(list(r.tokens), list(r.logprobs), reason))

    def _finished(self, r: _Request, stopped: bool) -> str | None:
        if stopped:
            return "stop"
        if r.params.stop and self._stop_string_end(r) is not None:
            return "stop_string"
        return "length" if len(r.tokens) >= r.budget else None

    def _stop_string_end(self, r: _Request) -> int | None:
        """Tokens up to the one whose text completes the first stop string, or None."""
        text = self.detokenize(r.tokens)
        if not any(stop in text for stop in r.params.stop):
            return None
        for end in range(1, len(r.tokens) + 1):
            if any(stop in self.detokenize(r.tokens[:end]) for stop in r.params.stop):
                return end
        return len(r.tokens)
