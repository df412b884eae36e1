"""Environments: protocol, tools that raise / hang / flood, call parsers, multi-turn, groups."""

import asyncio
import json
import sys
import threading
import time
from typing import Annotated

import numpy as np
import pytest

from grpo_jax.envs import (EnvGroup, Environment, JSONToolCallParser, MultiTurnEnv, SingleTurnEnv,
                           TagToolCallParser, Tool, ToolCall, ToolEnv, execute_tool_call, python_tool,
                           replay_episodes, respond_all, run_episodes)
from grpo_jax.envs.tool_calls import Llama3JSONToolCallParser, make_call_parser, parser_for_template
from grpo_jax.envs.tools import FromState, LocalHandle
from grpo_jax.rubrics import Rubric, answer_parser, correct_answer, tool_used
from grpo_jax.rubrics.rewards import tool_errors_metric

_RELEASE = threading.Event()  # lets the "hanging" tool threads end when the session ends


def add(a: int, b: int) -> int:
    """Add two integers.

    More text that is not part of the description.
    """
    return a + b


def explode(reason: str) -> str:
    """Always raises."""
    raise RuntimeError(f"exploded: {reason}")


def hang(seconds: float = 60.0) -> str:
    """Never answers in time."""
    _RELEASE.wait(seconds)
    return "late"


def flood(kind: str = "print") -> str:
    """Prints or returns about 100 MB."""
    if kind == "print":
        print("x" * 100_000_000)
        return None
    if kind == "lines":
        for i in range(200_000):
            print(i)
        return None
    return "y" * 100_000_000


def _call(name, **arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def _scripted(turns_by_question):
    """A policy replaying, per question, a list of assistant turns."""
    def policy(messages):
        question = next(m["content"] for m in messages if m["role"] == "user")
        turn = sum(m["role"] == "assistant" for m in messages)
        return turns_by_question[question][turn]
    return policy


def _tool_env(**kwargs):
    rubric = Rubric([correct_answer(answer_parser()), tool_used(), tool_errors_metric()], [1.0, 0.1, 0.0],
                    parser=answer_parser())
    kwargs.setdefault("tool_timeout_s", 0.5)
    kwargs.setdefault("max_output_chars", 1000)
    return ToolEnv([add, explode, hang, flood], rubric=rubric, max_turns=3, **kwargs)


def test_tool_schema_from_function():
    schema = Tool.from_function(add).schema()["function"]
    assert schema["name"] == "add" and schema["description"] == "Add two integers."
    assert schema["parameters"] == {"type": "object", "required": ["a", "b"],
                                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    assert Tool.from_function(hang).parameters["required"] == []


def test_call_parsers():
    json_parser = JSONToolCallParser()
    calls = json_parser.parse('hi <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
                              '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>'
                              "<tool_call>{not json}</tool_call><tool_call>[1]</tool_call>")
    assert [(c.name, c.arguments, c.error is None) for c in calls] == [
        ("add", {"a": 1, "b": 2}, True), ("add", {"a": 3, "b": 4}, True), (None, {}, False), (None, {}, False)]
    assert json_parser.parse("<tool_call>{\"name\": \"add\"")[0].error.startswith("unclosed")
    assert json_parser.parse("no calls here") == []
    text = json_parser.format_call("add", {"a": 1, "b": 2})
    assert json_parser.parse(text)[0].arguments == {"a": 1, "b": 2}

    tag_parser = TagToolCallParser("calc", "calculator", "expression")
    assert [(c.name, c.arguments) for c in tag_parser.parse("<calc>3*4</calc> and <calc> 1+1 </calc>")] == [
        ("calculator", {"expression": "3*4"}), ("calculator", {"expression": "1+1"})]
    assert tag_parser.format_call("calculator", {"expression": "2+2"}) == "<calc>2+2</calc>"
    assert tag_parser.parse("<calc>3*4")[0].error is not None


def _run(call, **kwargs):
    tools = {t.name: t for t in map(Tool.from_function, (add, explode, hang, flood))}
    return asyncio.run(execute_tool_call(call, tools, **kwargs))


def test_execute_tool_call_turns_every_failure_into_text():
    ok = _run(ToolCall("add", {"a": 2, "b": 3}, ""))
    assert ok.ok and ok.content == "5"
    raised = _run(ToolCall("explode", {"reason": "test"}, ""))
    assert raised.error_kind == "exception" and "RuntimeError: exploded: test" in raised.content
    bad_args = _run(ToolCall("add", {"a": 1}, ""))
    assert bad_args.error_kind == "bad_arguments" and "'b'" in bad_args.content
    unknown = _run(ToolCall("rm", {}, ""))
    assert unknown.error_kind == "unknown_tool" and "add" in unknown.content
    unparsed = _run(ToolCall(None, {}, "", "invalid JSON"))
    assert unparsed.error_kind == "parse_error"

    start = time.perf_counter()
    hung = _run(ToolCall("hang", {}, ""), timeout_s=0.3)
    assert time.perf_counter() - start < 2.0
    assert hung.error_kind == "timeout" and "timed out after 0.3 s" in hung.content


@pytest.mark.parametrize("kind", ["print", "lines", "return"])
def test_tool_output_is_capped(kind, capsys):
    result = _run(ToolCall("flood", {"kind": kind}, ""), max_output_chars=500)
    assert result.ok and result.truncated
    assert len(result.content) < 600 and "[output truncated:" in result.content
    if kind != "lines":
        assert "100000001 characters" in result.content or "100000000 characters" in result.content
    print("main thread still prints")  # the capture is per thread
    captured = capsys.readouterr().out
    assert "main thread still prints" in captured and "xxxx" not in captured


def test_tool_env_episodes_survive_bad_tools_and_the_batch_goes_on():
    env = _tool_env()
    script = {
        "good": [_call("add", a=20, b=22), "<answer>42</answer>"],
        "raises": [_call("explode", reason="x"), "<answer>0</answer>"],
        "hangs": [_call("hang"), "<answer>0</answer>"],
        "prints": [_call("flood", kind="print"), "<answer>0</answer>"],
        "unknown": [_call("nope"), "<answer>0</answer>"],
        "garbled": ["<tool_call>{oops</tool_call>", "<answer>0</answer>"],
        "many": [" ".join([_call("add", a=1, b=1)] * 6), "<answer>2</answer>"],
        "direct": ["<answer>42</answer>"],
    }
    rows = [{"question": q, "answer": "42" if q in ("good", "direct") else "2"} for q in script]
    start = time.perf_counter()
    episodes = run_episodes(env, rows, _scripted(script))
    assert time.perf_counter() - start < 3.0  # the hanging tool cost one time-out, in parallel
    by_q = {e.prompt[-1]["content"]: e for e in episodes}
    tool_text = {q: [m["content"] for m in e.completion if m["role"] == "tool"] for q, e in by_q.items()}
    assert tool_text["good"] == ["42"]
    assert "RuntimeError: exploded: x" in tool_text["raises"][0]
    assert "timed out" in tool_text["hangs"][0]
    assert "[output truncated:" in tool_text["prints"][0] and len(tool_text["prints"][0]) < 1100
    assert "unknown tool 'nope'" in tool_text["unknown"][0]
    assert "could not parse" in tool_text["garbled"][0]
    assert tool_text["many"][:4] == ["2"] * 4 and all("at most 4" in t for t in tool_text["many"][4:])
    assert tool_text["direct"] == [] and by_q["direct"].state["tool_calls"] == 0
    assert {q: e.state["tool_errors"] for q, e in by_q.items()} == {
        "good": 0, "raises": 1, "hangs": 1, "prints": 0, "unknown": 1, "garbled": 1, "many": 2, "direct": 0}
    assert by_q["hangs"].state["tool_timeouts"] == 1
    assert by_q["raises"].state["tool_log"] == [{"name": "explode", "ok": False, "error_kind": "exception",
                                                 "truncated": False}]
    assert by_q["prints"].state["tool_log"][0]["truncated"]
    scores = env.score_episodes(episodes)
    assert not np.isnan(scores.rewards).any()
    np.testing.assert_allclose(scores.scores["correct_answer"], [1, 0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_allclose(scores.scores["tool_used"], [1, 0, 0, 1, 0, 0, 0, 0])


def test_python_tool_runs_in_the_sandbox():
    env = ToolEnv([python_tool(timeout_s=1.0)], tool_timeout_s=10.0, max_turns=2)
    script = {"sum": [_call("python", code="print(sum(range(10)))"), "done"],
              "loop": [_call("python", code="while True: pass"), "done"],
              "flood": [_call("python", code="print('x' * 10**7)"), "done"]}  # 10 MB, well within 1 s
    episodes = run_episodes(env, [{"question": q, "answer": ""} for q in script], _scripted(script))
    replies = {e.prompt[-1]["content"]: e.completion[1]["content"] for e in episodes}
    assert replies["sum"].strip() == "45"
    assert "timeout" in replies["loop"]
    assert "output" in replies["flood"] and len(replies["flood"]) < 3000


def test_protocol_turns_truncation_and_sync_wrappers():
    env = _tool_env()
    prompt, state = env.initial_state({"question": "q", "answer": "1"})
    assert prompt[0]["role"] == "system" and "add" in prompt[0]["content"] and prompt[-1]["content"] == "q"
    assert state["prompt_length"] == 2 and state["tool_calls"] == 0
    messages = prompt + [{"role": "assistant", "content": _call("add", a=1, b=2)}]
    assert not env.is_completed(messages, state)
    reply, state = env.env_response_sync(messages, state)  # sync wrapper, also fine in a loop below
    assert reply == [{"role": "tool", "content": "3"}]
    messages += reply + [{"role": "assistant", "content": _call("add", a=1, b=2)}]
    assert not env.is_completed(messages, state)
    messages += [{"role": "tool", "content": "3"}, {"role": "assistant", "content": _call("add", a=1, b=2)}]
    assert env.is_completed(messages, state)  # max_turns = 3 assistant turns
    assert env.is_completed(messages[:3], {**state, "truncated": True})

    async def in_loop():
        batch = [prompt + [{"role": "assistant", "content": _call("add", a=k, b=k)}] for k in range(5)]
        states = [env.initial_state({"question": "q", "answer": "1"})[1] for _ in batch]
        replies = await respond_all(env, batch, states)
        sync_reply = env.env_response_sync(batch[0], env.initial_state({"question": "q"})[1])
        broken = await respond_all(env, [batch[0], None], states[:2], return_exceptions=True)
        return replies, sync_reply, broken

    replies, sync_reply, broken = asyncio.run(in_loop())
    assert [r[0][0]["content"] for r in replies] == ["0", "2", "4", "6", "8"]
    assert broken[0][0] == [{"role": "tool", "content": "0"}] and isinstance(broken[1], Exception)
    assert sync_reply[0] == [{"role": "tool", "content": "0"}]


class GuessEnv(MultiTurnEnv):
    """Guess a number; the env answers 'higher' / 'lower' / 'correct'."""
    name = "guess"
    max_turns = 5

    async def env_response(self, messages, state):
        guess = int(messages[-1]["content"])
        state["guesses"] = state.get("guesses", 0) + 1
        target = int(state["answer"])
        return [{"role": "user", "content": "higher" if guess < target else "lower"}], state

    def is_done(self, messages, state):
        return messages[-1]["content"].strip() == str(state["answer"])


def test_multi_turn_env_with_state_per_episode():
    def binary_search(messages):
        low, high = 0, 100
        for i, m in enumerate(messages):
            if m["role"] == "user" and m["content"] in ("higher", "lower"):
                guess = int(messages[i - 1]["content"])
                low, high = (guess + 1, high) if m["content"] == "higher" else (low, guess - 1)
        return str((low + high) // 2)

    def reference(target):  # (assistant turns, last guess) of the same search, at most 5 turns
        low, high = 0, 100
        for turn in range(1, 6):
            guess = (low + high) // 2
            if guess == target or turn == 5:
                return turn, guess
            low, high = (guess + 1, high) if guess < target else (low, guess - 1)

    env = GuessEnv(rubric=Rubric([lambda state: float(state.get("guesses", 0))], names=["guesses"]))
    targets = (50, 25, 93, 7)
    rows = [{"question": "guess", "answer": str(t)} for t in targets]
    episodes = run_episodes(env, rows, binary_search)
    for e, target in zip(episodes, targets):
        turns, last_guess = reference(target)
        assert env.num_turns(e.messages, e.state) == turns
        assert e.completion[-1] == {"role": "assistant", "content": str(last_guess)}
        assert e.state.get("guesses", 0) == turns - 1  # one env reply between turns, per episode
        assert e.state["answer"] == str(target)
    assert reference(7)[1] != 7  # one episode ran out of turns
    np.testing.assert_allclose(env.score_episodes(episodes).rewards, [reference(t)[0] - 1 for t in targets])


def test_single_turn_env_and_env_group_dispatch():
    rows_a = [{"question": f"a{i}", "answer": "1"} for i in range(4)]
    rows_b = [{"question": f"b{i}", "answer": "2"} for i in range(4)]

    def exact(text, answer):
        return float(text == answer)

    def fails(task):
        raise ValueError("broken scorer")

    env_a = SingleTurnEnv(name="a", rubric=Rubric([exact]), dataset_fn=lambda s, n, seed: rows_a[:n])
    env_b = GuessEnv(name="b", rubric=Rubric([exact, fails], [1.0, 0.0]),
                     dataset_fn=lambda s, n, seed: rows_b[:n])
    with pytest.raises(ValueError):
        SingleTurnEnv(max_turns=2)
    group = EnvGroup([env_a, env_b])
    assert group.max_turns == 5
    rows = group.dataset("train", 6, seed=3)
    assert sorted(r["task"] for r in rows) == ["a"] * 3 + ["b"] * 3
    episodes = run_episodes(group, rows, lambda messages: "2")
    for e, r in zip(episodes, rows):
        assert e.state["task"] == r["task"]
        assert len(e.completion) == 1  # "a" is single turn; "b" answered right at once
    scores = group.score_episodes(episodes)
    expected = [1.0 if r["task"] == "b" else 0.0 for r in rows]
    np.testing.assert_allclose(scores.rewards, expected)
    assert scores.failures["b/fails"] == 3 and scores.metrics["failures/b/fails"] == 3
    assert scores.metrics["reward/a"] == 0 and scores.metrics["reward/b"] == 1
    assert np.isnan(scores.scores["a/exact"][[r["task"] == "b" for r in rows]]).all()
    assert isinstance(group, Environment)
    # whether the env (not the turn limit) ended an episode: asked of the episode's task env
    said = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    assert group.is_done(said("7"), {"task": "a"})                      # single turn: always
    assert group.is_done(said("2"), {"task": "b", "answer": "2"})       # guessed right
    assert not group.is_done(said("3"), {"task": "b", "answer": "2"})
    report = group.audit([{**r, "task": "a"} for r in rows_a[:2]])  # no gold demonstrations: hacks only
    assert report.gold_score is None and "empty" in report.scores


def test_replay_recomputes_env_replies():
    env = _tool_env()
    rows = [{"question": "q", "answer": "5"}]
    scripted = [[{"role": "assistant", "content": _call("add", a=2, b=3)},
                 {"role": "tool", "content": "WRONG, recomputed"},
                 {"role": "assistant", "content": "<answer>5</answer>"}]]
    (episode,) = replay_episodes(env, rows, scripted)
    assert episode.completion[1] == {"role": "tool", "content": "5"}
    assert episode.state["tool_calls"] == 1


def teardown_module(module):
    _RELEASE.set()
    assert sys.stdout is not None


def test_env_group_applies_token_rewards_per_task():
    from grpo_jax.rubrics.token_rewards import stop_token_reward
    env_a = SingleTurnEnv(name="a", rubric=Rubric([lambda text: 1.0], names=["one"],
                                                  token_funcs=[stop_token_reward((7,), weight=0.5)]))
    env_b = SingleTurnEnv(name="b", rubric=Rubric([lambda text: 2.0], names=["two"]))
    group = EnvGroup({"a": env_a, "b": env_b})
    states = [{"task": t} for t in ("a", "b", "a")]
    tokens = np.array([[1, 7], [1, 7], [7, 1]])
    mask = np.ones_like(tokens)
    scores = group.score([[]] * 3, ["x"] * 3, states, tokens_BT=tokens, mask_BT=mask)
    np.testing.assert_allclose(scores.rewards, [1.5, 2.0, 1.0])
    assert len(group.rubric.token_funcs) == 1
    np.testing.assert_array_equal(scores.scores["a/ended_with_stop"], [1.0, np.nan, 0.0])
    with pytest.raises(NotImplementedError):
        group.rubric.token_rewards(tokens, mask)


# -- native tool calling: schemas, model formats, hidden state arguments ----------------------------
class _Counter:
    """A per-episode handle a tool reaches through the state, never through the model."""

    def __init__(self, start):
        self.value = start


def bump(by: int, *, counter: Annotated[_Counter, FromState()]) -> int:
    """Add to the episode's counter and return it.

    Args:
      by: how much to add,
        a whole number.
    """
    counter.value += by
    return counter.value


def lookup(key: str, db) -> str:
    """Look a key up in the episode's table."""
    return db[key]


class _StatefulEnv(ToolEnv):
    def __init__(self, **kwargs):
        super().__init__([add, bump, Tool.from_function(lookup, state_args={"db": "table"})],
                         native_tools=True, max_turns=3, **kwargs)

    def setup_state(self, row):
        return {**super().setup_state(row), "counter": LocalHandle(_Counter(int(row["answer"]))),
                "table": {"k": f"value of {row['question']}"}}


def test_native_schemas_leave_out_hidden_arguments():
    env = _StatefulEnv()
    assert env.system_prompt is None  # the template renders the tools, not the system prompt
    schemas = {s["function"]["name"]: s for s in env.tool_schemas()}
    assert all(s["type"] == "function" for s in schemas.values())
    assert schemas["bump"]["function"] == {
        "name": "bump", "description": "Add to the episode's counter and return it.",
        "parameters": {"type": "object", "required": ["by"],
                       "properties": {"by": {"type": "integer", "description": "how much to add, a whole number."}}}}
    assert schemas["lookup"]["function"]["parameters"]["properties"] == {"key": {"type": "string"}}
    assert env.tools["lookup"].state_args == {"db": "table"} and env.tools["bump"].state_args == {"counter": "counter"}
    assert ToolEnv([add]).tool_schemas() is None  # tools described in the system prompt instead
    with pytest.raises(ValueError, match="not parameters"):
        Tool.from_function(add, state_args=["db"])
    with pytest.raises(ValueError, match="tool_isolation"):
        ToolEnv([bump], tool_isolation="process")


def test_llama3_json_calls_and_parser_choice():
    llama = Llama3JSONToolCallParser()
    calls = llama.parse('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                        '{"name": "add", "parameters": {"a": 3, "b": 4}}')
    assert [(c.name, c.arguments, c.error) for c in calls] == [("add", {"a": 1, "b": 2}, None),
                                                             ("add", {"a": 3, "b": 4}, None)]
    assert [(c.name, c.arguments) for c in llama.parse('{"name": "add", "parameters": {"a": 5, "b": 6}}')] == [
        ("add", {"a": 5, "b": 6})]
    assert llama.parse("The answer is 42.") == [] and llama.parse('{"x": 1} is JSON') == []
    assert llama.parse('<|python_tag|>{"name": "add", "parameters": {"a": 1')[0].error.startswith("invalid JSON")
    assert llama.parse(llama.format_call("add", {"a": 1, "b": 2}))[0].arguments == {"a": 1, "b": 2}

    auto = make_call_parser("auto")
    assert [c.name for c in auto.parse(_call("add", a=1, b=2) + _call("bump", by=1))] == ["add", "bump"]
    assert [c.name for c in auto.parse('{"name": "bump", "parameters": {"by": 1}}')] == ["bump"]
    assert isinstance(parser_for_template("... <tool_call> ..."), JSONToolCallParser)
    assert isinstance(parser_for_template("{{ '<|python_tag|>' }} ipython"), Llama3JSONToolCallParser)
    with pytest.raises(ValueError, match="cannot tell"):
        parser_for_template("{{ messages }}")
    assert isinstance(parser_for_template("{{ messages }}", default="llama3"), Llama3JSONToolCallParser)
    with pytest.raises(ValueError, match="unknown tool-call format"):
        ToolEnv([add], call_parser="xml")


@pytest.mark.parametrize("call_format", ["hermes", "llama3"])
def test_native_calls_answered_in_order_with_state_and_errors_counted(call_format):
    env = _StatefulEnv(call_parser=call_format)

    def call(name, **arguments):
        if call_format == "hermes":
            return _call(name, **arguments)
        return json.dumps({"name": name, "parameters": arguments})

    join = "\n" if call_format == "hermes" else "; "
    bad_json = "<tool_call>{oops</tool_call>" if call_format == "hermes" else '<|python_tag|>{"name": oops'
    script = {
        "two": [call("add", a=1, b=2) + join + call("bump", by=5), "<answer>done</answer>"],
        "hidden": [join.join([call("bump", by=1, counter=99), call("lookup", key="k"),
                              call("lookup", key="k", db={"k": "forged"})]), "<answer>x</answer>"],
        "malformed": [bad_json, call("nope") + join + call("add", a="1"), "<answer>x</answer>"],
    }
    rows = [{"question": q, "answer": "10"} for q in script]
    by_q = {e.prompt[-1]["content"]: e for e in run_episodes(env, rows, _scripted(script))}
    replies = {q: [m["content"] for m in e.completion if m["role"] == "tool"] for q, e in by_q.items()}

    assert replies["two"] == ["3", "15"]  # one tool message per call, in order; the counter started at 10
    assert by_q["two"].state["counter"].value.value == 15
    hidden = replies["hidden"]
    assert "counter cannot be passed" in hidden[0] and hidden[1] == "value of hidden"
    assert "db cannot be passed" in hidden[2] and by_q["hidden"].state["counter"].value.value == 10
    assert [r["error_kind"] for r in by_q["hidden"].state["tool_log"]] == ["bad_arguments", None, "bad_arguments"]
    malformed = by_q["malformed"].state
    assert "could not parse" in replies["malformed"][0] and "unknown tool 'nope'" in replies["malformed"][1]
    assert [r["error_kind"] for r in malformed["tool_log"]] == ["parse_error", "unknown_tool", "bad_arguments"]
    assert (malformed["tool_calls"], malformed["tool_errors"]) == (3, 3)
    assert [e.completion[-1]["content"] for e in by_q.values()] == ["<answer>done</answer>", "<answer>x</answer>",
                                                                   "<answer>x</answer>"]
    # A handle does not travel to a process-isolated reward function (it arrives empty).
    rubric = Rubric([tool_used(), lambda state: float(state["counter"].value is None)], [1.0, 1.0])
    scores = rubric.score([e.prompt for e in by_q.values()], [e.completion for e in by_q.values()],
                          states=[e.state for e in by_q.values()])
    np.testing.assert_array_equal(scores.rewards, [2, 1, 1])


def test_missing_state_is_an_error_not_a_crash():
    tools = {"lookup": Tool.from_function(lookup, state_args=["db"])}
    result = asyncio.run(execute_tool_call(ToolCall("lookup", {"key": "k"}, ""), tools))
    assert result.error_kind == "exception" and "did not set up db" in result.content
    result = asyncio.run(execute_tool_call(ToolCall("lookup", {"key": "k"}, ""), tools, state={"db": {"k": "v"}}))
    assert result.ok and result.content == "v"


def test_a_group_shares_its_tasks_native_tools():
    native = lambda name, **kw: _tool_env(native_tools=True, name=name, **kw)  # noqa: E731
    assert EnvGroup([native("a"), native("b")]).tool_schemas() == native("a").tool_schemas()
    assert EnvGroup([_tool_env(name="a"), _tool_env(name="b")]).tool_schemas() is None
    different = ToolEnv([add], native_tools=True, name="b", rubric=Rubric([tool_used()]))
    with pytest.raises(ValueError, match="different native tools"):
        EnvGroup([native("a"), different]).tool_schemas()
