"""Between OpenAI chat messages and token ids: prompt messages for the chat template, the
completion's text (stop token and stop strings cut), its tool calls in OpenAI form, streamed
text deltas, and per-token log-prob entries."""

from __future__ import annotations

import functools
import json
import re
import uuid
from typing import Any, Callable, Sequence

from grpo_jax.envs.tool_calls import PYTHON_TAG, make_call_parser, parser_for_tokenizer
from grpo_jax.serve.protocol import APIError, Message

ROLES = {"system", "developer", "user", "assistant", "tool"}


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(f"{where}: only text content parts are supported (got type {part.get('type')!r})",
                           param=where)
        parts.append(part["text"])
    return "".join(parts)


def prompt_messages(messages: Sequence[Message], call_parser, template_renders_calls: bool) -> list[dict]:
    """The request's messages as the chat template takes them. An assistant message's
    `tool_calls` go to the template as HF templates read them (arguments as an object) when the
    template renders `tool_calls`, else they are written into its content in the model's call
    format (what the model would have sampled)."""
    if not messages:
        raise APIError("messages must hold at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role not in ROLES:
            raise APIError(f"{where}: unknown role {m.role!r} (one of {sorted(ROLES)})", param=f"{where}.role")
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role, "content": _text(m.content, f"{where}.content")}
        if m.content is None and role != "assistant":
            raise APIError(f"{where}: a {role} message needs content", param=f"{where}.content")
        if m.name is not None:
            message["name"] = m.name
        if role == "tool" and m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            if role != "assistant":
                raise APIError(f"{where}: only assistant messages carry tool_calls", param=f"{where}.tool_calls")
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError as e:
                    raise APIError(f"{where}.tool_calls[{j}]: arguments are not JSON ({e.msg})",
                                   param=f"{where}.tool_calls") from None
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            if template_renders_calls:
                message["tool_calls"] = calls
            else:
                message["content"] += "".join(call_parser.format_call(c["function"]["name"], c["function"]["arguments"])
                                              for c in calls)
        out.append(message)
    return out


def call_parser_for(tokenizer, fmt: str = "auto"):
    """The tool-call format of the tokenizer's template ("auto": Hermes `<tool_call>` when the
    template does not tell), or a named one."""
    if fmt == "auto":
        return parser_for_tokenizer(tokenizer, default="hermes")
    return make_call_parser(fmt)


def tool_calls_of(text: str, call_parser) -> tuple[str | None, list[dict]]:
    """(content, OpenAI tool calls) of a completion's text. Calls that do not parse leave the
    text as plain content (the client sees what the model wrote)."""
    calls = call_parser.parse(text)
    if not calls or any(c.error is not None for c in calls):
        return text, []
    content = text
    for c in calls:
        content = content.replace(c.raw, "", 1)
    content = content.replace(PYTHON_TAG, "").strip()
    openai_calls = [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                     "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for c in calls]
    return content or None, openai_calls


def visible_ids(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The completion without its trailing stop token (the end of turn is not content)."""
    tokens = list(tokens)
    return tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string (not included), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may begin a stop string (not sent yet)."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class TextStream:
    """Text deltas of a streamed completion whose concatenation is the final content: the
    text is sent only where it cannot change any more (a trailing partial UTF-8 character, the
    start of a possible stop string and a trailing stop token are held back)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop_ids: Sequence[int], stops: Sequence[str]):
        self.decode, self.stop_ids, self.stops = decode, tuple(stop_ids), tuple(stops)
        self.ids: list[int] = []
        self.sent = ""
        self.cut = False

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        if self.cut:
            return ""
        text, self.cut = cut_at_stop(self.decode(visible_ids(self.ids, self.stop_ids)), self.stops)
        if not self.cut:
            text = text[:len(text) - _held_back(text, self.stops)]
        text = text.rstrip("\ufffd")
        if not text.startswith(self.sent):
            return ""  # a decode that rewrote earlier text: wait for the final one
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, content: str) -> str:
        if not content.startswith(self.sent):
            raise RuntimeError("streamed text is not a prefix of the completion's text")
        delta, self.sent = content[len(self.sent):], content
        return delta


# -- per-token log-prob entries ------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """The byte-level BPE alphabet (each byte a printable character) inverted: char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """The text and UTF-8 bytes of single tokens (a byte-level token may be part of a
    character: its bytes are exact where its text is U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        hf = getattr(tokenizer, "hf", None)
        decoder = getattr(getattr(hf, "backend_tokenizer", None), "decoder", None)
        self._byte_level = hf is not None and type(decoder).__name__ == "ByteLevel"
        self._added = set(getattr(hf, "added_tokens_decoder", {}) or {}) if hf is not None else set()

    @functools.lru_cache(maxsize=1 << 16)
    def entry(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        text = self.tokenizer.decode([token_id])
        raw = None
        if self._byte_level and token_id not in self._added:
            piece = self.tokenizer.hf.convert_ids_to_tokens(token_id)
            table = _byte_level_table()
            if piece is not None and all(ch in table for ch in piece):
                raw = bytes(table[ch] for ch in piece)
        elif hasattr(self.tokenizer, "sp"):  # SentencePiece byte fallback: pieces <0xNN>
            match = _BYTE_PIECE.fullmatch(self.tokenizer.sp.id_to_piece(token_id))
            if match:
                raw = bytes([int(match.group(1), 16)])
        return text, tuple(raw if raw is not None else text.encode("utf-8"))

    def logprobs_content(self, ids: Sequence[int], logprobs: Sequence[float]) -> list[dict]:
        out = []
        for t, lp in zip(ids, logprobs):
            text, raw = self.entry(int(t))
            out.append({"token": text, "logprob": float(lp), "bytes": list(raw), "top_logprobs": []})
        return out
