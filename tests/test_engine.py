"""The rollout engine: its draws equal the lockstep sampler's, a kept cache equals re-prefilling,
continuous batching equals running alone, a sleeping tool stalls nobody, a mesh changes nothing,
and bad input gets clear errors."""

import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizer_fixtures import sp_tokenizer, sp_tokenizer_dir  # noqa: F401  (fixtures are used by name)

from grpo_jax import rollout as rl
from grpo_jax import sampling
from grpo_jax.engine import Engine, EngineConfig, EngineError, GenerationParams, programs
from grpo_jax.envs import MultiTurnEnv
from grpo_jax.models import ModelConfig, create_model
from grpo_jax.models.logprobs import sequence_logprobs
from grpo_jax.sharding import make_mesh

MODEL = ModelConfig(model_type="qwen2", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=64, qkv_bias=True, max_position_embeddings=256)
STOP = (3,)
ENGINE = EngineConfig(slots=4, max_length=96, prefill_chunk=8, prefill_rows=2, decode_steps=4,
                      stop_token_ids=STOP)


@pytest.fixture(scope="module")
def model():
    return create_model(MODEL, seed=0)


def run(coro_factory):
    return asyncio.run(coro_factory())


def teacher_logprobs(model, tokens, temperature):
    """log p(tokens[t] | tokens[:t]) of the full forward, [T - 1]."""
    t = len(tokens)
    scored = jax.jit(sequence_logprobs, static_argnames="temperature")(
        model, jnp.asarray([tokens]), jnp.arange(t)[None], jnp.ones((1, t), jnp.int32), temperature=temperature)
    return np.asarray(scored)[0]


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                    dict(temperature=0.8, top_p=0.6, min_p=0.05), dict(temperature=0.0)])
def test_a_group_draws_what_the_lockstep_sampler_draws(model, params):
    prompt, key = list(range(5, 30)), jax.random.key(1)
    engine = Engine(model, ENGINE)

    async def main():
        sessions = engine.open(prompt, [7, 8, 9], key)
        return await asyncio.gather(*(engine.generate(s, (), GenerationParams(max_new_tokens=10, **params))
                                      for s in sessions))

    outs = run(main)
    ref = sampling.generate(model, [prompt], jax.random.fold_in(key, 0),
                            dict(max_new_tokens=10, n=3, stop_token_ids=STOP, **params), row_ids=[7, 8, 9])
    for i, out in enumerate(outs):
        assert out.tokens == ref.completion(i)
        np.testing.assert_allclose(out.logprobs, ref.logprobs[i, :ref.lengths[i]], atol=1e-5)
        assert out.finish_reason == ("stop" if ref.stop_reason[i] == sampling.STOP_TOKEN else "length")
    assert engine.stats["copies"] == 2 and engine.stats["prefill_tokens"] == len(prompt) - 1  # one prefill


@pytest.mark.parametrize("feed", [1, 32])  # the reply prefilled (but its last token), or fed by decode steps
def test_kept_cache_equals_reprefilling_the_history(model, feed):
    prompt, reply, key = list(range(10, 31)), [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], jax.random.key(2)
    params = GenerationParams(max_new_tokens=12, temperature=0.9)

    async def kept():
        engine = Engine(model, EngineConfig(**{**ENGINE.__dict__, "feed_tokens": feed}))
        (s,) = engine.open(prompt, [0], key)
        first = await engine.generate(s, (), params)
        second = await engine.generate(s, reply, params)  # prefills only the reply onto the kept cache
        return first, second, engine.stats["prefill_tokens"] + engine.stats["fed_tokens"]

    async def fresh(history):
        engine = Engine(model, ENGINE)
        (s,) = engine.open(history, [0], key)
        s.turn = 1  # the second turn's draws
        return await engine.generate(s, (), params)

    first, second, prefilled = run(kept)
    history = prompt + first.tokens + reply
    again = run(lambda: fresh(history))
    assert prefilled == len(prompt) - 1 + len(reply)
    assert second.tokens == again.tokens
    np.testing.assert_allclose(second.logprobs, again.logprobs, atol=1e-5)
    full = history + second.tokens
    teacher = teacher_logprobs(model, full, 0.9)
    np.testing.assert_allclose(second.logprobs, teacher[len(history) - 1:], atol=1e-5)
    np.testing.assert_allclose(first.logprobs, teacher[len(prompt) - 1:len(prompt) - 1 + len(first.tokens)],
                               atol=1e-5)


def _episodes(engine, prompts, replies, key, ids=None):
    """Plays each prompt (episode id ids[i], default i) for len(replies) + 1 turns (env replies
    are fixed ids), concurrently."""
    ids = list(range(len(prompts))) if ids is None else ids
    params = GenerationParams(max_new_tokens=9, temperature=1.0)

    async def one(i, prompt):
        (s,) = engine.open(prompt, [ids[i]], key)
        turns, new = [], []
        for turn in range(len(replies) + 1):
            out = await engine.generate(s, new, params)
            turns.append((out.tokens, out.logprobs))
            if turn < len(replies):
                new = replies[turn]
        engine.release(s)
        return turns

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return run(main)


def test_continuous_batching_gives_each_episode_what_it_draws_alone(model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 128, size=n).tolist() for n in (3, 17, 9, 30, 5, 12)]
    replies = [[50, 51, 52], [60] * 11]
    key = jax.random.key(3)
    config = EngineConfig(**{**ENGINE.__dict__, "slots": 2})  # 6 episodes on 2 slots: admissions wait
    engine = Engine(model, config)
    together = _episodes(engine, prompts, replies, key)
    assert engine.stats["admitted"] >= len(prompts)
    for i, prompt in enumerate(prompts):
        alone = _episodes(Engine(model, config), [prompt], replies, key, ids=[i])[0]
        for (tokens, logprobs), (tokens_alone, logprobs_alone) in zip(together[i], alone):
            assert tokens == tokens_alone
            np.testing.assert_allclose(logprobs, logprobs_alone, atol=1e-6)


def test_evicted_session_resumes_from_its_history(model):
    """More live sessions than slots, each idle between turns: the least recently used one loses
    its cache and its next turn prefills its whole history again, drawing the same tokens."""
    config = EngineConfig(**{**ENGINE.__dict__, "slots": 1, "evict_idle_s": 0.0})
    engine = Engine(model, config)
    key, params = jax.random.key(5), GenerationParams(max_new_tokens=6, temperature=1.0)

    async def main():
        a, b = engine.open([5, 6, 7, 8], [0], key)[0], engine.open([9, 10, 11], [1], key)[0]
        a1 = await engine.generate(a, (), params)
        await engine.generate(b, (), params)     # evicts a
        a2 = await engine.generate(a, [20, 21], params)
        return a1, a2

    a1, a2 = run(main)
    assert engine.stats["evictions"] >= 1
    history = [5, 6, 7, 8] + a1.tokens + [20, 21]
    teacher = teacher_logprobs(model, history + a2.tokens, 1.0)
    np.testing.assert_allclose(a2.logprobs, teacher[len(history) - 1:], atol=1e-5)


class SleepyEnv(MultiTurnEnv):
    """Episode 0's tool answers only after every other episode has ended; the others end after
    their first turn. If waiting on episode 0's tool held the batch back, nothing would end."""

    max_turns = 2

    def __init__(self, engine, others):
        self.engine, self.others, self.ended = engine, others, 0
        self.decode_calls_while_waiting = None

    def initial_state(self, row):
        return [{"role": "user", "content": row["question"]}], {"sleepy": row["sleepy"]}

    def is_completed(self, messages, state):
        if state["sleepy"]:
            return sum(m["role"] == "assistant" for m in messages) >= 2
        self.ended += 1
        return True

    async def env_response(self, messages, state):
        before = self.engine.stats["decode_calls"]
        while self.ended < self.others:  # polls the loop: no wall-clock condition
            await asyncio.sleep(0.001)
        self.decode_calls_while_waiting = self.engine.stats["decode_calls"] - before
        return [{"role": "user", "content": "ok"}], state


def test_a_sleeping_tool_does_not_stop_the_others(sp_tokenizer):
    tok = sp_tokenizer
    model = create_model(MODEL.replace(vocab_size=tok.vocab_size), seed=1)
    sampling_cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0,
                                           stop_token_ids=tuple(tok.stop_ids) + tuple(range(100, 300)))
    sampler = rl.model_sampler(model, sampling_cfg, dict(slots=4, max_length=200, prefill_chunk=32, decode_steps=2))
    rows = [{"question": "a long question to answer", "sleepy": True}] + [
        {"question": f"q{i}", "sleepy": False} for i in range(5)]
    env = SleepyEnv(sampler.engine, others=5)
    out = rl.rollout(env, rows, tok, sampler, jax.random.key(0),
                     rl.RolloutConfig(max_new_tokens=8, max_seq_len=200, check_template=False))
    assert env.decode_calls_while_waiting > 0   # others decoded while episode 0 waited on its tool
    assert out.num_turns[0] == 2 and (out.num_turns[1:] == 1).all()


class NudgeEnv(MultiTurnEnv):
    max_turns = 3

    async def env_response(self, messages, state):
        return [{"role": "user", "content": "Continue."}], state


def _rollout_pair(tok, model_fn, engine_config, rows, group=2):
    sampling_cfg = sampling.SamplingConfig(max_new_tokens=6, temperature=0.9, prompt_bucket=128, batch_bucket=4,
                                           stop_token_ids=tuple(tok.stop_ids) + tuple(range(100, 200)))
    config = rl.RolloutConfig(group_size=group, max_new_tokens=6, max_seq_len=128)
    key = jax.random.key(4)
    lockstep = rl.rollout(NudgeEnv(), rows, tok, rl.model_sampler(model_fn(), sampling_cfg), key, config)
    engine = rl.rollout(NudgeEnv(), rows, tok, rl.model_sampler(model_fn(), sampling_cfg, engine_config), key,
                        config)
    return lockstep, engine


ROWS = [{"question": "What is 12 + 30?"}, {"question": "Add the tens, then the ones."}]


def test_engine_rollout_equals_the_lockstep_rollout(sp_tokenizer):
    """Same keys, same episodes: token for token, log-probs to float32 rounding, and the
    log-probs equal the trainer's teacher-forced forward."""
    tok = sp_tokenizer
    model_fn = lambda: create_model(MODEL.replace(vocab_size=tok.vocab_size), seed=1)  # noqa: E731
    lockstep, engine = _rollout_pair(tok, model_fn, dict(slots=2, prefill_chunk=16, decode_steps=3), ROWS)
    assert engine.num_turns.max() > 1
    np.testing.assert_array_equal(engine.tokens, lockstep.tokens)
    np.testing.assert_array_equal(engine.loss_mask, lockstep.loss_mask)
    np.testing.assert_allclose(engine.logprobs, lockstep.logprobs, atol=1e-5)
    assert engine.finish_reasons == lockstep.finish_reasons
    mask = engine.completion_mask
    teacher = np.asarray(jax.jit(sequence_logprobs, static_argnames="temperature")(
        model_fn(), jnp.asarray(engine.tokens), jnp.asarray(engine.positions), jnp.asarray(engine.segment_ids),
        temperature=0.9))
    np.testing.assert_allclose(engine.logprobs[:, 1:][mask[:, 1:]], teacher[mask[:, 1:]], atol=1e-5)
    assert 0 < engine.metrics["time/sampler_calls"]


def test_a_mesh_of_8_devices_plays_the_same_episodes(sp_tokenizer):
    tok = sp_tokenizer
    mesh = make_mesh(data=2, fsdp=2, tp=2)
    single = lambda: create_model(MODEL.replace(vocab_size=tok.vocab_size), seed=1)  # noqa: E731
    meshed = lambda: create_model(MODEL.replace(vocab_size=tok.vocab_size), seed=1, mesh=mesh)  # noqa: E731
    engine_cfg = dict(slots=4, prefill_chunk=16, decode_steps=3)
    _, one = _rollout_pair(tok, single, engine_cfg, ROWS)
    _, eight = _rollout_pair(tok, meshed, engine_cfg, ROWS)
    np.testing.assert_array_equal(eight.tokens, one.tokens)
    np.testing.assert_allclose(eight.logprobs, one.logprobs, atol=1e-5)


def test_stop_strings_and_budgets(model):
    engine = Engine(model, ENGINE, detokenize=lambda ids: " ".join(map(str, ids)))
    key = jax.random.key(6)

    async def main():
        (s,) = engine.open([5, 6, 7], [0], key)
        free = await engine.generate(s, (), GenerationParams(max_new_tokens=8, temperature=0.0))
        (s2,) = engine.open([5, 6, 7], [0], key)
        stop_at = " ".join(map(str, free.tokens[2:4]))  # the text of the third and fourth tokens
        cut = await engine.generate(s2, (), GenerationParams(max_new_tokens=8, temperature=0.0, stop=(stop_at,)))
        return free, cut, s2

    free, cut, s2 = run(main)
    assert free.finish_reason == "length" and len(free.tokens) == 8
    assert cut.finish_reason == "stop_string" and cut.tokens == free.tokens[:4]
    assert s2.tokens == [5, 6, 7] + free.tokens[:4] and s2.cached == len(s2.tokens) - 1


def test_clear_errors(model):
    engine = Engine(model, ENGINE)
    key = jax.random.key(0)
    with pytest.raises(EngineError, match="no room"):
        engine.open(list(range(4, 100)), [0], key)
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.open([5, 500], [0], key)
    with pytest.raises(EngineError, match="empty"):
        engine.open([], [0], key)
    with pytest.raises(EngineError, match="max_length"):
        Engine(model, EngineConfig(max_length=1000))
    with pytest.raises(EngineError, match="slots"):
        EngineConfig(slots=0)

    async def main():
        (s,) = engine.open([5, 6], [0], key)
        with pytest.raises(EngineError, match="stop strings need"):
            await engine.generate(s, (), GenerationParams(stop=("x",)))
        with pytest.raises(EngineError, match="no room"):
            await engine.generate(s, list(range(4, 100)))
        first = asyncio.ensure_future(engine.generate(s, (), GenerationParams(max_new_tokens=3)))
        await asyncio.sleep(0)
        with pytest.raises(EngineError, match="already generating"):
            await engine.generate(s, ())
        await first
        engine.release(s)
        with pytest.raises(EngineError, match="released"):
            await engine.generate(s, ())
    run(main)


def test_a_cancelled_turn_leaves_the_others_running(model):
    engine = Engine(model, ENGINE)
    key = jax.random.key(7)

    async def main():
        (a,), (b,) = engine.open([5, 6, 7], [0], key), engine.open([8, 9], [1], key)
        params = GenerationParams(max_new_tokens=40, temperature=1.0)
        cancelled = asyncio.ensure_future(engine.generate(a, (), params))
        other = asyncio.ensure_future(engine.generate(b, (), params))
        while engine.stats["decode_calls"] == 0:
            await asyncio.sleep(0.001)
        cancelled.cancel()
        engine.release(a)
        out = await other
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        return out

    out = run(main)
    assert len(out.tokens) == 40 and not engine._requests


def test_warmup_compiles_what_a_rollout_needs(model):
    """After `warmup`, playing episodes compiles nothing new (the programs are a fixed set)."""
    engine = Engine(model, EngineConfig(**{**ENGINE.__dict__, "prefill_chunk": 32}))  # shapes no other test has
    engine.warmup([GenerationParams(temperature=1.0)])
    before = {name: f._cache_size() for name, f in (("prefill", programs.prefill_chunk),
                                                    ("decode", programs.decode_steps), ("copy", programs.copy_slots))}
    rng = np.random.default_rng(1)
    _episodes(engine, [rng.integers(4, 128, size=n).tolist() for n in (3, 17, 30, 9, 2)], [[50] * 5, [60] * 20],
              jax.random.key(0))
    after = {name: f._cache_size() for name, f in (("prefill", programs.prefill_chunk),
                                                   ("decode", programs.decode_steps), ("copy", programs.copy_slots))}
    assert after == before
