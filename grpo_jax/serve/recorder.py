"""What the server sampled, kept per episode for whoever trains on it (agent environments)."""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Sequence

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Record:
    """One sampled completion: the exact prompt ids it continued, its ids (a trailing stop token
    included) and their log-probs (log softmax(z / temperature) of each sampled token)."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str = ""
    temperature: float = 1.0


class Recorder:
    """Records per episode id, in the order they were made. Thread-safe: the server records on
    its event loop, a trainer pops from its own thread. At most `max_episodes` episodes are
    kept (the oldest is dropped with a warning), so a client that never pops cannot exhaust
    memory."""

    def __init__(self, max_episodes: int = 100_000):
        self.max_episodes = max_episodes
        self._episodes: collections.OrderedDict[str, list[Record]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def record(self, episode_id: str, prompt_ids: Sequence[int], completion_ids: Sequence[int],
               logprobs: Sequence[float], *, finish_reason: str = "", temperature: float = 1.0) -> None:
        rec = Record(tuple(int(t) for t in prompt_ids), tuple(int(t) for t in completion_ids),
                     tuple(float(x) for x in logprobs), finish_reason, float(temperature))
        with self._lock:
            self._episodes.setdefault(str(episode_id), []).append(rec)
            while len(self._episodes) > self.max_episodes:
                dropped, _ = self._episodes.popitem(last=False)
                logger.warning("recorder: dropped the records of episode %r (over %d episodes kept)",
                               dropped, self.max_episodes)

    def pop(self, episode_id: str) -> list[Record]:
        """The episode's records, oldest first (an empty list when none), forgotten here."""
        with self._lock:
            return self._episodes.pop(str(episode_id), [])

    def peek(self, episode_id: str) -> list[Record]:
        with self._lock:
            return list(self._episodes.get(str(episode_id), []))

    def episodes(self) -> list[str]:
        with self._lock:
            return list(self._episodes)
