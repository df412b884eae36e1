"""Tools for `ToolEnv`: Python functions with a JSON schema, safe execution, call parsers.

Execution (`execute_tool_call`) never raises; it runs the tool under `grpo_jax.guard`.
Every failure becomes a `ToolResult` whose text is shown to the model:
  * the tool raised anything, `sys.exit()` included, or `repr` of its result raised
                                       -> "Error: calculator raised ZeroDivisionError: ..."
  * the tool ran past `timeout_s`      -> "Error: tool 'x' timed out after 5 s"
  * the tool's worker process died     -> "Error: tool 'x' crashed: ..." (process isolation)
  * unknown tool / bad arguments / a tool call that does not parse -> an error naming why.
The tool's printed output and its return value form the reply; both are captured and
bounded by `max_output_chars`, so a tool printing or returning 100 MB costs the model a
truncated reply with a note, not the process memory, and nothing reaches the console.

Isolation (`isolation`): "thread" (default) runs the tool in a daemon thread: concurrent
calls of many episodes overlap (I/O-bound tools), but a tool that hangs is abandoned at the
time limit and keeps running, and only its `sys.stdout` / `sys.stderr` prints are captured.
"process" runs it in a killable worker process (fd-level capture, killed at the time limit),
a few calls at a time (`grpo_jax.guard.configure_pool`).  Model-written code belongs in
`python_tool` (the sandbox), whatever the isolation.

Tool-call formats are pluggable objects with `parse(text) -> [ToolCall]`,
`format_call(name, arguments) -> str` and `describe(tools) -> str` (system-prompt text):
  * `JSONToolCallParser`: `<tool_call>{"name": "calculator", "arguments": {"expression": "2+2"}}</tool_call>`,
    the JSON-in-tags format of Hermes / Qwen2.5 chat templates;
  * `TagToolCallParser`: one tag = one single-argument tool, e.g. `<calc>347*29</calc>`, the
    compact format for tiny models;
  * more model formats (Llama 3.1 JSON, "auto") and the choice by chat template: `tool_calls`.

Hidden (state) arguments: parameters named in `Tool.state_args` (or annotated
`Annotated[T, FromState(key)]`) are left out of the schema and filled from the episode's state
by `execute_tool_call(..., state=...)`; a call passing one is refused ("bad_arguments").
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import re
import types
import typing
from typing import Any, Callable, Mapping, Sequence

from grpo_jax import guard
from grpo_jax.envs.sandbox import run_python

DEFAULT_TOOL_TIMEOUT_S = 5.0

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclasses.dataclass(frozen=True)
class FromState:
    """Marks a tool parameter as hidden: its value is `state[key]` of the episode (a database
    handle, a sandbox, a connection), never an argument from the model, and it is left out of
    the schema. `def query(sql: str, db: Annotated[Connection, FromState()])`; `key` defaults
    to the parameter's name."""
    key: str | None = None


class LocalHandle:
    """A per-episode object for hidden tool arguments that must not travel (a database
    connection, a sandbox): put `LocalHandle(conn)` in the state and the tool gets `conn`.
    Pickled (e.g. the state sent to a process-isolated reward function) it arrives empty
    (`value` None); deep-copied it is shared. Plain values in the state travel as they are."""
    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __reduce__(self):
        return (LocalHandle, (None,))

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return f"LocalHandle({type(self.value).__name__})"


@dataclasses.dataclass(frozen=True)
class Tool:
    """A Python function offered to the model, with its JSON schema.

    `state_args` maps hidden parameters to the state keys they are read from (module
    docstring of `tool_env`); the model never sees them and may not pass them.
    """
    fn: Callable[..., Any]
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object (hidden ones left out)
    state_args: Mapping[str, str] = dataclasses.field(default_factory=dict)  # parameter -> state key

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None,
                      description: str | None = None,
                      state_args: Sequence[str] | Mapping[str, str] = ()) -> "Tool":
        """Schema from the signature (annotations -> JSON types), the docstring's first paragraph
        (the description) and its `Args:` section (one description per parameter).

        Hidden parameters: the names in `state_args` (or a {parameter: state key} mapping), and
        those annotated `Annotated[T, FromState(key)]`.
        """
        hints = typing.get_type_hints(fn, include_extras=True)
        hidden = dict(state_args) if isinstance(state_args, Mapping) else {a: a for a in state_args}
        for pname, hint in hints.items():
            marker = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, FromState)), None)
            if marker is not None:
                hidden.setdefault(pname, marker.key or pname)
        doc = inspect.getdoc(fn) or ""
        arg_docs = _arg_descriptions(doc)
        properties, required = {}, []
        params = inspect.signature(fn).parameters
        unknown = set(hidden) - set(params)
        if unknown:
            raise ValueError(f"state_args {sorted(unknown)} are not parameters of {fn.__name__}")
        for p in params.values():
            if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) or p.name in hidden:
                continue
            properties[p.name] = _json_type(hints.get(p.name))
            if p.name in arg_docs:
                properties[p.name]["description"] = arg_docs[p.name]
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
        description = description or doc.split("\n\n")[0].replace("\n", " ").strip()
        parameters = {"type": "object", "properties": properties, "required": required}
        return cls(fn, name or fn.__name__, description, parameters, hidden)

    def schema(self) -> dict[str, Any]:
        """OpenAI-style function schema, as chat templates take it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _json_type(hint: Any) -> dict[str, Any]:
    """JSON schema of an annotation: str/int/float/bool/list/dict (list[T] with items),
    Optional[T] as T, Literal[...] as an enum; anything else "string"."""
    if hint is None:
        return {"type": "string"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _json_type(args[0])
    if origin is typing.Literal:
        return {"type": _JSON_TYPES.get(type(args[0]), "string"), "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _json_type(rest[0]) if len(rest) == 1 else {"type": "string"}
    schema = {"type": _JSON_TYPES.get(origin or hint, "string")}
    if origin is list and args:
        schema["items"] = _json_type(args[0])
    return schema


def _arg_descriptions(doc: str) -> dict[str, str]:
    """{name: text} from a Google-style `Args:` section (continuation lines joined)."""
    found = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?)+)", doc, re.MULTILINE)
    if not found:
        return {}
    out, current = {}, None
    for line in found.group(1).splitlines():
        entry = re.match(r"\s{1,8}(\w+)(?:\s*\([^)]*\))?\s*:\s*(.*)", line)
        if entry and (current is None or len(line) - len(line.lstrip()) <= out[current][1]):
            current = entry.group(1)
            out[current] = [entry.group(2).strip(), len(line) - len(line.lstrip())]
        elif current is not None and line.strip():
            out[current][0] += " " + line.strip()
    return {k: v[0] for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A parsed call; `error` is set when the text looked like a call but did not parse."""
    name: str | None
    arguments: dict[str, Any]
    raw: str
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """Reply text for the model; `error_kind` None on success, else one of "exception",
    "timeout", "crashed", "bad_arguments", "unknown_tool", "parse_error" (or "too_many_calls"
    from ToolEnv)."""
    content: str
    error_kind: str | None = None
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.error_kind is None


# -- execution --------------------------------------------------------------------------------
def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, LocalHandle) else value


def _truncate(text: str, total: int, limit: int) -> tuple[str, bool]:
    if total <= limit:
        return text, False
    return text[:limit] + f"\n[output truncated: {total} characters, showing the first {limit}]", True


def _as_text(value: Any) -> str | None:
    """A tool's return value as reply text (runs under the guard: a raising `repr` is the tool's failure)."""
    if value is None:
        return None
    return value if type(value) is str else str(repr(value))


async def execute_tool_call(call: ToolCall, tools: Mapping[str, Tool], *,
                            timeout_s: float = DEFAULT_TOOL_TIMEOUT_S, max_output_chars: int = 2000,
                            isolation: str = "thread", state: Mapping[str, Any] | None = None) -> ToolResult:
    """Run one parsed call with a time limit and an output cap; never raises (module docstring).

    A tool's hidden parameters (`Tool.state_args`) are filled from `state` (a `LocalHandle`
    unwrapped); a call that passes one itself is refused ("bad_arguments"). With "process"
    isolation they are pickled to the worker (a `LocalHandle` arrives empty): stateful tools
    run with "thread" isolation.
    """
    try:
        return await _execute(call, tools, guard.check_timeout(timeout_s), max_output_chars,
                              guard.check_isolation(isolation), state or {})
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise
    except BaseException as e:  # noqa: B036 - e.g. a hostile object in the call
        return ToolResult(f"Error: the tool call failed: {guard.describe(e)}", "exception")


async def _execute(call, tools, timeout_s, max_chars, isolation, state) -> ToolResult:
    if call.error is not None:
        return ToolResult(f"Error: could not parse tool call: {call.error}", "parse_error")
    tool = tools.get(call.name) if isinstance(call.name, str) else None
    if tool is None:
        return ToolResult(f"Error: unknown tool {call.name!r}; available: {', '.join(sorted(tools))}",
                          "unknown_tool")
    overriding = sorted(set(call.arguments) & set(tool.state_args))
    if overriding:
        return ToolResult(f"Error: bad arguments for tool {tool.name!r}: {', '.join(overriding)} "
                          "cannot be passed (set by the environment)", "bad_arguments")
    missing = sorted(k for k in tool.state_args.values() if k not in state)
    if missing:
        return ToolResult(f"Error: tool {tool.name!r} is unavailable: the environment did not set up "
                          f"{', '.join(missing)}", "exception")
    arguments = {**call.arguments, **{p: _unwrap(state[k]) for p, k in tool.state_args.items()}}
    try:
        inspect.signature(tool.fn).bind(**arguments)
    except (TypeError, ValueError) as e:
        return ToolResult(f"Error: bad arguments for tool {tool.name!r}: {e}", "bad_arguments")
    outcome = await guard.guarded_call(tool.fn, arguments, timeout_s=timeout_s, isolation=isolation,
                                       convert=_as_text, max_output_chars=max_chars, name=f"tool {tool.name!r}")
    if outcome.kind == "timeout":
        return ToolResult(f"Error: tool {tool.name!r} timed out after {timeout_s:g} s", "timeout")
    printed, total = outcome.output, outcome.output_chars
    if outcome.ok:
        if outcome.value is not None:
            separator = "\n" if total else ""
            printed += separator + outcome.value
            total += len(separator) + outcome.value_chars
        text, truncated = _truncate(printed, total, max_chars)
        return ToolResult(text, None, truncated)
    printed = _truncate(printed, total, max_chars)[0] + "\n" if printed else ""
    if outcome.kind == "crashed":
        return ToolResult(f"{printed}Error: tool {tool.name!r} crashed: {outcome.error}", "crashed")
    return ToolResult(f"{printed}Error: {tool.name} raised {outcome.error}", "exception")


# -- call formats ------------------------------------------------------------------------------
def call_from_payload(payload: Any, raw: str, argument_keys: Sequence[str] = ("arguments",)) -> ToolCall:
    """A `ToolCall` from a decoded `{"name": ..., <argument key>: {...}}` object (the arguments
    may also come JSON-encoded as a string, as some models write them)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        keys = " | ".join(argument_keys)
        return ToolCall(None, {}, raw, f'expected {{"name": ..., "{keys}": {{...}}}}')
    arguments = next((payload[k] for k in argument_keys if k in payload), {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(payload["name"], {}, raw, "arguments must be an object")
    return ToolCall(payload["name"], arguments, raw)


class JSONToolCallParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes / Qwen2.5 style)."""

    def __init__(self, tag: str = "tool_call"):
        self.tag = tag
        self._re = re.compile(rf"<{tag}>([\s\S]*?)</{tag}>")

    def parse(self, text: str) -> list[ToolCall]:
        calls = []
        for match in self._re.finditer(text):
            raw = match.group(0)
            try:
                payload = json.loads(match.group(1))
            except json.JSONDecodeError as e:
                calls.append(ToolCall(None, {}, raw, f"invalid JSON ({e.msg})"))
                continue
            calls.append(call_from_payload(payload, raw))
        if not calls and f"<{self.tag}>" in text:
            calls.append(ToolCall(None, {}, text[text.index(f"<{self.tag}>"):][:200], f"unclosed <{self.tag}>"))
        return calls

    def format_call(self, name: str, arguments: Mapping[str, Any]) -> str:
        return f"<{self.tag}>" + json.dumps({"name": name, "arguments": dict(arguments)}) + f"</{self.tag}>"

    def describe(self, tools: Sequence[Tool]) -> str:
        schemas = "\n".join(json.dumps(t.schema()) for t in tools)
        return ("You can call these tools:\n<tools>\n" + schemas + "\n</tools>\n"
                f'To call one, write <{self.tag}>{{"name": NAME, "arguments": {{...}}}}</{self.tag}>; '
                "the result comes back in a tool message.")


class TagToolCallParser:
    """Compact calls: the text inside `<tag>...</tag>` is the single argument of one tool.

    `TagToolCallParser("calc", "calculator", "expression")` reads `<calc>347*29</calc>` as
    `calculator(expression="347*29")`.
    """

    def __init__(self, tag: str = "calc", tool_name: str = "calculator", argument: str = "expression"):
        self.tag, self.tool_name, self.argument = tag, tool_name, argument
        self._re = re.compile(rf"<{tag}>([\s\S]*?)</{tag}>")

    def parse(self, text: str) -> list[ToolCall]:
        calls = [ToolCall(self.tool_name, {self.argument: m.group(1).strip()}, m.group(0))
                 for m in self._re.finditer(text)]
        if not calls and f"<{self.tag}>" in text:
            calls.append(ToolCall(None, {}, text[text.index(f"<{self.tag}>"):][:200], f"unclosed <{self.tag}>"))
        return calls

    def format_call(self, name: str, arguments: Mapping[str, Any]) -> str:
        if name != self.tool_name or set(arguments) != {self.argument}:
            raise ValueError(f"<{self.tag}> calls only {self.tool_name}({self.argument}=...)")
        return f"<{self.tag}>{arguments[self.argument]}</{self.tag}>"

    def describe(self, tools: Sequence[Tool]) -> str:
        return f"To use the {self.tool_name}, write <{self.tag}>...</{self.tag}>; the result comes back."


def python_tool(timeout_s: float = 5.0, memory_mb: int = 256, max_output_chars: int = 2000) -> Tool:
    """A `python(code)` tool running model-written code in the process sandbox.

    The code runs in a killed-on-time-out child process (`grpo_jax.envs.sandbox.run_python`),
    not in a thread: give the `ToolEnv` a `tool_timeout_s` above `timeout_s` (the sandbox
    answers a time-out itself, with the output so far).
    """
    def python(code: str) -> str:
        """Run Python code (standard library only) and return what it prints."""
        return run_python(code, timeout_s=timeout_s, memory_mb=memory_mb).as_text(max_chars=max_output_chars)
    return Tool.from_function(python)
