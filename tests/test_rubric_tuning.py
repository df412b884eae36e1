"""Rubric tuning (`grpo_jax.rubrics.tuning`, `search`, `criteria`): successive halving's bookkeeping on a fake
objective, the audit discarding hackable candidates before any training, criteria parsing on
adversarial replies, judge-proposed criteria through the real `openai` SDK against a local fake
endpoint (no network), and one tiny end-to-end tuner run on the `runlocal` config."""

from __future__ import annotations

import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from config_fixtures import load_config

from grpo_jax import ablation
from grpo_jax.components import build_env
from grpo_jax.rubrics import criteria, search, tuning
from grpo_jax.rubrics.rubric import rubric_weights

# -- successive halving: bookkeeping only -----------------------------------------------------


def test_halving_schedule():
    assert search.halving_schedule(8, min_steps=5) == [(8, 5), (4, 10), (2, 20)]
    assert search.halving_schedule(5, min_steps=2) == [(5, 2), (2, 4)]
    assert search.halving_schedule(2, min_steps=3) == [(2, 3)]
    assert search.halving_schedule(1, min_steps=3) == [(1, 3)]
    assert search.halving_schedule(9, min_steps=1, eta=3) == [(9, 1), (3, 3)]
    assert search.halving_schedule(8, min_steps=5, max_rounds=2) == [(8, 5), (4, 10)]
    assert search.halving_schedule(8, min_steps=5, max_steps=12) == [(8, 5), (4, 10), (2, 12)]
    with pytest.raises(ValueError):
        search.halving_schedule(4, min_steps=1, eta=1)


def test_successive_halving_on_a_fake_objective():
    # "f" is best only when trained longer,
    # "a" fails (NaN) in round 2, "c" and "d" tie in round 1 (the earlier one is kept).
    base = {"a": 0.9, "b": 0.5, "c": 0.4, "d": 0.4, "e": 0.1, "f": 0.45, "g": 0.0, "h": float("nan")}
    calls, rounds_seen = [], []

    def objective(name, steps, r):
        calls.append((name, steps, r))
        if name == "a" and r == 1:
            return [float("nan"), float("nan")]
        bonus = 0.5 if (name == "f" and steps >= 10) else 0.0
        return [base[name] + bonus, base[name] + bonus + 0.02]  # two seeds: the mean counts

    winner, rounds = search.successive_halving(list(base), objective, min_steps=5,
                                               on_round=lambda r, rs: rounds_seen.append(r.index),
                                               log=lambda line: None)
    assert [(r.index, r.steps, sorted(r.scores)) for r in rounds] == [
        (0, 5, sorted(base)), (1, 10, ["a", "b", "c", "f"]), (2, 20, ["b", "f"])]
    assert rounds[0].survivors == ["a", "b", "f", "c"]  # c before d (tie: order), h (NaN) last
    assert rounds[0].scores["b"] == pytest.approx(0.51) and rounds[0].per_seed["b"] == [0.5, 0.52]
    assert math.isnan(rounds[0].scores["h"])
    assert rounds[1].survivors == ["f", "b"]  # a failed: NaN ranks last
    assert rounds[2].survivors == ["f"] and winner == "f"
    assert rounds_seen == [0, 1, 2]
    assert len(calls) == 8 + 4 + 2 and calls[8:12] == [("a", 10, 1), ("b", 10, 1), ("f", 10, 1), ("c", 10, 1)]
    assert search.successive_halving([], objective, min_steps=1) == (None, [])
    # keep_best: NaN last, ties by the tiebreaks, then by order
    assert search.keep_best({"x": float("nan"), "y": 0.2, "z": 0.2}, ["z", "y", "x"], 3) == ["z", "y", "x"]
    assert search.keep_best({"x": 0.2, "y": 0.2, "z": 0.2}, ["z", "y", "x"], 3,
                            {"x": 0.5, "y": float("nan"), "z": 0.1}) == ["x", "z", "y"]
    winner, rounds = search.successive_halving(["p", "q"], lambda n, s, r: ([1.0], [0.3 if n == "q" else 0.1]),
                                               min_steps=1, log=lambda line: None)
    assert winner == "q" and rounds[0].tiebreaks == {"p": 0.1, "q": 0.3}


def test_grid_random_and_judge_candidates():
    grid = search.grid_candidates({"strict_format": [0, 0.5], "tool_used": [0.1]}, fixed={"correct_answer": 1.0})
    assert [c.name for c in grid] == ["strict_format=0,tool_used=0.1", "strict_format=0.5,tool_used=0.1"]
    assert grid[1].overrides() == {"env.rubric_weights": {"correct_answer": 1.0, "strict_format": 0.5,
                                                          "tool_used": 0.1}}
    drawn = search.random_candidates(["a", "b"], 5, seed=3, high=0.5)
    assert len({c.name for c in drawn}) == 5 and all(0 <= w <= 0.5 for c in drawn for w in c.weights.values())
    assert [c.name for c in search.dedupe(grid + grid[:1])] == [c.name for c in grid]
    judge = search.judge_candidate({"correct_answer": 1.0, "strict_format": 0.2}, ["The answer is right."],
                                   weight=0.3, model="m", base_url="http://x/v1")
    funcs = judge.overrides()["env.rubric.funcs"]
    assert funcs["strict_format"] == {"weight": 0.2, "fn": "format_reward"}
    assert funcs["judge"]["fn"] == search.JUDGE_FN and funcs["judge"]["criteria"] == ["The answer is right."]


def test_comparison_variants_merge_a_winner_equal_to_a_baseline():
    only = {"env.rubric_weights": {"correct_answer": 1.0, "strict_format": 0.0}}
    hand = {"env.rubric_weights": {"correct_answer": 1.0, "strict_format": 0.2}}
    result = {"winner": {"name": "strict_format=0", "overrides": json.loads(json.dumps(only))}}
    assert tuning.comparison_variants(result, {"correctness only": only, "hand-written": hand}) == {
        "correctness only = tuned": only, "hand-written": hand}
    result = {"winner": {"name": "strict_format=0.1", "overrides": {"env.rubric_weights": {"strict_format": 0.1}}}}
    assert list(tuning.comparison_variants(result, {"hand-written": hand})) == ["hand-written",
                                                                              "tuned (strict_format=0.1)"]
    with pytest.raises(ValueError, match="no winner"):
        tuning.comparison_variants({"winner": None}, {})


# -- the audit: a constraint before any training ----------------------------------------------

def _env(weights):
    return build_env(ablation.with_overrides(load_config("calculator_sparse"), {"env.rubric_weights": weights}).env)


def test_the_audit_discards_hackable_candidates():
    env = _env({})
    rows = env.dataset("train", n=4, seed=0)
    hand = tuning.audit_candidate(env, rows)
    assert hand.passed and hand.gold_score == pytest.approx(1.3), hand.summary()
    assert hand.scores["tool_call_wrong_answer"] == pytest.approx(0.3)  # tool use + format, no answer
    tag_only = tuning.audit_candidate(_env({"correct_answer": 0.0, "strict_format": 1.0, "tool_used": 0.0}), rows)
    assert not tag_only.passed  # reward for the answer tag alone
    assert {"format_only", "unevaluated_expression", "tool_call_wrong_answer"} <= set(tag_only.flagged)
    tool_spam = tuning.audit_candidate(_env({"strict_format": 0.0, "tool_used": 0.6}), rows)
    assert tool_spam.flagged == ["tool_call_wrong_answer", "tool_call_no_answer"]  # the replayed tool hacks


def test_the_tuner_discards_hackable_candidates_before_training(tmp_path):
    config = load_config("calculator_sparse")
    hackable = search.Candidate("tag only", {"correct_answer": 0.0, "strict_format": 1.0, "tool_used": 0.0})
    with pytest.raises(ValueError, match="every candidate rewards a known hack"):
        tuning.tune(config, str(tmp_path), candidates=[hackable], audit_rows=4, log=lambda line: None)
    assert not os.path.exists(tmp_path / "runs")  # nothing trained
    result = tuning.load_result(str(tmp_path))
    assert result["discarded"][0]["name"] == "tag only" and "format_only" in result["discarded"][0]["flagged"]
    assert result["candidates"]["tag only"]["status"] == "discarded: audit"


# -- judge-proposed criteria --------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    ("1. The final answer equals the product.\n2. The calculator is called with the question's expression.",
     ["The final answer equals the product.", "The calculator is called with the question's expression."]),
    ("Here are my criteria:\n\n- **The answer is a single number.**\n* The answer tag is closed properly\n"
     "• No text follows the answer tag", ["The answer is a single number.", "The answer tag is closed properly",
                                          "No text follows the answer tag"]),
    ("1) Uses the tool once\n(2) Copies the tool's result exactly\nCriterion 3: Gives exactly one answer tag",
     ["Uses the tool once", "Copies the tool's result exactly", "Gives exactly one answer tag"]),
    ("I'm sorry, I cannot help with designing a rubric.", []),                 # refusal: no list
    ("", []),
    (None, []),
    ("The response should be correct and well formatted.", []),                # prose, no list
    ("1. Correct\n2. Format\n3. ok", []),                                      # too short to check
    ("Criteria:\n1. Correctness:\n2. The answer equals the exact product.", ["The answer equals the exact product."]),
    ("1. The answer is right.\n2. the answer is right\n3. The answer is right.", ["The answer is right."]),  # dupes
    ("1. " + "very long " * 100, []),                                          # runaway item
    ("1. VERDICT: YES this is good\n2. The tool result is copied exactly.", ["The tool result is copied exactly."]),
    ("\n".join(f"{i}. Criterion number {i} holds." for i in range(1, 9)),
     [f"Criterion number {i} holds." for i in range(1, 6)]),                   # at most max_criteria
    ("Reasoning: 2. is not a list item in prose\n- The answer has six digits.", ["The answer has six digits."]),
])
def test_parse_criteria(reply, expected):
    assert criteria.parse_criteria(reply, max_criteria=5) == expected


class FakeOpenAI(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions: proposal requests get the scripted replies in
    order; judge requests get VERDICT: YES when the judged response has an answer tag."""
    proposals: list[str] = []
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        user = body["messages"][-1]["content"]
        if "Propose at most" in user:
            content = type(self).proposals.pop(0) if type(self).proposals else "No."
        else:
            judged = user.split("# Response to judge\n")[1].split("\n\n# ")[0]
            content = "Checked.\nVERDICT: " + ("YES" if "<answer>" in judged else "NO")
        payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": content}}],
                              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_openai():
    FakeOpenAI.proposals, FakeOpenAI.requests = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_proposed_criteria_round_trip_through_the_openai_sdk(fake_openai):
    config = load_config("calculator_sparse")
    settings = criteria.ProposalSettings(base_url=fake_openai, model="judge-model", num_samples=2, attempts=2)
    # A reply without criteria is a counted failure; the second attempt's list is parsed.
    FakeOpenAI.proposals = ["I would rather not.", "Sure:\n1. The final answer tag holds the product.\n"
                            "2. **The calculator was called.**\n3. ok"]
    proposal = criteria.propose_from_samples(settings, config, None, log=lambda line: None)
    assert proposal.criteria == ["The final answer tag holds the product.", "The calculator was called."]
    assert proposal.failures == 1 and len(proposal.replies) == 2
    request = FakeOpenAI.requests[0]
    assert request["model"] == "judge-model"
    assert "<calc>" in request["messages"][1]["content"]  # the samples (gold demonstrations) were shown
    # None at all, or an endpoint that is down: counted failures, no exception.
    FakeOpenAI.proposals = ["no", "nothing"]
    assert criteria.propose_from_samples(settings, config, None, log=lambda line: None).failures == 2
    down = criteria.propose_criteria("t", [], model="m", base_url="http://127.0.0.1:9/v1", attempts=1)
    assert down.criteria == [] and down.failures == 1 and down.errors

    # The criteria become an llm_judge candidate, built from config and scored through the SDK.
    env = build_env(load_config("calculator_sparse").env)
    candidate = search.judge_candidate(rubric_weights(env), proposal.criteria, weight=0.1,
                                       model="judge-model", base_url=fake_openai)
    judged = build_env(ablation.with_overrides(config, candidate.overrides()).env)
    assert set(judged.rubric.names) == {"correct_answer", "strict_format", "tool_used", "tool_calls",
                                        "tool_errors", "judge"}
    rows = env.dataset("train", n=2, seed=0)
    report = tuning.audit_candidate(judged, rows)
    assert report.gold_score == pytest.approx(1.4)  # 1 + 0.2 + 0.1 + judge 0.1
    assert report.passed and report.scores["format_only"] == pytest.approx(0.3)  # 0.2 + judge's 0.1
    assert report.scores["tool_call_wrong_answer"] == pytest.approx(0.4)
    # Weighted up, the judge that says YES to any answer tag is flagged by the audit.
    hackable = search.judge_candidate(rubric_weights(env), proposal.criteria, weight=1.0,
                                      model="judge-model", base_url=fake_openai)
    judged = build_env(ablation.with_overrides(config, hackable.overrides()).env)
    assert {"format_only", "tool_call_wrong_answer"} <= set(tuning.audit_candidate(judged, rows).flagged)
    assert sum("Response to judge" in r["messages"][-1]["content"] for r in FakeOpenAI.requests) > 10


# -- stored rollouts and the end-to-end tuner -----------------------------------------------------

def test_a_tiny_tuner_run_end_to_end(tmp_path):
    config = load_config("calculator_sparse")
    candidates = [search.Candidate(tuning.HAND_WRITTEN, {"correct_answer": 1.0, "strict_format": 0.2,
                                                         "tool_used": 0.1}, source="hand"),
                  search.Candidate("correctness only", {"correct_answer": 1.0, "strict_format": 0.0,
                                                        "tool_used": 0.0}),
                  search.Candidate("tag only", {"correct_answer": 0.0, "strict_format": 1.0, "tool_used": 0.0})]
    lines = []
    result = tuning.tune(config, str(tmp_path), candidates=candidates, min_steps=1, seeds=[0], audit_rows=4,
                         log=lines.append)
    assert result["discarded"] == [{"name": "tag only", "reason": "audit",
                                    "flagged": result["discarded"][0]["flagged"]}]
    assert [r["steps"] for r in result["rounds"]] == [1]
    assert set(result["rounds"][0]["scores"]) == {tuning.HAND_WRITTEN, "correctness only"}
    assert result["winner"]["name"] in (tuning.HAND_WRITTEN, "correctness only")
    assert tuning.winner_overrides(result)["env.rubric_weights"]["correct_answer"] == 1.0
    # The hand-written rubric's run was re-scored under every candidate that passed the audit.
    hand = result["candidates"][tuning.HAND_WRITTEN]
    assert hand["rescore"]["sign_flip_frac"] == 0.0  # its own rubric: the stored advantages
    assert set(result["candidates"]["correctness only"]["rescore"]) == set(tuning.RESCORE_COLUMNS)
    assert result["rescored_from"]["workdir"] == hand["runs"]["1@0"]["workdir"]
    assert any(line.startswith("round 1/1") for line in lines) and any("discarded tag only" in x for x in lines)
    assert "winner" in tuning.summary_table(result)
    # One warm start for both rubrics: the second candidate's run read the first one's.
    second = result["candidates"]["correctness only"]["runs"]["1@0"]["workdir"]
    with open(os.path.join(second, "progress.txt")) as f:
        assert "warm start read from" in f.read()
    # Again: the finished result is returned as is, no run touched.
    again = tuning.tune(config, str(tmp_path), candidates=candidates, min_steps=1, seeds=[0], audit_rows=4,
                        log=lines.append)
    assert again["winner"] == result["winner"] and "is complete" in lines[-1]
    np.testing.assert_equal(len(os.listdir(tmp_path / "runs" / "steps_1")), 2)

