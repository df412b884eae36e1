"""The OpenAI-compatible server (`grpo_jax.serve`) on a tiny random model, driven by the real
`openai` client: chat, log-probs against the trainer's teacher-forced forward, tools, n, stop
strings, streaming, errors, the token endpoint."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request

import jax.numpy as jnp
import numpy as np
import openai
import pytest
from tokenizer_fixtures import hf_tokenizer, hf_tokenizer_dir  # noqa: F401  (fixtures are used by name)

from grpo_jax.engine import Completion
from grpo_jax.envs.tool_calls import Llama3JSONToolCallParser
from grpo_jax.envs.tools import JSONToolCallParser
from grpo_jax.models import ModelConfig, create_model
from grpo_jax.models.logprobs import sequence_logprobs
from grpo_jax.serve import Recorder, build_engine, serve
from grpo_jax.serve.chat import TextStream, tool_calls_of

MAX_LENGTH = 384
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluates an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
USER = [{"role": "user", "content": "What is 12 + 30?"}]


@pytest.fixture(scope="module")
def model(hf_tokenizer):  # noqa: F811
    return create_model(ModelConfig(vocab_size=hf_tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, head_dim=8, d_ff=64, max_position_embeddings=MAX_LENGTH), seed=1)


@pytest.fixture(scope="module")
def server(model, hf_tokenizer):  # noqa: F811
    engine = build_engine(model, hf_tokenizer, slots=4, max_length=MAX_LENGTH, prefill_chunk=64, prefill_rows=2,
                          decode_steps=8)
    with serve(engine, hf_tokenizer, model_name="tiny") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, path, body, headers=()):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **dict(headers)})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(client, **kwargs):
    return client.chat.completions.create(**{"model": "tiny", "messages": USER, "max_tokens": 16, **kwargs})


def test_plain_chat_and_models(client):
    r = chat(client, seed=1)
    assert r.object == "chat.completion" and r.model == "tiny" and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert chat(client, seed=1).choices[0].message.content == choice.message.content  # a seed draws the same
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_logprobs_equal_the_teacher_forced_forward(client, server, model, hf_tokenizer):  # noqa: F811
    r = chat(client, seed=7, temperature=0.7, logprobs=True, max_tokens=24, user="ep-logprobs")
    (record,) = server.recorder.pop("ep-logprobs")
    assert record.prompt_ids == tuple(hf_tokenizer.encode_chat(USER)) and len(record.completion_ids) >= 1
    tokens = jnp.asarray([record.prompt_ids + record.completion_ids], jnp.int32)
    teacher = np.asarray(sequence_logprobs(model, tokens, temperature=0.7))[0, len(record.prompt_ids) - 1:]
    np.testing.assert_allclose(record.logprobs, teacher, atol=1e-4)
    entries = r.choices[0].logprobs.content
    shown = len(record.completion_ids) - (record.completion_ids[-1] in hf_tokenizer.stop_ids)
    assert len(entries) == shown  # the end-of-turn token is not content
    np.testing.assert_allclose([e.logprob for e in entries], record.logprobs[:shown], atol=1e-6)
    joined = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace")
    assert joined == r.choices[0].message.content


def test_n_choices_share_the_prompt_and_differ(client, server):
    r = chat(client, n=3, seed=3, user="ep-n")
    assert [c.index for c in r.choices] == [0, 1, 2]
    records = server.recorder.pop("ep-n")
    assert len(records) == 3 and len({rec.prompt_ids for rec in records}) == 1
    assert len({rec.completion_ids for rec in records}) > 1
    assert r.usage.completion_tokens == sum(len(rec.completion_ids) for rec in records)
    assert chat(client, n=1, seed=3).choices[0].message.content == r.choices[0].message.content  # row 0's draws


def test_concurrent_requests_batch_without_changing_draws(client):
    seeds = [21, 22, 23, 24, 25, 26]
    alone = [chat(client, seed=s, max_tokens=12).choices[0].message.content for s in seeds]
    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:  # more requests than slots
        together = list(pool.map(lambda s: chat(client, seed=s, max_tokens=12).choices[0].message.content, seeds))
    assert together == alone
    wide = chat(client, n=6, seed=21, max_tokens=12)  # a group wider than the engine's 4 slots
    assert len(wide.choices) == 6 and wide.choices[0].message.content == alone[0]


def test_stop_string_cuts_the_text(client):
    full = chat(client, seed=11, max_tokens=32).choices[0].message.content
    k = next(k for k in range(2, len(full)) if full[k].isascii() and full[k].isalnum() and full.index(full[k]) == k)
    cut = chat(client, seed=11, max_tokens=32, stop=[full[k], "never-sampled-stop"]).choices[0]
    assert cut.message.content == full[:k] and cut.finish_reason == "stop"


@pytest.mark.parametrize("logprobs", [False, True])
def test_streaming_concatenates_to_the_non_streamed_completion(client, logprobs):
    whole = chat(client, n=2, seed=5, logprobs=logprobs, max_tokens=20)
    text, finish, entries, usage = {0: "", 1: ""}, {}, {0: [], 1: []}, None
    for chunk in chat(client, n=2, seed=5, logprobs=logprobs, max_tokens=20, stream=True,
                      stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if not chunk.choices:
            usage = chunk.usage
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
            if c.logprobs and c.logprobs.content:
                entries[c.index] += [e.logprob for e in c.logprobs.content]
    for c in whole.choices:
        assert text[c.index] == c.message.content and finish[c.index] == c.finish_reason
        if logprobs:
            assert entries[c.index] == [e.logprob for e in c.logprobs.content]
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()


def test_text_stream_holds_back_what_may_change():
    decode = lambda ids: "".join(map(chr, ids))  # noqa: E731
    stream = TextStream(decode, stop_ids=(0,), stops=("xyz",))
    deltas = [stream.push([ord(c) for c in part]) for part in ("ab", "cx", "y", "q")]
    assert deltas == ["ab", "c", "", "xyq"] and stream.finish("abcxyq") == ""
    stream = TextStream(decode, stop_ids=(0,), stops=("xyz",))
    assert stream.push([ord("a"), ord("x")]) == "a" and stream.push([ord("y"), ord("z"), ord("w")]) == ""
    assert stream.finish("a") == ""


def test_tool_calls_parsed_into_openai_form(server, hf_tokenizer):  # noqa: F811
    text = 'Let me compute.\n<tool_call>{"name": "calculator", "arguments": {"expression": "17 * 23"}}</tool_call>'
    content, calls = tool_calls_of(text, JSONToolCallParser())
    assert content == "Let me compute."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("function", "calculator", {"expression": "17 * 23"})]
    assert calls[0]["id"].startswith("call_")
    content, calls = tool_calls_of('<|python_tag|>{"name": "calculator", "parameters": {"expression": "1"}}',
                                   Llama3JSONToolCallParser())
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"expression": "1"}
    assert tool_calls_of("<tool_call>{not json</tool_call>", JSONToolCallParser()) == \
        ("<tool_call>{not json</tool_call>", [])  # what the model wrote, as text
    # The response path on a crafted completion: the stop token dropped, finish_reason tool_calls.
    service = server.app.state.service
    ids = hf_tokenizer.encode(text) + [hf_tokenizer.end_of_turn_ids[0]]
    choice = service._choice(0, Completion(ids, [0.0] * len(ids), "stop"), [], parse_tools=True)
    assert choice.finish_reason == "tool_calls" and choice.content == "Let me compute."
    assert choice.tool_calls[0]["function"]["name"] == "calculator"


def test_tools_rendered_and_a_tool_round_trip_answered(client, server, hf_tokenizer):  # noqa: F811
    r = chat(client, tools=[CALCULATOR], seed=2, user="ep-tools")
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    (first,) = server.recorder.pop("ep-tools")
    rendered = hf_tokenizer.decode(first.prompt_ids)
    assert "# Tools" in rendered and '"name": "calculator"' in rendered
    call = {"id": "call_1", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": "17 * 23"})}}
    messages = [{"role": "system", "content": "Use the tools."}, *USER,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "391"}]
    r = chat(client, messages=messages, tools=[CALCULATOR], seed=2, user="ep-tools")
    assert isinstance(r.choices[0].message.content, (str, type(None)))
    (second,) = server.recorder.pop("ep-tools")
    rendered = hf_tokenizer.decode(second.prompt_ids)
    # The fixture's template does not render tool_calls: the call is written in the model's format.
    assert '<tool_call>{"name": "calculator", "arguments": {"expression": "17 * 23"}}</tool_call><|im_end|>' in rendered
    assert "<tool_response>\n391\n</tool_response>" in rendered and rendered.endswith("<|im_start|>assistant\n")
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       chat(client, messages=messages, tools=[CALCULATOR], seed=2, stream=True) if c.choices)
    assert streamed == (r.choices[0].message.content or "")
    plain = chat(client, tools=[CALCULATOR], tool_choice="none", seed=2, user="ep-none")
    assert "# Tools" not in hf_tokenizer.decode(server.recorder.pop("ep-none")[0].prompt_ids)
    assert plain.choices[0].message.tool_calls is None


def test_bad_requests_are_400_and_the_server_keeps_serving(client, server):
    bad = [dict(messages=[{"role": "wizard", "content": "hi"}]), dict(n=0), dict(temperature=-1.0),
           dict(top_logprobs=2, logprobs=True), dict(tool_choice="required", tools=[CALCULATOR]),
           dict(messages=[{"role": "user", "content": "the quick brown fox " * 200}]), dict(max_tokens=0),
           dict(messages=[]), dict(messages=[{"role": "user"}])]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            chat(client, **kwargs)
        assert caught.value.status_code == 400 and caught.value.body["type"] == "invalid_request_error"
    assert caught.value.body["param"] == "messages[0].content"
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, messages=[{"role": "user", "content": "the quick brown fox " * 200}])
    assert caught.value.body["code"] == "context_length_exceeded"
    status, body = post(server, "/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(server, "/v1/chat/completions", {"model": "tiny"})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(server, "/v1/tokens/generate", {"prompt_ids": [1, 10 ** 6], "max_tokens": 4})
    assert status == 400 and "outside the vocabulary" in body["error"]["message"]
    assert chat(client, seed=1).choices[0].message.content is not None


def test_internal_error_is_500_in_openai_shape(client, server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.app.state.service, "_open", broken)
    with pytest.raises(openai.InternalServerError) as caught:
        chat(client)
    assert caught.value.status_code == 500 and caught.value.body["type"] == "server_error"
    monkeypatch.undo()
    assert chat(client, seed=1).choices[0].finish_reason in ("stop", "length")


def test_token_endpoint_matches_chat_and_records(client, server, hf_tokenizer):  # noqa: F811
    prompt = hf_tokenizer.encode_chat(USER)
    status, body = post(server, "/v1/tokens/generate",
                        {"prompt_ids": prompt, "max_tokens": 12, "n": 2, "seed": 9, "temperature": 0.8},
                        headers={"X-Episode-Id": "ep-tokens"})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    records = server.recorder.pop("ep-tokens")
    for c, rec in zip(body["choices"], records):
        assert len(c["token_ids"]) == len(c["logprobs"]) >= 1 and c["finish_reason"] in ("stop", "length")
        assert rec.prompt_ids == tuple(prompt) and list(rec.completion_ids) == c["token_ids"]
    same = chat(client, seed=9, temperature=0.8, max_tokens=12, extra_body={"return_token_ids": True})
    assert same.choices[0].model_extra["token_ids"] == body["choices"][0]["token_ids"]
    status, body = post(server, "/v1/tokens/generate", {"prompt_ids": prompt, "stop_token_ids": [5]})
    assert status == 400 and body["error"]["param"] == "stop_token_ids"


def test_recorder_keeps_order_and_bound():
    recorder = Recorder(max_episodes=2)
    for episode, turn in [("a", 1), ("b", 1), ("a", 2), ("c", 1)]:
        recorder.record(episode, [turn], [turn, 0], [-1.0, -2.0])
    assert recorder.episodes() == ["b", "c"]  # "a" was the oldest episode: dropped
    recorder.record("c", [2], [3], [-0.5])
    assert [r.prompt_ids for r in recorder.pop("c")] == [(1,), (2,)] and recorder.pop("c") == []


def test_an_episode_that_extends_its_prompt_continues_its_kept_cache(server, hf_tokenizer):  # noqa: F811
    """A second request of the same episode whose prompt extends the first's prompt + completion
    prefills only the new tokens, and samples what a fresh request with that seed samples."""
    engine = server.app.state.engine
    prompt = hf_tokenizer.encode_chat(USER)
    body1 = {"prompt_ids": prompt, "max_tokens": 6, "seed": 3, "temperature": 1.0}
    status, first = post(server, "/v1/tokens/generate", body1, headers={"X-Episode-Id": "ep-kept"})
    assert status == 200
    extended = prompt + first["choices"][0]["token_ids"] + hf_tokenizer.encode("\nMore please.")
    body2 = {"prompt_ids": extended, "max_tokens": 6, "seed": 4, "temperature": 1.0}
    before = dict(engine.stats)
    status, kept = post(server, "/v1/tokens/generate", body2, headers={"X-Episode-Id": "ep-kept"})
    assert status == 200
    prefilled = engine.stats["prefill_tokens"] - before["prefill_tokens"]
    status, fresh = post(server, "/v1/tokens/generate", body2)  # no episode: a fresh session
    assert kept["choices"][0]["token_ids"] == fresh["choices"][0]["token_ids"]
    np.testing.assert_allclose(kept["choices"][0]["logprobs"], fresh["choices"][0]["logprobs"], atol=1e-5)
    assert engine.stats["server_kept_turns"] == before.get("server_kept_turns", 0) + 1
    assert prefilled < len(extended) - len(prompt)  # the kept part is not computed again
    server.recorder.pop("ep-kept")
