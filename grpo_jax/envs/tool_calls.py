"""Tool-call formats of chat models, and choosing one from a chat template.

A format is an object with `parse(text) -> [ToolCall]` (every call in one assistant message, in
order; text that looks like a call but does not parse is a `ToolCall` with `error` set),
`format_call(name, arguments) -> str` and `describe(tools) -> str` (system-prompt text, for
templates that do not render `tools=` themselves).

  * "hermes" / "qwen" (`tools.JSONToolCallParser`): Qwen2.5 / Qwen3 / Hermes,
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, several per message.
  * "llama3" (`Llama3JSONToolCallParser`): Llama 3.1 / 3.2 JSON calls,
    `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`; several calls may
    follow each other, separated by whitespace or `;`.
  * "auto" (`AutoToolCallParser`): "hermes" when the message has a `<tool_call>` tag, else
    "llama3" (for an env used with more than one model family).
  * "tags" is not here: `tools.TagToolCallParser` needs its tag and tool named.

`parser_for_template(text)` / `parser_for_tokenizer(tokenizer)` pick the format a chat template
is written for; `make_call_parser(spec)` turns a name (or a parser) into a parser.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from grpo_jax.envs.tools import JSONToolCallParser, Tool, ToolCall, call_from_payload

PYTHON_TAG = "<|python_tag|>"
_LLAMA_CALL_START = re.compile(r'\s*\{\s*"(?:name|type)"\s*:')


class Llama3JSONToolCallParser:
    """Llama 3.1 JSON tool calls: the message is `{"name": ..., "parameters": {...}}` (or
    several, separated by whitespace or `;`), optionally after `<|python_tag|>`. A message that
    neither starts with the tag nor with `{"name":` is a plain answer (no calls); text after the
    last call is ignored."""

    def parse(self, text: str) -> list[ToolCall]:
        body = text.strip()
        tagged = body.startswith(PYTHON_TAG)
        if tagged:
            body = body[len(PYTHON_TAG):]
        elif not _LLAMA_CALL_START.match(body):
            return []
        calls, decoder, i = [], json.JSONDecoder(), 0
        while True:
            while i < len(body) and body[i] in " \t\r\n;":
                i += 1
            if i >= len(body):
                break
            try:
                payload, end = decoder.raw_decode(body, i)
            except json.JSONDecodeError as e:
                if not calls:
                    calls.append(ToolCall(None, {}, body[i:i + 200], f"invalid JSON ({e.msg})"))
                break
            calls.append(call_from_payload(payload, body[i:end], ("parameters", "arguments")))
            i = end
        if not calls:
            calls.append(ToolCall(None, {}, text[:200], f"nothing after {PYTHON_TAG}"))
        return calls

    def format_call(self, name: str, arguments: Mapping[str, Any]) -> str:
        return json.dumps({"name": name, "parameters": dict(arguments)})

    def describe(self, tools: Sequence[Tool]) -> str:
        schemas = "\n".join(json.dumps(t.schema()) for t in tools)
        return ("You can call these functions:\n" + schemas + "\n"
                'To call one, reply with only {"name": NAME, "parameters": {...}}; '
                "the result comes back in the next message.")


class AutoToolCallParser:
    """`<tool_call>` tags when the message has one (Qwen / Hermes), else Llama 3.1 JSON."""

    def __init__(self):
        self.hermes, self.llama = JSONToolCallParser(), Llama3JSONToolCallParser()

    def parse(self, text: str) -> list[ToolCall]:
        return self.hermes.parse(text) if "<tool_call>" in text else self.llama.parse(text)

    def format_call(self, name: str, arguments: Mapping[str, Any]) -> str:
        return self.hermes.format_call(name, arguments)

    def describe(self, tools: Sequence[Tool]) -> str:
        return self.hermes.describe(tools)


_BY_NAME = {"hermes": JSONToolCallParser, "qwen": JSONToolCallParser, "json": JSONToolCallParser,
            "llama3": Llama3JSONToolCallParser, "auto": AutoToolCallParser}


def make_call_parser(spec: Any) -> Any:
    """A parser from a name ("hermes" | "qwen" | "json" | "llama3" | "auto"), or `spec` itself."""
    if not isinstance(spec, str):
        return spec
    try:
        return _BY_NAME[spec]()
    except KeyError:
        raise ValueError(f"unknown tool-call format {spec!r}; one of {sorted(_BY_NAME)} or a parser "
                         "object (e.g. TagToolCallParser)") from None


def format_for_template(template: str | None) -> str | None:
    """The tool-call format a chat template is written for ("hermes" | "llama3"), or None."""
    if not template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if PYTHON_TAG in template or ("ipython" in template and '"parameters"' in template):
        return "llama3"
    return None


def parser_for_template(template: str | None, default: str | None = None) -> Any:
    """The parser of `format_for_template(template)`; `default` (a name) when it is unknown,
    else ValueError."""
    name = format_for_template(template) or default
    if name is None:
        raise ValueError("cannot tell the tool-call format of this chat template (no <tool_call> "
                         "and no <|python_tag|>); pass ToolEnv(call_parser=...) explicitly")
    return make_call_parser(name)


def parser_for_tokenizer(tokenizer: Any, default: str | None = None) -> Any:
    """`parser_for_template` of a `grpo_jax.tokenizer.Tokenizer`'s chat template."""
    return parser_for_template(getattr(tokenizer, "chat_template_text", None), default)
