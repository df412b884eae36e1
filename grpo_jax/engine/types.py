"""The engine's settings and records: `EngineConfig`, a request's `GenerationParams`, a turn's
`Completion`, an episode's `Session` (its history and the part of it in a slot's cache)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from grpo_jax.sampling import SamplingConfig, SamplingError
from grpo_jax.utils import dataclass_from


class EngineError(SamplingError):
    """Bad engine input (a history past `max_length`, a busy session, a released one)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    slots: int = 64                   # episodes decoded at once (rounded up to the row shards)
    max_length: int | None = None     # positions an episode may hold (its prompt and every turn);
                                      # None: the model's context
    prefill_chunk: int = 128          # tokens a slot prefills per call (C)
    prefill_rows: int = 16            # most slots prefilled per call (R; calls use a power of two)
    decode_steps: int = 16            # most decode steps per call (it returns early, see below)
    # Pending tokens up to this many (a tool reply) are fed by decode steps, one a step, instead of
    # a prefill call: no padded [rows, chunk] call, and the slot's row would be computed anyway.
    feed_tokens: int = 32
    # Steps between the decode loop's exit checks (`grpo_jax.platform`: 16 on GPU, where the
    # loop predicate goes to the host, 1 elsewhere).
    decode_chunk: int = 1
    # An idle session (between its turns: its tool is running) keeps its cache this long before a
    # waiting request may take its slot: evicting it at once would make every tool call cost a
    # prefill of the whole history when slots are scarce.
    evict_idle_s: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_id: int = 0
    gather_weights: bool = True       # as `SamplingConfig.gather_weights`

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in ("slots", "prefill_chunk", "prefill_rows", "decode_steps", "decode_chunk", "feed_tokens"):
            if getattr(self, name) < 1:
                raise EngineError(f"engine config: {name} must be >= 1 (got {getattr(self, name)})")
        if self.evict_idle_s < 0:
            raise EngineError(f"engine config: evict_idle_s must be >= 0 (got {self.evict_idle_s})")
        if self.max_length is not None and self.max_length < 2:
            raise EngineError(f"engine config: max_length must be None or >= 2 (got {self.max_length})")

    @classmethod
    def from_any(cls, config: "EngineConfig | Mapping[str, Any] | Any") -> "EngineConfig":
        return dataclass_from(cls, config, what="engine config", error=EngineError)


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """One turn's sampling: the `SamplingConfig` fields that may differ per request, and stop
    strings (matched on the decoded text; they need the engine's `detokenize`)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p, min_p=self.min_p)  # the same checks, the same errors
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError(f"stop strings must be non-empty strings (got {self.stop!r})")

    @classmethod
    def from_sampling(cls, cfg: SamplingConfig, **overrides) -> "GenerationParams":
        fields = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                      top_p=cfg.top_p, min_p=cfg.min_p)
        return cls(**{**fields, **overrides})


@dataclasses.dataclass
class Completion:
    """A turn's sampled tokens and their log-probs (the `sampling` convention), and why it ended:
    "stop" (a stop token, the last token), "stop_string" (the text holds a stop string; the
    token completing it is the last) or "length" (`max_new_tokens` or the slot's `max_length`)."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclasses.dataclass(eq=False)
class _Group:
    prefix: tuple[int, ...]           # the prompt but its last token: what members share
    members: list["Session"] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class Session:
    """One episode on the engine: its token history, how much of it is in its slot's cache."""

    row_id: int
    key_data: np.ndarray
    tokens: list[int]
    group: _Group | None = None
    cached: int = 0                   # tokens of `tokens` in the slot's cache (a prefix)
    slot: int | None = None
    turn: int = 0                     # generate calls so far (turn k draws with fold_in(key, k))
    busy: bool = False
    released: bool = False
    last_used: float = 0.0            # when its last turn ended (time.monotonic())


@dataclasses.dataclass(eq=False)
class _Request:
    session: Session
    params: GenerationParams
    future: asyncio.Future
    budget: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    queued: bool = True               # waiting for a slot
    on_tokens: Callable[[list[int], list[float]], None] | None = None
