"""`ToolEnv`: the model calls Python tools until it answers without a tool call.

Each assistant turn is parsed with the env's tool-call parser (`tools.JSONToolCallParser`
or `tools.TagToolCallParser`, or any object with the same `parse` / `format_call` /
`describe` methods).  A turn without a call ends the episode (that is the final answer);
a turn with calls gets one `{"role": "tool", "content": ...}` message per call, the calls
of a turn running concurrently, each under `grpo_jax.guard` with a time limit and an output
cap (`tools.execute_tool_call`).  Errors of any kind (the tool raised or called `sys.exit`,
hung, crashed its worker process, printed too much, was unknown, got bad arguments, the
call did not parse, too many calls in one turn) come back to the model as text and are
counted in the state:

    state["tool_calls"]     calls attempted          state["tool_errors"]   calls that failed
    state["tool_timeouts"]  calls that timed out
    state["tool_log"]       one {"name", "ok", "error_kind", "truncated"} per call

Native tool calling (`native_tools=True`): the tools' JSON schemas (`tool_schemas()`, the
OpenAI function format built from each function's signature and docstring) go to the chat
template as `tools=` (the rollout passes them to `encode_chat`, the turn suffixes and the
template check), so the model sees them the way it was trained to; no tool text is added to
the system prompt, and the calls are parsed in the model's own format (`call_parser`: "auto"
by default, "hermes"/"qwen", "llama3", a parser, or `tool_calls.parser_for_tokenizer(tok)`).
Without it (the default), the tools are described in the system prompt by the parser and
`tool_schemas()` is None.

Stateful tools: a tool's hidden parameters (`Tool.from_function(fn, state_args=["db"])`, or
the annotation `Annotated[T, FromState("db")]`) are filled from the episode's state, are not
in the schema, and a call that passes them is refused ("bad_arguments"). Set them up per
episode in `setup_state`:

    class SQLEnv(ToolEnv):
        def setup_state(self, row):
            return {**super().setup_state(row), "db": LocalHandle(open_db(row["info"]["db_path"]))}

`LocalHandle` keeps an object that cannot be pickled or copied (a connection) out of the way of
process-isolated reward functions and of `audit` (which copies states); plain values need none.
Hidden arguments need `tool_isolation="thread"` (a process worker would get a copy).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

from grpo_jax.envs.base import Message, MultiTurnEnv, Row, State
from grpo_jax import guard
from grpo_jax.envs.tool_calls import make_call_parser
from grpo_jax.envs.tools import (DEFAULT_TOOL_TIMEOUT_S, JSONToolCallParser, Tool, ToolCall, ToolResult,
                                 execute_tool_call)
from grpo_jax.rubrics.parsers import last_assistant_text


class ToolEnv(MultiTurnEnv):
    """Multi-turn env with tools.

    Args:
      tools: Python functions (or `Tool`s); a function's name, annotations and docstring
        make its schema.
      call_parser: the tool-call format: a parser object or a name of `tool_calls.make_call_parser`
        ("hermes" / "qwen", "llama3", "auto"); default JSON in `<tool_call>` tags, or "auto"
        with `native_tools`.
      native_tools: give the tool schemas to the chat template (`tool_schemas()`) instead of
        describing them in the system prompt.
      tool_timeout_s: time limit of one call (finite; default 5 s).
      tool_isolation: "thread" (default: many calls overlap) or "process" (a call that hangs
        is killed, `os.write` output captured); see `tools`.
      max_output_chars: cap on one call's reply text (prints and return value).
      max_calls_per_turn: calls beyond this in one turn are answered with an error.
      max_turns: most assistant turns (tool turns plus the final answer).
      system_prompt: default: the call parser's description of the tools (none with `native_tools`).
      Other keyword arguments go to `Environment`.
    """
    max_turns = 4

    def __init__(self, tools: Sequence[Callable[..., Any] | Tool], *, call_parser: Any = None,
                 native_tools: bool = False, tool_timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
                 tool_isolation: str = "thread",
                 max_output_chars: int = 2000, max_calls_per_turn: int = 4,
                 system_prompt: str | None = None, **kwargs: Any):
        self.tools = {t.name: t for t in (t if isinstance(t, Tool) else Tool.from_function(t) for t in tools)}
        if call_parser is None:
            call_parser = "auto" if native_tools else JSONToolCallParser()
        self.call_parser = make_call_parser(call_parser)
        self.native_tools = bool(native_tools)
        self.tool_timeout_s = guard.check_timeout(tool_timeout_s, "tool_timeout_s")
        self.tool_isolation = guard.check_isolation(tool_isolation, "tool_isolation")
        stateful = [t.name for t in self.tools.values() if t.state_args]
        if stateful and self.tool_isolation == "process":
            raise ValueError(f"tools {stateful} take hidden state arguments, which a process worker would "
                             'only get a copy of; use tool_isolation="thread"')
        self.max_output_chars = max_output_chars
        self.max_calls_per_turn = max_calls_per_turn
        if system_prompt is None and not self.native_tools:
            system_prompt = self.call_parser.describe(list(self.tools.values()))
        super().__init__(system_prompt=system_prompt, **kwargs)

    def tool_schemas(self) -> list[dict[str, Any]] | None:
        """The tools' OpenAI function schemas for the chat template's `tools=`; None unless
        `native_tools` (then the system prompt describes them)."""
        return [t.schema() for t in self.tools.values()] if self.native_tools else None

    def setup_state(self, row: Row) -> State:
        return {"tool_calls": 0, "tool_errors": 0, "tool_timeouts": 0, "tool_log": []}

    def tool_calls(self, text: str) -> list[ToolCall]:
        """The calls in one assistant message."""
        return self.call_parser.parse(text)

    def is_done(self, messages: Sequence[Message], state: State) -> bool:
        return not self.tool_calls(last_assistant_text(self.completion_of(messages, state)))

    async def env_response(self, messages: Sequence[Message], state: State) -> tuple[list[Message], State]:
        calls = self.tool_calls(last_assistant_text(self.completion_of(messages, state)))
        allowed, extra = calls[:self.max_calls_per_turn], calls[self.max_calls_per_turn:]
        results = list(await asyncio.gather(*(
            execute_tool_call(c, self.tools, timeout_s=self.tool_timeout_s, max_output_chars=self.max_output_chars,
                              isolation=self.tool_isolation, state=state)
            for c in allowed)))
        results += [ToolResult(f"Error: at most {self.max_calls_per_turn} tool calls per turn; call skipped",
                               "too_many_calls")] * len(extra)
        for call, result in zip(calls, results):
            state["tool_calls"] += 1
            state["tool_errors"] += not result.ok
            state["tool_timeouts"] += result.error_kind == "timeout"
            state["tool_log"].append({"name": call.name, "ok": result.ok, "error_kind": result.error_kind,
                                      "truncated": result.truncated})
        return [{"role": "tool", "content": r.content} for r in results], state
