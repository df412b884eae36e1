"""Agent environments (`grpo_jax.envs.agent`, `grpo_jax.agent_rollout`): plain `openai` SDK agent
code played on the policy's in-process server; exact trajectories from the server's records,
segments for requests that do not extend the previous one, contained failures, GRPO training
through the trainer on a plug-in agent env, evaluation against an endpoint."""

from __future__ import annotations

import asyncio
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import agent_env_example as example
from grpo_jax import trainer
from grpo_jax.engine import EngineConfig
from grpo_jax.envs import AgentEnv, SingleTurnEnv, assemble
from grpo_jax.envs.agent_trajectory import conversation
from grpo_jax.metrics import read_metrics
from grpo_jax.models import ModelConfig, create_model
from grpo_jax.models.logprobs import sequence_logprobs
from grpo_jax.rollout import RolloutConfig, model_sampler, rollout
from grpo_jax.rubrics import Rubric
from grpo_jax.sampling import SamplingConfig
from grpo_jax.serve import Record, Recorder, build_engine, serve
from grpo_jax.tokenizer import from_pretrained
from grpo_jax.trajectories import pack_episodes
from grpo_jax.agent_rollout import evaluate_endpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 128
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return from_pretrained(example.write_tokenizer(tmp_path_factory.mktemp("word_tokenizer")))


@pytest.fixture(scope="module")
def model(tok):
    return create_model(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                    head_dim=8, d_ff=64, max_position_embeddings=MAX_LEN), seed=3)


def sampler_of(model, tok, max_new_tokens=5):
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=TEMPERATURE, stop_token_ids=tok.stop_ids,
                              pad_id=tok.pad_id)
    return model_sampler(model, sampling, EngineConfig(slots=4, max_length=MAX_LEN, prefill_chunk=32,
                                                       prefill_rows=4, decode_steps=8))


@pytest.fixture
def recorded(monkeypatch):
    """Every episode's records as the rollout pops them from the server."""
    seen = {}
    pop = Recorder.pop

    def spy(self, episode_id):
        seen[episode_id] = pop(self, episode_id)
        return seen[episode_id]
    monkeypatch.setattr(Recorder, "pop", spy)
    return seen


def teacher_forced(model, tokens, positions=None, segment_ids=None):
    """log p(tokens[t] | tokens[:t]) at the sampling temperature, aligned with `tokens` (0 at t=0)."""
    lp = sequence_logprobs(model, jnp.asarray(tokens[None], jnp.int32),
                           None if positions is None else jnp.asarray(positions[None]),
                           None if segment_ids is None else jnp.asarray(segment_ids[None]), temperature=TEMPERATURE)
    return np.concatenate([[0.0], np.asarray(lp)[0]])


def rec(prompt, completion, logprobs=None, temperature=1.0):
    return Record(tuple(prompt), tuple(completion), tuple(logprobs or [-0.5] * len(completion)), "stop", temperature)


# -- trajectory assembly (pure) ----------------------------------------------------------------------
def test_assemble_joins_extending_requests_and_segments_the_others():
    records = [rec([1, 2], [3, 4], [-0.1, -0.2]),
               rec([1, 2, 3, 4, 9], [5], [-0.3]),               # extends: 9 is an env token
               rec([7, 8], [6], [-0.4]),                        # a fresh conversation: new segment
               rec([7, 8, 6, 1], [2], [-0.6], temperature=0.5)]  # extends, sampled at another temperature
    row = assemble(records, temperature=1.0)
    assert row.tokens == [1, 2, 3, 4, 9, 5, 7, 8, 6, 1, 2]
    assert row.mask == [0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0]
    assert row.logprobs == [0, 0, -0.1, -0.2, 0, -0.3, 0, 0, -0.4, 0, 0]
    assert row.segments == [6, 5] and row.non_prefix == 1 and row.off_temperature == 1 and row.requests == 4
    budget = assemble(records, temperature=1.0, max_model_tokens=2)  # the trainer's loss-token bound
    assert budget.mask == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0] and budget.over_budget == 2
    cut = assemble(records, max_seq_len=8)
    assert cut.truncated and cut.dropped_tokens == 3 and cut.segments == [6, 2] and len(cut.tokens) == 8

    packed = pack_episodes([dict(tokens=row.tokens, mask=row.mask, logprobs=row.logprobs, segments=row.segments,
                                 prompt=[], completion=[], state={}, finish_reason="completed", num_turns=4)],
                           group_size=1, pad_id=0, length_multiple=16)
    assert packed.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4] + [0] * 5
    assert packed.segment_ids[0].tolist() == [1] * 6 + [2] * 5 + [0] * 5
    with pytest.raises(ValueError, match="segments"):
        pack_episodes([dict(tokens=[1, 2], mask=[0, 1], logprobs=[0, 0], segments=[1], prompt=[], completion=[],
                            state={}, finish_reason="completed", num_turns=1)], group_size=1, pad_id=0)


def test_conversation_adds_only_new_messages():
    user = {"role": "user", "content": "say yes"}
    reply = {"role": "assistant", "content": "yes", "refusal": None}
    tool = {"role": "tool", "content": "one"}
    other = {"role": "user", "content": "count"}
    messages = conversation([([user], reply), ([user, {"role": "assistant", "content": "yes"}, tool], None),
                             ([other], {"role": "assistant", "content": None})])
    assert messages == [user, {"role": "assistant", "content": "yes"}, tool, other,
                        {"role": "assistant", "content": ""}]


# -- on the engine, through the in-process server --------------------------------------------------
def test_three_tool_calls_make_one_exact_trajectory(model, tok, recorded):
    env = example.load_environment(tool_calls=3)
    rows = env.dataset("train", n=2, seed=0)
    config = RolloutConfig(group_size=2, max_new_tokens=5, max_seq_len=MAX_LEN, max_turns=4, length_multiple=16)
    result = rollout(env, rows, tok, sampler_of(model, tok), jax.random.key(0), config, episode_offset=10)
    assert len(result) == 4 and result.finish_reasons == ["completed"] * 4
    assert result.metrics["agent/requests/mean"] == 4 and result.metrics["agent/non_prefix_requests"] == 0
    for i in range(4):
        records = recorded[str(10 + i)]  # each episode's global id
        assert len(records) == 4 and all(r.temperature == TEMPERATURE for r in records)
        expected, mask, logprobs, previous = [], [], [], []
        for r in records:
            assert list(r.prompt_ids[:len(previous)]) == previous  # each request extends the last
            new = list(r.prompt_ids[len(previous):])
            expected += new + list(r.completion_ids)
            mask += [0] * len(new) + [1] * len(r.completion_ids)
            logprobs += [0.0] * len(new) + list(r.logprobs)
            previous = list(r.prompt_ids) + list(r.completion_ids)
        n = int(result.lengths[i])
        assert result.tokens[i, :n].tolist() == expected and n == len(expected)
        assert result.completion_mask[i, :n].tolist() == [bool(m) for m in mask]
        np.testing.assert_allclose(result.logprobs[i, :n], logprobs, atol=1e-6)
        assert (result.segment_ids[i, :n] == 1).all() and result.positions[i, :n].tolist() == list(range(n))
        teacher = teacher_forced(model, result.tokens[i, :n])
        np.testing.assert_allclose(result.logprobs[i, :n], np.where(mask, teacher, 0.0), atol=1e-4)
        # The messages the agent exchanged: the prompt, 3 replies + tool results, the last question and answer.
        roles = [m["role"] for m in result.messages(i)]
        assert roles == ["user"] + ["assistant", "tool"] * 3 + ["user", "assistant"]
        assert result.states[i]["agent_result"] == result.completions[i][-1]["content"]
        assert result.states[i]["completion_tokens"] == sum(mask)
    scores = result.score(env)
    assert np.isfinite(scores.rewards).all() and set(scores.scores) == {"target_share", "answered"}
    # Each request's draws are a function of the key, the episode id and its index: reproducible.
    again = rollout(env, rows, tok, sampler_of(model, tok), jax.random.key(0), config, episode_offset=10)
    np.testing.assert_array_equal(again.tokens, result.tokens)


async def _mixed_agent(client, task):
    """Per task: two unrelated conversations (a non-prefix request), a failure, or a hang."""
    mode = task["mode"]
    if mode == "raise":
        raise RuntimeError("the agent's own bug")
    first = await client.chat.completions.create(model="any", messages=[{"role": "user", "content": "say yes"}])
    if mode == "sleep":
        await asyncio.sleep(30)
    second = await client.chat.completions.create(model="any", messages=[{"role": "user", "content": "count cat"}])
    return (first.choices[0].message.content, second.choices[0].message.content)


def test_non_prefix_request_starts_a_segment_and_failures_stay_contained(model, tok, recorded):
    env = AgentEnv(_mixed_agent, rubric=Rubric([lambda state: float(state["agent_result"] is not None)], [1.0]),
                   dataset={"train": [{"mode": "two"}, {"mode": "raise"}, {"mode": "sleep"}]}, timeout_s=3.0)
    rows = env.dataset("train")
    config = RolloutConfig(group_size=1, max_new_tokens=5, max_seq_len=MAX_LEN, max_turns=2, length_multiple=16)
    result = rollout(env, rows, tok, sampler_of(model, tok), jax.random.key(1), config)
    assert result.finish_reasons == ["completed", "env_error", "env_error"]
    assert "the agent's own bug" in result.states[1]["env_error"] and result.states[2]["agent_timeout"]
    assert result.metrics["agent/non_prefix_requests"] == 1 and result.metrics["agent/timeouts"] == 1
    assert result.metrics["env_errors"] == 2 and result.loss_mask[1:].sum() == 0  # failures are not trained
    (a, b) = recorded["0"]
    n1, n2 = len(a.prompt_ids) + len(a.completion_ids), len(b.prompt_ids) + len(b.completion_ids)
    assert result.lengths[0] == n1 + n2 and result.states[0]["agent_segments"] == 2
    both = a.prompt_ids + a.completion_ids + b.prompt_ids + b.completion_ids
    assert result.tokens[0, :n1 + n2].tolist() == list(both)
    assert result.positions[0, :n1 + n2].tolist() == list(range(n1)) + list(range(n2))  # positions restart
    assert result.segment_ids[0, :n1 + n2].tolist() == [1] * n1 + [2] * n2
    # The packed row scores as the two requests did on their own: attention stays within a segment.
    teacher = teacher_forced(model, result.tokens[0, :n1 + n2], result.positions[0, :n1 + n2],
                             result.segment_ids[0, :n1 + n2])
    mask = result.completion_mask[0, :n1 + n2]
    np.testing.assert_allclose(result.logprobs[0, :n1 + n2][mask], teacher[mask], atol=1e-4)
    np.testing.assert_allclose(teacher[n1 + len(b.prompt_ids):n1 + n2], b.logprobs, atol=1e-4)
    assert [m["content"] for m in result.messages(0) if m["role"] == "user"] == ["say yes", "count cat"]
    assert result.score(env).rewards.tolist() == [1.0, 0.0, 0.0]


# -- evaluation against an OpenAI-compatible endpoint -----------------------------------------------
def test_evaluate_endpoint_scores_agent_and_text_envs(model, tok):
    engine = build_engine(model, tok, slots=4, max_length=MAX_LEN, prefill_chunk=32, prefill_rows=4, decode_steps=8)
    agent_env = example.load_environment(tool_calls=1)
    text_env = SingleTurnEnv(name="say", rubric=Rubric([example.target_share], [1.0]),
                             dataset_fn=lambda split, n, seed: example.make_rows(split, n, seed))
    with serve(engine, tok, model_name="tiny") as server:
        agent_metrics = evaluate_endpoint(agent_env, agent_env.dataset("test", n=3), server.url, "tiny",
                                          correct_fn="answered", max_tokens=4)
        text_metrics = evaluate_endpoint(text_env, text_env.dataset("test", n=3), server.url, "tiny",
                                         correct_fn="target_share", max_tokens=4)
        with pytest.raises(KeyError, match="correct_fn"):
            evaluate_endpoint(text_env, text_env.dataset("test", n=1), server.url, "tiny", correct_fn="nope")
        assert server.recorder.episodes() == []  # evaluation requests carry no episode id
    for metrics in (agent_metrics, text_metrics):
        assert metrics["eval/num_problems"] == 3 and metrics["eval/errors"] == 0
        assert 0 <= metrics["eval/accuracy"] <= 1 and np.isfinite(metrics["eval/reward"])
    assert agent_metrics["eval/turns"] == 2 and set(agent_metrics) >= {"eval/reward/target_share",
                                                                      "eval/reward/answered"}
    assert text_metrics["eval/turns"] == 1


# -- GRPO through the trainer on the plug-in agent env ---------------------------------------------
def test_grpo_on_the_plugin_agent_env_improves_reward(tmp_path):
    spec = importlib.util.spec_from_file_location("agent_tiny", os.path.join(ROOT, "examples", "agent_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    with config.unlocked():
        config.tokenizer.path = example.write_tokenizer(tmp_path / "tokenizer")
        config.train.num_steps = config.train.eval_every = config.checkpoint.every = 5
    summary = trainer.run(config, str(tmp_path / "run"))
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["agent/segments/mean"] == 1 and r["finish/completed"] == 1 for r in rows)
    rewards = [r["reward"] for r in rows]
    assert rewards[-1] > rewards[0] + 0.2, rewards
    assert summary["eval_after"]["eval/reward"] >= summary["eval_before"]["eval/reward"]
