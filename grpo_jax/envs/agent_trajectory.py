"""An agent episode's training row from what the server recorded (pure functions, no model).

The server records every completion an episode asked for (`grpo_jax.serve.Record`: the exact
prompt ids, the completion ids with their stop token, their log-probs, the temperature), in
order. `assemble` joins them into one row, re-tokenizing nothing:

    a request whose prompt starts with the previous request's whole sequence (its prompt and
    completion) extends it: the prompt's new tokens (tool results, user turns, the chat
    template's markup) are env tokens (mask 0, log-prob 0), the completion the model's (mask 1,
    the recorded log-probs);
    any other request (a fresh conversation, a rewritten history, text that does not re-encode
    to the sampled ids) starts a new segment holding its whole prompt as env tokens. Segments
    are packed into the same row (`pack_episodes(segments=...)`: positions restart, attention
    stays within a segment) and share the episode's advantage.

A completion sampled at another temperature than the trainer's keeps its tokens as context but
gets mask 0: its log-probs are not the policy's at the training temperature, so the importance
ratio would be wrong. Model tokens past `max_model_tokens` (the trainer's loss-token budget of a
row: max_new_tokens x max_turns) stay as context, untrained, and are counted. A row longer than
`max_seq_len` is cut there (later tokens dropped) and flagged `truncated`: the rollout ends it
"sequence_budget".

    records  [p1 | c1]  [p1 c1 + r1 | c2]  [q1 | d1]
    row       p1 c1 r1 c2 | q1 d1            segments [len(p1 c1 r1 c2), len(q1 d1)]
    mask      0  1  0  1  | 0  1
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # the serve package imports the web stack; only its Record's fields are read here
    from grpo_jax.serve.recorder import Record


@dataclasses.dataclass
class AgentTrajectory:
    """One episode's row: `tokens`, `mask` (1 on trained model tokens), `logprobs` (the
    sampler's, 0 elsewhere), `segments` (token counts, summing to len(tokens)) and counts."""

    tokens: list[int]
    mask: list[int]
    logprobs: list[float]
    segments: list[int]
    requests: int = 0             # completions recorded
    non_prefix: int = 0           # requests that did not extend the previous one (new segments)
    off_temperature: int = 0      # completions left untrained: sampled at another temperature
    over_budget: int = 0          # model tokens left untrained: past max_model_tokens
    truncated: bool = False       # cut at max_seq_len
    dropped_tokens: int = 0       # tokens past max_seq_len

    @property
    def model_tokens(self) -> int:
        return sum(self.mask)


def _same_temperature(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def assemble(records: Sequence["Record"], *, max_seq_len: int | None = None, temperature: float | None = None,
             max_model_tokens: int | None = None) -> AgentTrajectory:
    """The row of an episode's `records` (in request order; see the module docstring).
    `temperature`: the trainer's sampling temperature (None: every completion is trained);
    `max_model_tokens`: the most trained model tokens of a row (None: no bound)."""
    out = AgentTrajectory([], [], [], [])
    previous: list[int] = []  # the current segment's last request: prompt + completion
    for record in records:
        prompt, completion = list(record.prompt_ids), list(record.completion_ids)
        if len(record.logprobs) != len(completion):
            raise ValueError(f"a record holds {len(completion)} completion ids but {len(record.logprobs)} log-probs")
        if previous and prompt[:len(previous)] == previous:
            new = prompt[len(previous):]
        else:
            if previous:
                out.non_prefix += 1
            out.segments.append(0)
            new = prompt
        trained = temperature is None or _same_temperature(record.temperature, temperature)
        out.off_temperature += not trained
        room = len(completion) if max_model_tokens is None else max(max_model_tokens - sum(out.mask), 0)
        kept = min(len(completion), room) if trained else 0
        out.over_budget += len(completion) - kept if trained else 0
        out.tokens += new + completion
        out.mask += [0] * len(new) + [1] * kept + [0] * (len(completion) - kept)
        out.logprobs += ([0.0] * len(new) + [float(x) for x in record.logprobs[:kept]]
                         + [0.0] * (len(completion) - kept))
        out.segments[-1] += len(new) + len(completion)
        out.requests += 1
        previous = prompt + completion
    if max_seq_len is not None and len(out.tokens) > max_seq_len:
        out.truncated, out.dropped_tokens = True, len(out.tokens) - max_seq_len
        del out.tokens[max_seq_len:], out.mask[max_seq_len:], out.logprobs[max_seq_len:]
        kept, room = [], max_seq_len
        for n in out.segments:
            if room > 0:
                kept.append(min(n, room))
            room -= n
        out.segments = kept
    return out


def message(m) -> dict:
    """An OpenAI message (a dict or the SDK's object) as the rubrics read messages: role and text
    content (parts joined, None as ""), with tool calls and ids kept when present."""
    m = m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else dict(m)
    content = m.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    out = {"role": str(m.get("role", "")), "content": "" if content is None else str(content)}
    for key in ("tool_calls", "tool_call_id", "name"):
        if m.get(key):
            out[key] = m[key]
    return out


def _key(m: dict) -> tuple[str, str]:
    return m["role"], m["content"]  # what an agent echoes back of a reply, whatever else it drops


def conversation(exchanges: Sequence[tuple[Sequence, dict | None]]) -> list[dict]:
    """The messages an episode exchanged, from its (request messages, reply message or None)
    pairs in order: a request that repeats the conversation so far adds only its new messages;
    any other (a fresh conversation) adds all of its messages after what came before."""
    out: list[dict] = []
    for messages, reply in exchanges:
        messages = [message(m) for m in messages]
        same = [_key(m) for m in messages[:len(out)]] == [_key(m) for m in out]
        out += messages[len(out):] if same else messages
        if reply is not None:
            out.append(message(reply))
    return out
