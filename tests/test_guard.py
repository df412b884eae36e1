"""The guard around reward functions and tools: nothing they do stops, hangs or floods the run."""

import asyncio
import logging
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from grpo_jax import guard
from grpo_jax.envs import Tool, ToolCall, ToolEnv, execute_tool_call, run_episodes
from grpo_jax.rubrics import RewardError, Rubric, check_rewards


def _score(rubric, answers):
    return rubric.score(None, [""] * len(answers), answers)


def _tool(fn, isolation="thread", **kwargs):
    tools = {"t": Tool.from_function(fn, name="t")}
    return asyncio.run(execute_tool_call(ToolCall("t", {}, ""), tools, isolation=isolation, **kwargs))


class BadRepr:
    def __repr__(self):
        raise RuntimeError("repr exploded")

    __str__ = __repr__


def _gone(pid: int, within_s: float = 3.0) -> bool:
    """Whether process `pid` no longer runs (gone, or a zombie waiting for init)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_sys_exit_and_base_exceptions_in_a_reward_are_counted_nan(isolation):
    def exits(answer):
        if answer == "exit":
            sys.exit(3)
        if answer == "interrupt":
            raise KeyboardInterrupt  # raised by the function, not a Ctrl-C
        if answer == "generator":
            raise GeneratorExit
        if answer == "repr":
            return BadRepr()  # not a number, and its str raises while saying so
        return 1.0

    async def exits_async(answer):
        if answer == "exit":
            sys.exit(4)
        return 1.0

    rubric = Rubric([exits, exits_async], isolation=isolation)
    result = _score(rubric, ["ok", "exit", "interrupt", "generator", "repr"])
    np.testing.assert_array_equal(np.isnan(result.scores["exits"]), [0, 1, 1, 1, 1])
    assert result.failures == {"exits": 4, "exits_async": 1}
    assert result.metrics["failures/exits"] == 4 and result.errors["exits"].startswith("SystemExit: 3")
    assert result.rewards[0] == 2.0 and np.isnan(result.rewards[1:]).all()


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_sys_exit_and_a_raising_repr_in_a_tool_become_errors_for_the_model(isolation):
    def exits():
        print("before")
        sys.exit("bye")

    exited = _tool(exits, isolation)
    assert exited.error_kind == "exception" and "SystemExit: bye" in exited.content
    assert exited.content.startswith("before")
    bad = _tool(lambda: BadRepr(), isolation)
    assert bad.error_kind == "exception" and "repr exploded" in bad.content
    assert _tool(lambda: [1, 2], isolation).content == "[1, 2]"


def test_tool_worker_that_dies_is_crashed_and_the_next_call_works():
    crashed = _tool(lambda: os._exit(7), "process")
    assert crashed.error_kind == "crashed" and "exit code 7" in crashed.content
    assert _tool(lambda: "fine", "process").content == "fine"


def test_default_time_limits_are_finite_and_none_is_refused():
    assert math.isfinite(guard.DEFAULT_TIMEOUT_S) and Rubric().timeout_s == guard.DEFAULT_TIMEOUT_S
    assert Rubric().isolation == "process" and ToolEnv([]).tool_timeout_s == 5.0
    for bad in (None, 0, -1, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="timeout_s"):
            Rubric(timeout_s=bad)
        with pytest.raises(ValueError, match="timeout_s"):
            ToolEnv([], tool_timeout_s=bad)
    with pytest.raises(ValueError, match="isolation"):
        Rubric(isolation="fork")
    env = ToolEnv([], reward_timeout_s=7.0, reward_isolation="thread")
    assert (env.rubric.timeout_s, env.rubric.isolation) == (7.0, "thread")


def test_hanging_reward_times_out_and_its_worker_is_killed(tmp_path):
    def hangs(answer):
        if answer == "hang":
            child = subprocess.Popen(["sleep", "60"])  # a grandchild: killed with the worker's group
            (tmp_path / "pids").write_text(f"{os.getpid()} {child.pid}")
            while True:  # busy: a thread would keep burning CPU after the time-out
                pass
        return 1.0

    killed = guard.stats()["guard/killed_workers"]
    threads = threading.active_count()
    start = time.perf_counter()
    result = _score(Rubric([hangs], timeout_s=0.5), ["hang", "fine"])
    assert time.perf_counter() - start < 5
    np.testing.assert_array_equal(np.isnan(result.rewards), [True, False])
    assert result.failures["hangs"] == 1 and "TimeoutError" in result.errors["hangs"]
    worker, grandchild = map(int, (tmp_path / "pids").read_text().split())
    assert worker != os.getpid() and worker not in guard.default_pool().pids
    assert _gone(worker) and _gone(grandchild)
    assert guard.stats()["guard/killed_workers"] == killed + 1
    assert threading.active_count() <= threads + guard.default_pool().size  # only the pool's idle threads
    assert not [t for t in threading.enumerate() if t.name.startswith("call-hangs")]


def test_thread_mode_abandons_a_hanging_call_and_counts_it():
    release = threading.Event()

    def hangs(answer):
        release.wait(10)
        return 1.0

    abandoned = guard.abandoned_threads()
    try:
        result = _score(Rubric([hangs], timeout_s=0.3, isolation="thread"), ["x"])
        assert np.isnan(result.rewards[0]) and guard.abandoned_threads() == abandoned + 1
    finally:
        release.set()


def test_a_flood_of_prints_is_captured_not_on_the_console(capfd, caplog):
    def noisy(answer):
        print("p" * 200_000)
        os.write(1, b"fd-one " * 1000)
        os.write(2, b"fd-two " * 1000)
        worker_thread = threading.Thread(target=lambda: print("from a thread " * 100))
        worker_thread.start()
        worker_thread.join()
        subprocess.run(["echo", "from a subprocess"])
        return 1.0

    with caplog.at_level(logging.INFO, logger="grpo_jax.rubrics.rubric"):
        result = _score(Rubric([noisy]), ["a", "b"])
    assert result.failures["noisy"] == 0 and (result.rewards == 1.0).all()
    out, err = capfd.readouterr()
    for word in ("ppp", "fd-one", "fd-two", "from a thread", "from a subprocess"):
        assert word not in out + err
    logged = [r.getMessage() for r in caplog.records if "printed" in r.getMessage()]
    assert len(logged) == 1 and "2/2 samples" in logged[0] and "ppp" in logged[0]
    assert len(logged[0]) < 1000  # truncated

    def tool():
        os.write(1, b"raw " * 10_000)
        return "done"

    reply = _tool(tool, "process", max_output_chars=300)
    assert reply.ok and reply.truncated and reply.content.startswith("raw raw")
    assert "[output truncated: 40005 characters" in reply.content
    out, err = capfd.readouterr()
    assert "raw" not in out + err


def test_unpicklable_arguments_fall_back_to_a_thread(caplog):
    def reads_state(state):
        return float(state["lock"] is not None)

    with caplog.at_level(logging.WARNING, logger="grpo_jax.guard"):
        result = Rubric([reads_state]).score(None, [""], states=[{"lock": threading.Lock()}])
    assert result.rewards[0] == 1.0
    assert any("cannot run in a worker process" in r.getMessage() for r in caplog.records)


def test_all_nan_rewards_raise_a_reward_error_naming_the_function():
    def broken(answer):
        raise ValueError("schema changed")

    result = _score(Rubric([broken, lambda answer: 1.0], names=["broken", "fine"]), ["a", "b"])
    with pytest.raises(RewardError, match=r"step 12.*'broken' \(2/2\)") as error:
        check_rewards(result.rewards, result.metrics, errors=result.errors, step=12)
    assert "schema changed" in str(error.value) and "'fine'" not in str(error.value)
    check_rewards(np.array([np.nan, 0.0]), result.metrics)  # one finite reward is enough
    check_rewards(np.array([]))


def test_tool_env_in_process_mode_kills_a_hanging_tool():
    def spin(n: int) -> str:
        """Spins forever on 0."""
        while n == 0:
            pass
        return str(n)

    env = ToolEnv([spin], tool_timeout_s=0.5, tool_isolation="process", max_turns=2)
    calls = {"stuck": '<tool_call>{"name": "spin", "arguments": {"n": 0}}</tool_call>',
             "fine": '<tool_call>{"name": "spin", "arguments": {"n": 3}}</tool_call>'}

    def policy(messages):
        question = messages[-1]["content"] if messages[-1]["role"] == "user" else None
        return calls[question] if question else "done"

    episodes = run_episodes(env, [{"question": q, "answer": ""} for q in calls], policy)
    by_q = {e.prompt[-1]["content"]: e for e in episodes}
    assert by_q["fine"].completion[1]["content"] == "3"
    assert "timed out after 0.5 s" in by_q["stuck"].completion[1]["content"]
    assert by_q["stuck"].state["tool_timeouts"] == 1 and by_q["stuck"].state["tool_errors"] == 1


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_reward_hanging_on_every_episode_costs_the_batch_a_few_time_limits(isolation):
    release = threading.Event()

    def always_hangs(answer):
        release.wait(30)
        return 1.0

    try:
        start = time.perf_counter()
        result = _score(Rubric([always_hangs], timeout_s=0.3, isolation=isolation), ["x"] * 40)
        assert time.perf_counter() - start < 4  # not 40 x 0.3 s / workers
        assert result.failures["always_hangs"] == 40 and np.isnan(result.rewards).all()
        with pytest.raises(RewardError, match="always_hangs"):
            check_rewards(result.rewards, result.metrics)
    finally:
        release.set()
