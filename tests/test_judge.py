"""LLM judges (`grpo_jax.rubrics.judge`): verdict parsing on adversarial replies, the judge reward
function on a scripted fake client inside a `Rubric` (failures counted, cache), and the same
judge through our served endpoint and the in-process `engine_judge_client` on a tiny model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizer_fixtures import build_hf_tokenizer_dir

from grpo_jax.rubrics import Rubric, engine_judge_client, judge_prompt, llm_judge, parse_verdict

CRITERIA = ["The final answer equals the reference answer.", "The reasoning has no arithmetic errors."]
PROMPT = [{"role": "user", "content": "What is 12 + 30?"}]


def completion(text):
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("reply, scale, expected", [
    ("The answer matches.\nVERDICT: YES", None, 1.0),
    ("It is wrong.\nVERDICT: NO", None, 0.0),
    ("The response looks fine to me.", None, None),                              # missing verdict
    ("", None, None),
    (None, None, None),
    ("VERDICT: YES\nOn second thought...\nVERDICT: NO", None, None),             # contradictory
    ("VERDICT: YES\nTo be sure, again:\nVERDICT: yes.", None, 1.0),              # agreeing
    ("I cannot judge this.", None, None),                                        # refusal
    ("I'm sorry, but I can't help with evaluating this.", None, None),
    ("verdict: no", None, 0.0),                                                  # lowercase
    ("**VERDICT: YES**", None, 1.0),                                             # markdown bold
    ("**Verdict:** **No**", None, 0.0),
    ("## Final verdict: Yes", None, 1.0),
    ("- VERDICT: NO", None, 0.0),
    ("The verdict: YES is tempting, but the sum is 43.\nVERDICT: NO", None, 0.0),  # word inside reasoning
    ("I would say the verdict is YES overall.", None, None),
    ("VERDICT: YES or NO", None, None),                                          # the format echoed
    ("VERDICT: not sure", None, None),
    ("VERDICT: maybe", None, None),
    ("SCORE: 8", None, None),                                                    # binary wants VERDICT
    ("Good work.\nSCORE: 8", (0, 10), 0.8),
    ("SCORE: 7/10", (0, 10), 0.7),
    ("SCORE: 7 out of 10", (1, 10), 6 / 9),
    ("SCORE: I'd give it an 8, solid work", (0, 10), 0.8),                       # prose around the number
    ("SCORE: **8**", (0, 10), 0.8),
    ("**Score: 2.5**", (1, 5), 0.375),
    ("SCORE: 11", (0, 10), None),                                                # out of range
    ("SCORE: -1", (0, 10), None),
    ("SCORE: 4/5", (0, 10), None),                                               # another denominator
    ("SCORE: between 6 and 7", (0, 10), None),
    ("SCORE: 6\nSCORE: 7", (0, 10), None),
    ("SCORE: 6\nSCORE: 6.0", (0, 10), 0.6),
    ("VERDICT: YES", (0, 10), None),                                             # scale wants SCORE
    ("score: ten", (0, 10), None),
])
def test_parse_verdict(reply, scale, expected):
    got = parse_verdict(reply, scale=scale)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_parse_verdict_rejects_a_bad_scale():
    with pytest.raises(ValueError):
        parse_verdict("SCORE: 1", scale=(5, 5))


def test_judge_prompt_asks_for_reasoning_then_the_exact_format():
    messages = judge_prompt(CRITERIA, PROMPT, completion("It is 42."), answer="42")
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    for part in ["What is 12 + 30?", "It is 42.", "# Reference answer\n42", "1. " + CRITERIA[0],
                 "2. " + CRITERIA[1], "step by step"]:
        assert part in user
    assert user.endswith("VERDICT: YES\nor\nVERDICT: NO")
    scored = judge_prompt(CRITERIA, PROMPT, completion("It is 42."), scale=(1, 10))[1]["content"]
    assert "Reference answer" not in scored and scored.endswith("SCORE: <a number from 1 to 10>")
    tool = judge_prompt(["x"], PROMPT, [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "calc", "arguments": "{}"}}]}])[1]["content"]
    assert "[tool call]" in tool and "calc" in tool
    with pytest.raises(ValueError):
        judge_prompt([], PROMPT, completion("x"))


class FakeClient:
    """What `llm_judge` uses of `openai.AsyncOpenAI`, answering with scripted replies."""

    def __init__(self, replies):
        self.replies, self.calls = dict(replies), []
        self.chat = SimpleNamespace(completions=self)

    async def create(self, *, model, messages, temperature, max_tokens):
        self.calls.append(dict(model=model, messages=messages, temperature=temperature, max_tokens=max_tokens))
        judged = messages[1]["content"].split("# Response to judge\n")[1].split("\n\n")[0]
        content = self.replies[judged.split("\n", 1)[1]]
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=content))])


def test_judge_in_a_rubric_scores_counts_failures_and_caches():
    client = FakeClient({"It is 42.": "Criterion 1 holds; so does 2.\nVERDICT: YES",
                         "It is 43.": "The sum is wrong.\n**VERDICT: NO**",
                         "It is 41.": "I cannot judge this."})
    judge = llm_judge(CRITERIA, client=client, model="judge-model", max_tokens=64)
    assert judge.__name__ == "judge"
    rubric = Rubric([judge], isolation="thread")
    completions = [completion(t) for t in ("It is 42.", "It is 43.", "It is 41.")]
    result = rubric.score([PROMPT] * 3, completions, answers=["42"] * 3)
    np.testing.assert_array_equal(result.scores["judge"][:2], [1.0, 0.0])
    assert math.isnan(result.scores["judge"][2]) and math.isnan(result.rewards[2])
    assert result.failures["judge"] == 1 and result.metrics["failures/judge"] == 1.0
    assert "I cannot judge this." in result.errors["judge"]
    assert len(client.calls) == 3 and judge.cache_info() == {"hits": 0, "misses": 3, "size": 3}
    call = client.calls[0]
    assert call["model"] == "judge-model" and call["temperature"] == 0.0 and call["max_tokens"] == 64
    assert "# Reference answer\n42" in call["messages"][1]["content"]

    again = rubric.score([PROMPT] * 3, completions, answers=["42"] * 3)  # all hits, even the failure
    assert len(client.calls) == 3 and judge.cache_info() == {"hits": 3, "misses": 3, "size": 3}
    np.testing.assert_array_equal(again.scores["judge"], result.scores["judge"])
    assert again.failures["judge"] == 1

    rubric.score([PROMPT], completions[:1], answers=["41"])  # another answer is another request
    assert len(client.calls) == 4
    judge.cache_clear()
    assert judge.cache_info() == {"hits": 0, "misses": 0, "size": 0}

    twice = rubric.score([PROMPT] * 2, completions[1:2] * 2, answers=["42"] * 2)  # concurrent duplicates
    assert len(client.calls) == 5 and judge.cache_info() == {"hits": 1, "misses": 1, "size": 1}
    np.testing.assert_array_equal(twice.scores["judge"], [0.0, 0.0])

    uncached = llm_judge(CRITERIA, client=client, model="m", cache=False, name="judge_nocache")
    Rubric([uncached], isolation="thread").score([PROMPT] * 2, completions[:1] * 2, answers=["42"] * 2)
    assert len(client.calls) == 7 and uncached.cache_info()["hits"] == 0


def test_scored_judge():
    client = FakeClient({"It is 42.": "Clear and right.\nSCORE: 7/10", "It is 43.": "SCORE: 12"})
    judge = llm_judge(["Correct and clear."], client=client, model="m", scale=(0, 10), name="quality")
    result = Rubric([judge]).score([PROMPT] * 2, [completion("It is 42."), completion("It is 43.")])  # process mode
    assert result.scores["quality"][0] == pytest.approx(0.7) and math.isnan(result.scores["quality"][1])
    assert result.metrics["failures/quality"] == 1.0
    assert "SCORE: <a number from 0 to 10>" in client.calls[0]["messages"][1]["content"]


def test_llm_judge_checks_its_arguments():
    with pytest.raises(ValueError, match="model"):
        llm_judge(CRITERIA, client=FakeClient({}))
    with pytest.raises(ValueError, match="base_url"):
        llm_judge(CRITERIA, model="m")
    with pytest.raises(ValueError, match="criteria"):
        llm_judge([], client=FakeClient({}), model="m")


MAX_LENGTH = 768


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from grpo_jax.tokenizer import from_pretrained

    return from_pretrained(build_hf_tokenizer_dir(tmp_path_factory.mktemp("judge_tokenizer")))


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from grpo_jax.models import ModelConfig, create_model

    return create_model(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, head_dim=8, d_ff=64, max_position_embeddings=MAX_LENGTH), seed=3)


def test_served_and_in_process_judges_agree(tiny_model, tokenizer):
    from grpo_jax.serve import build_engine, serve

    engine_config = dict(slots=2, max_length=MAX_LENGTH, prefill_chunk=256, prefill_rows=2, decode_steps=8)
    completions = [completion(t) for t in ("It is 42.", "It is 43.", "The answer is 42.")]
    judges = {}
    with serve(build_engine(tiny_model, tokenizer, **engine_config), tokenizer, model_name="tiny") as server:
        judges["served"] = llm_judge(CRITERIA, base_url=server.url + "/v1", model="tiny", max_tokens=16)
        served = Rubric([judges["served"]], isolation="thread").score([PROMPT] * 3, completions, answers=["42"] * 3)
    client, close = engine_judge_client(tiny_model, tokenizer, model_name="tiny", **engine_config)
    try:
        judges["local"] = llm_judge(CRITERIA, client=client, model="tiny", max_tokens=16)
        rubric = Rubric([judges["local"]], isolation="thread")
        local = rubric.score([PROMPT] * 3, completions, answers=["42"] * 3)
        judges["local"].cache_clear()  # a second event loop on the same client, greedy: the same replies
        again = rubric.score([PROMPT] * 3, completions, answers=["42"] * 3)
    finally:
        close()
    replies = {k: j.replies for k, j in judges.items()}
    assert len(replies["served"]) == 3 and all(replies["served"].values())  # the random model said something
    assert replies["served"] == replies["local"]  # same requests, same greedy reply texts
    for name, result in (("local", local), ("again", again)):
        np.testing.assert_array_equal(result.scores["judge"], served.scores["judge"], err_msg=name)
        assert result.failures["judge"] == served.failures["judge"]
    expected = [parse_verdict(r) for r in replies["served"].values()]
    assert served.failures["judge"] == sum(v is None for v in expected)
