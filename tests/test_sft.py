"""Supervised warm start: demonstration encoding (what carries loss), packing, and a run."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from grpo_jax import optim, sft
from grpo_jax.envs.calculator import CalculatorEnv
from grpo_jax.models import ModelConfig, create_model
from grpo_jax.train_step import init_train_state
from tokenizer_fixtures import sp_tokenizer, sp_tokenizer_dir  # noqa: F401  (fixtures)


def _tool_demo():
    env = CalculatorEnv(difficulty="easy", system_prompt="")
    row = env.dataset("train", n=1, seed=0)[0]
    prompt, _ = env.initial_state(row)
    return env, prompt, env.gold_completion(row)


def test_only_the_assistants_tokens_carry_loss(sp_tokenizer):  # noqa: F811
    _, prompt, completion = _tool_demo()
    tokens, mask = sft.encode_demonstration(sp_tokenizer, prompt, completion)
    assert len(tokens) == len(mask)
    trained = sp_tokenizer.decode([t for t, m in zip(tokens, mask) if m])
    untrained = sp_tokenizer.decode([t for t, m in zip(tokens, mask) if not m])
    # Both assistant turns are trained; the prompt and the tool's reply are not.
    assert completion[0]["content"] in trained and completion[2]["content"] in trained
    assert completion[1]["content"] in untrained and prompt[-1]["content"] in untrained
    eot = len(sp_tokenizer.end_of_turn_ids)
    assert sum(mask) == sum(len(sp_tokenizer.encode(completion[i]["content"])) + eot for i in (0, 2))


def test_trained_tokens_keeps_only_the_first_completion_tokens(sp_tokenizer):  # noqa: F811
    _, prompt, completion = _tool_demo()
    tokens, full = sft.encode_demonstration(sp_tokenizer, prompt, completion)
    tokens2, first = sft.encode_demonstration(sp_tokenizer, prompt, completion, trained_tokens=2)
    assert tokens2 == tokens and sum(first) == 2
    first_trained = [i for i, m in enumerate(full) if m][:2]
    assert [i for i, m in enumerate(first) if m] == first_trained


def test_pack_pads_right_and_refuses_a_too_long_demonstration():
    examples = [([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1])]
    out = sft.pack(examples, pad_id=0, length=4)
    np.testing.assert_array_equal(out["tokens"], [[5, 6, 7, 0], [8, 9, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="more than the length 2"):
        sft.pack(examples, pad_id=0, length=2)


def test_run_sft_learns_a_fixed_completion():
    cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                      d_ff=64, max_position_embeddings=16)
    examples = [([1, 2, 3, 7, 8, 9], [0, 0, 0, 1, 1, 1])] * 8
    data = sft.pack(examples, pad_id=0, length=8)
    logged = []
    model = sft.run_sft(create_model(cfg, seed=0), data,
                        sft.SFTConfig(steps=30, batch_size=4, learning_rate=1e-2, warmup_steps=2, log_every=10),
                        log_fn=lambda step, m: logged.append((step, m["sft/loss"])))
    assert [s for s, _ in logged] == [10, 20, 30]
    assert logged[-1][1] < 0.1
    greedy = np.asarray(model(np.asarray([[1, 2, 3, 7, 8]], np.int32))).argmax(-1)[0, 2:]
    np.testing.assert_array_equal(greedy, [7, 8, 9])


def test_sft_step_on_bfloat16_weights_keeps_its_state_and_compiles_once():
    cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                      d_ff=64, max_position_embeddings=16, dtype="bfloat16", param_dtype="bfloat16")
    model = create_model(cfg, seed=0)
    optimizer = optim.make_optimizer(1e-2)
    state = init_train_state(model, optimizer, jax.random.key(0))
    batch = sft.pack([([1, 2, 3, 7, 8, 9], [0, 0, 0, 1, 1, 1])] * 4, pad_id=0, length=8)
    step = sft.make_sft_step(model, optimizer)
    signature = jax.tree.map(lambda x: (x.dtype, x.shape), state)
    for _ in range(2):
        state, metrics = step(state, batch)
    assert jax.tree.map(lambda x: (x.dtype, x.shape), state) == signature
    assert step._cache_size() == 1 and np.isfinite(float(metrics["sft/loss"]))
