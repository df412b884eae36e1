"""Parsers for XML-tagged answers ("<think>...</think><answer>...</answer>").

Completions are either a string or a list of chat messages ({"role", "content"}); every
helper here accepts both and, for a message list, looks at the *last assistant message*
(the final answer of a multi-turn episode).

Parsing rules of `XMLParser`, chosen so that the common reward hacks parse as "no answer":
  * a field is read only if it occurs exactly once as a well-formed `<f>...</f>` pair:
    several `<answer>` tags, nested tags, or an unclosed tag give None;
  * "hidden" fields (by default `think`) are cut out of the text before any other field is
    read, so an answer written only inside the thinking does not count;
  * the strict format is the whole message being exactly the fields in order (optional
    fields may be missing), separated by whitespace, with no stray field tags inside; the
    lenient format only asks for a readable, non-empty answer field.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

Message = Mapping[str, str]
Completion = str | Sequence[Message]


def assistant_texts(completion: Completion) -> list[str]:
    """Contents of all assistant messages (a string counts as one assistant message)."""
    if isinstance(completion, str):
        return [completion]
    return [str(m.get("content", "")) for m in completion if m.get("role") == "assistant"]


def last_assistant_text(completion: Completion) -> str:
    """Content of the last assistant message ("" when there is none)."""
    texts = assistant_texts(completion)
    return texts[-1] if texts else ""


class XMLParser:
    """Reads `<field>...</field>` sections from the last assistant message.

    Args:
      fields: the fields of the format, in the order the strict format requires them.
      answer_field: the field holding the final answer (`parse_answer`).
      optional: fields the strict format allows to be absent.
      hidden: tags (fields or not) whose content is removed before other fields are read.
    """

    def __init__(self, fields: Sequence[str] = ("think", "answer"), *, answer_field: str = "answer",
                 optional: Sequence[str] = ("think",), hidden: Sequence[str] = ("think",)):
        if answer_field not in fields:
            raise ValueError(f"answer field {answer_field!r} not in fields {fields}")
        self.fields = tuple(fields)
        self.answer_field = answer_field
        self.optional = tuple(f for f in optional if f in fields)
        self.hidden = tuple(hidden)
        any_tag = "|".join(re.escape(f) for f in self.fields)
        # Content of one field in the strict format: no tag of any known field inside.
        body = rf"(?:(?!</?(?:{any_tag})>)[\s\S])*?"
        parts = []
        for f in self.fields:
            part = rf"<{f}>{body}</{f}>\s*"
            parts.append(f"(?:{part})?" if f in self.optional else part)
        self._strict_re = re.compile(r"^\s*" + "".join(parts) + r"$")

    def __repr__(self):
        return f"XMLParser(fields={self.fields}, answer_field={self.answer_field!r})"

    # -- reading fields -----------------------------------------------------------------
    def _visible_text(self, text: str, field: str) -> str:
        for h in self.hidden:
            if h != field:
                text = re.sub(rf"<{h}>[\s\S]*?(?:</{h}>|$)", " ", text)
        return text

    def parse_text(self, text: str) -> dict[str, str | None]:
        """{field: stripped content or None} for one message text."""
        out = {}
        for f in self.fields:
            visible = self._visible_text(text, f)
            opens, closes = visible.count(f"<{f}>"), visible.count(f"</{f}>")
            match = re.search(rf"<{f}>([\s\S]*?)</{f}>", visible)
            out[f] = match.group(1).strip() if (opens == 1 and closes == 1 and match) else None
        return out

    def parse(self, completion: Completion) -> dict[str, str | None]:
        """`parse_text` of the last assistant message."""
        return self.parse_text(last_assistant_text(completion))

    def parse_answer(self, completion: Completion) -> str | None:
        """The answer field of the last assistant message; None if missing, empty or ambiguous."""
        answer = self.parse(completion)[self.answer_field]
        return answer if answer else None

    # -- format checks -------------------------------------------------------------------
    def is_strict_format(self, completion: Completion) -> bool:
        """The last assistant message is exactly the fields in order, answer non-empty."""
        text = last_assistant_text(completion)
        return bool(self._strict_re.match(text)) and self.parse_answer(text) is not None

    def is_lenient_format(self, completion: Completion) -> bool:
        """The last assistant message has a readable, non-empty answer field (anything around)."""
        return self.parse_answer(completion) is not None

    # -- writing -------------------------------------------------------------------------
    def format(self, **values: str) -> str:
        """Render a message in the strict format, e.g. `format(answer="72")`."""
        unknown = set(values) - set(self.fields)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        missing = [f for f in self.fields if f not in values and f not in self.optional]
        if missing:
            raise ValueError(f"missing fields {missing}")
        return "\n".join(f"<{f}>{values[f]}</{f}>" for f in self.fields if f in values)


def think_answer_parser() -> XMLParser:
    """`<think>...</think>` (optional, hidden) then `<answer>...</answer>`."""
    return XMLParser(("think", "answer"))


def answer_parser() -> XMLParser:
    """Only `<answer>...</answer>`: the compact format for tiny models (`<think>` still hidden)."""
    return XMLParser(("answer",), optional=())
