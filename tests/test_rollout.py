"""The multi-step rollout: exact tokens and masks, truncation, template refusal, batching,
concurrency, failures, and sampler log-probs against a teacher-forced forward."""

import dataclasses
import json
import logging
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizer_fixtures import (  # noqa: F401  (fixtures are used by name)
    hf_tokenizer, hf_tokenizer_dir, llama_style_tokenizer, sp_tokenizer, sp_tokenizer_dir,
    think_stripping_tokenizer)

from grpo_jax import rollout as rl
from grpo_jax.envs import EnvGroup, MultiTurnEnv, TagToolCallParser, ToolEnv, replay_episodes
from grpo_jax.envs.arithmetic import ArithmeticEnv
from grpo_jax.envs.calculator import CalculatorEnv
from grpo_jax.models import ModelConfig, create_model
from grpo_jax.models.logprobs import sequence_logprobs
from grpo_jax.sampling import STOP_LENGTH, STOP_TOKEN, Samples, SamplingConfig
from grpo_jax.tokenizer import TemplateError

ROW = {"question": "What is 673 * 342?", "answer": "230166", "info": {"expression": "673 * 342"},
       "task": "calculator"}


class ScriptedSampler:
    """A `Sampler` that writes `policy(prompt_text, j)` (+ the end-of-turn token) for sample j of
    each prompt; text longer than `max_new_tokens` is cut (STOP_LENGTH). Every sampled token gets
    a distinct fake log-prob, and every call is recorded."""

    def __init__(self, tokenizer, policy, max_new_tokens=48):
        self.tokenizer, self.policy = tokenizer, policy
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = tuple(tokenizer.stop_ids)
        self.calls = []       # (prompts, n)
        self.keys = []
        self.sampled = []     # (ids, logprobs) per sampled row, in call order
        self._counter = 0

    def __call__(self, prompts, key, n, row_ids):
        self.calls.append(([list(p) for p in prompts], n))
        self.keys.append(tuple(np.asarray(jax.random.key_data(key)).ravel().tolist()))
        eot = self.tokenizer.end_of_turn_ids[0]
        rows = [self.tokenizer.encode(self.policy(self.tokenizer.decode(p), j)) + [eot]
                for p in prompts for j in range(n)]
        m = self.max_new_tokens
        tokens = np.zeros((len(rows), m), np.int32)
        logprobs = np.zeros((len(rows), m), np.float32)
        lengths = np.zeros(len(rows), np.int32)
        stop = np.zeros(len(rows), np.int32)
        for r, ids in enumerate(rows):
            stop[r] = STOP_TOKEN if len(ids) <= m else STOP_LENGTH
            ids = ids[:m]
            lps = -0.001 * (self._counter + 1 + np.arange(len(ids)))
            self._counter += len(ids)
            tokens[r, :len(ids)], logprobs[r, :len(ids)], lengths[r] = ids, lps, len(ids)
            self.sampled.append((ids, lps.astype(np.float32)))
        return Samples(tokens, logprobs, lengths, stop, np.repeat(np.arange(len(prompts)), n))


def turn_of(prompt_text):
    return prompt_text.count("<|im_start|>assistant") - 1


def plan_of(prompt_text):
    """The plan number an episode wrote in its first turn ("<think>plan 2</think>...")."""
    found = re.search(r"plan (\d)", prompt_text)
    return int(found.group(1)) if found else None


def config(**kwargs):
    return rl.RolloutConfig(**{"max_new_tokens": 48, "max_seq_len": 512, **kwargs})


# -- exact tokens of a 3-turn tool episode ---------------------------------------------------------
def test_three_turn_tool_episode_tokens_masks_and_logprobs_exact(sp_tokenizer):
    tok = sp_tokenizer
    env = CalculatorEnv()
    script = ["<calc>673*342</calc>", "<calc>1/0</calc>", "<answer>230166</answer>"]
    sampler = ScriptedSampler(tok, lambda text, j: script[turn_of(text)])
    out = rl.rollout(env, [ROW], tok, sampler, jax.random.key(0), config())

    eot = list(tok.end_of_turn_ids)
    prompt, _ = env.initial_state(ROW)
    replies = ["230166", "Error: calculator raised ExpressionError: division by zero"]
    expected, mask = list(tok.encode_chat(prompt)), []
    mask = [0] * len(expected)
    for k, text in enumerate(script):
        sampled = tok.encode(text) + eot
        expected += sampled
        mask += [1] * len(sampled)
        if k < 2:
            suffix = tok.encode_turn_suffix([{"role": "tool", "content": replies[k]}])
            expected += suffix
            mask += [0] * len(suffix)
    n = len(expected)
    assert out.lengths.tolist() == [n] and out.prompt_lengths.tolist() == [len(tok.encode_chat(prompt))]
    assert out.tokens.shape[1] % 32 == 0 and out.tokens.shape[1] >= n
    np.testing.assert_array_equal(out.tokens[0, :n], expected)
    assert (out.tokens[0, n:] == tok.pad_id).all()
    np.testing.assert_array_equal(out.loss_mask[0, :n], mask)
    np.testing.assert_array_equal(out.completion_mask[0], out.loss_mask[0] > 0)
    assert out.loss_mask[0, n:].sum() == 0
    np.testing.assert_array_equal(out.positions[0, :n], np.arange(n))
    assert (out.positions[0, n:] == 0).all()
    np.testing.assert_array_equal(out.segment_ids[0], (np.arange(out.tokens.shape[1]) < n).astype(int))
    # The sampler's log-probs land exactly on the tokens they belong to.
    np.testing.assert_array_equal(out.logprobs[0][out.completion_mask[0]],
                                  np.concatenate([lps for _, lps in sampler.sampled]))
    assert (out.logprobs[0][~out.completion_mask[0]] == 0).all()
    # No env token is in the loss mask: each masked run is one sampled turn, nothing else.
    on = np.flatnonzero(out.loss_mask[0])
    runs = np.split(on, np.flatnonzero(np.diff(on) > 1) + 1)
    assert [out.tokens[0, r].tolist() for r in runs] == [ids for ids, _ in sampler.sampled]

    conversation = prompt + [
        {"role": "assistant", "content": script[0]}, {"role": "tool", "content": replies[0]},
        {"role": "assistant", "content": script[1]}, {"role": "tool", "content": replies[1]},
        {"role": "assistant", "content": script[2]}]
    assert out.messages(0) == conversation
    # The trajectory decodes back to the conversation (the template's text after the last turn aside).
    rendered = tok.render(conversation, add_generation_prompt=False)
    assert rendered == tok.decode(out.tokens[0, :n]) + "\n"
    state = out.states[0]
    assert (state["tool_calls"], state["tool_errors"], state["completion_tokens"]) == (2, 1, int(sum(mask)))
    assert out.finish_reasons == ["completed"] and out.num_turns.tolist() == [3]
    assert not out.truncated[0] and not state["truncated"]
    m = out.metrics
    assert (m["turns/mean"], m["tool_calls/mean"], m["tool_errors/mean"], m["truncated/frac"]) == (3, 2, 1, 0)
    assert m["tokens_sampled"] == sum(mask) and m["time/sampler_calls"] == 3 and m["finish/completed"] == 1
    assert 0 <= m["time/sampler_frac"] <= 1 and 0 <= m["time/env_frac"] <= 1
    assert out.score(env).rewards[0] >= 1.0  # the correct answer is scored as such


# -- token-in / token-out equals one-go rendering -------------------------------------------------
@pytest.mark.parametrize("which", ["hf", "sp"])
def test_rollout_tokens_equal_one_go_rendering(which, hf_tokenizer, sp_tokenizer):
    tok = {"hf": hf_tokenizer, "sp": sp_tokenizer}[which]
    env = CalculatorEnv(tool_format="json")
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>'

    def policy(text, j):
        turn, plan = turn_of(text), plan_of(text)
        if turn == 0:
            return f"<think>plan {j}</think>" + call % ("673*342" if j == 0 else "2**10")
        if plan == 1 and turn == 1:
            return "<think>Check it.</think>" + call % "1024 - 24"
        return "The answer is <answer>230166</answer>"

    sampler = ScriptedSampler(tok, policy, max_new_tokens=128)
    out = rl.rollout(env, [ROW, {**ROW, "question": "What is 2 ** 10?"}], tok, sampler, jax.random.key(0),
                     config(group_size=2, max_new_tokens=128, max_seq_len=1024))
    assert "length" not in out.finish_reasons
    assert out.num_turns.tolist() == [2, 3, 2, 3]
    for i in range(len(out)):
        ids = out.tokens[i, :out.lengths[i]].tolist()
        one_go = tok.encode_chat(out.messages(i), add_generation_prompt=False)
        assert one_go[:len(ids)] == ids
        assert tok.decode(one_go[len(ids):]) == "\n"  # what the template writes after the last turn


# -- native tool calling: schemas through the template, several calls a turn ----------------------
def _multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


class _Scratchpad:
    def __init__(self):
        self.notes = []


def _note(text: str, pad) -> str:
    """Write a note on the episode's scratchpad."""
    pad.notes.append(text)
    return f"{len(pad.notes)} notes"


class _NativeToolEnv(ToolEnv):
    def __init__(self):
        from grpo_jax.envs.tools import Tool
        super().__init__([_multiply, Tool.from_function(_note, name="note", state_args=["pad"])],
                         native_tools=True, max_turns=3)

    def setup_state(self, row):
        return {**super().setup_state(row), "pad": _Scratchpad()}


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_native_tool_calls_keep_token_in_token_out(which, hf_tokenizer, llama_style_tokenizer):
    tok = {"qwen": hf_tokenizer, "llama": llama_style_tokenizer}[which]
    env = _NativeToolEnv()
    schemas = env.tool_schemas()
    assert rl.env_tool_schemas(env) == schemas and rl.env_tool_schemas(CalculatorEnv()) is None
    calculator = CalculatorEnv(tool_format="native")
    assert rl.env_tool_schemas(calculator)[0]["function"]["name"] == "calculator"
    rl.check_template(tok, calculator, ROW)  # its gold demonstration, rendered with the schemas
    assert [e.state["tool_errors"] for e in replay_episodes(calculator, [ROW], [calculator.gold_completion(ROW)])] == [0]

    def call(name, **arguments):
        if which == "qwen":
            return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"
        return json.dumps({"name": name, "parameters": arguments})

    join = "\n" if which == "qwen" else "; "
    script = [join.join([call("_multiply", a=673, b=342), call("note", text="hi")]),
              call("note", text="again", pad="forged"), "The answer is <answer>230166</answer>"]
    if which == "llama":
        script[1] = "<|python_tag|>" + script[1]
    sampler = ScriptedSampler(tok, lambda text, j: script[turn_of(text)], max_new_tokens=128)
    out = rl.rollout(env, [ROW], tok, sampler, jax.random.key(0), config(max_new_tokens=128, max_seq_len=1024))

    prompt, _ = env.initial_state(ROW)
    prompt_ids = tok.encode_chat(prompt, tools=schemas)
    assert json.dumps(schemas[0], ensure_ascii=False) in tok.decode(prompt_ids)  # the model sees the schemas
    assert out.prompt_lengths.tolist() == [len(prompt_ids)]
    replies = [["230166", "1 notes"],
               ["Error: bad arguments for tool 'note': pad cannot be passed (set by the environment)"]]
    assert [m["content"] for m in out.messages(0) if m["role"] == "tool"] == replies[0] + replies[1]
    eot = list(tok.end_of_turn_ids)
    expected = list(prompt_ids)
    for k, text in enumerate(script):
        expected += tok.encode(text) + eot
        if k < 2:
            expected += tok.encode_turn_suffix([{"role": "tool", "content": r} for r in replies[k]], tools=schemas)
    n = int(out.lengths[0])
    assert out.tokens[0, :n].tolist() == expected
    assert [out.tokens[0, r].tolist() for r in np.split(np.flatnonzero(out.loss_mask[0]), np.flatnonzero(
        np.diff(np.flatnonzero(out.loss_mask[0])) > 1) + 1)] == [ids for ids, _ in sampler.sampled]
    one_go = tok.encode_chat(out.messages(0), add_generation_prompt=False, tools=schemas)
    assert one_go[:n] == expected and tok.decode(one_go[n:]) == "\n"
    state = out.states[0]
    assert (state["tool_calls"], state["tool_errors"]) == (3, 1) and state["pad"].notes == ["hi"]
    assert out.finish_reasons == ["completed"] and out.metrics["tool_errors/mean"] == 1


# -- truncation -----------------------------------------------------------------------------
def _truncation_policy(text, j):
    turn = turn_of(text)
    plan = j if turn == 0 else plan_of(text)
    if plan == 0:      # calls the tool forever: stopped by the turn limit
        return f"<think>plan 0</think><calc>{turn}+1</calc>"
    if plan == 1:      # rambles past max_new_tokens in its first turn
        return "<think>plan 1</think>" + "The quick brown fox jumps over the lazy dog. " * 20
    return "<think>plan 2</think><answer>230166</answer>"


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_turn_limit_and_length_truncation_marked_and_masked(sp_tokenizer, mask_truncated):
    tok = sp_tokenizer
    sampler = ScriptedSampler(tok, _truncation_policy)
    out = rl.rollout(CalculatorEnv(max_turns=5), [ROW], tok, sampler, jax.random.key(0),
                     config(group_size=3, max_turns=2, mask_truncated=mask_truncated))
    assert out.finish_reasons == ["max_turns", "length", "completed"]
    assert out.truncated.tolist() == [True, True, False]
    assert out.num_turns.tolist() == [2, 1, 1]
    assert [s["truncated"] for s in out.states] == [False, True, False]  # token limits only
    # The cut turn: max_new_tokens model tokens, then the end-of-turn id outside the loss mask.
    n, p = out.lengths[1], out.prompt_lengths[1]
    assert n == p + 48 + 1 and out.tokens[1, n - 1] == tok.end_of_turn_ids[0]
    assert out.completion_mask[1, p:n - 1].all() and not out.completion_mask[1, n - 1]
    assert out.states[1]["completion_tokens"] == 48
    assert out.completion_mask.sum(1).min() > 0  # every episode keeps its model tokens here
    if mask_truncated:
        assert out.loss_mask[:2].sum() == 0 and out.loss_mask[2].sum() > 0
    else:
        np.testing.assert_array_equal(out.loss_mask, out.completion_mask)
    assert out.metrics["truncated/frac"] == pytest.approx(2 / 3)
    assert out.metrics["masked/frac"] == pytest.approx(2 / 3 if mask_truncated else 0)
    assert out.metrics["finish/max_turns"] == out.metrics["finish/length"] == pytest.approx(1 / 3)


def test_sequence_budget_ends_episode_at_the_boundary(sp_tokenizer):
    tok = sp_tokenizer
    env = CalculatorEnv()
    script = ["<calc>673*342</calc>", "<answer>230166</answer>"]
    prompt, _ = env.initial_state(ROW)
    first = len(tok.encode_chat(prompt)) + len(tok.encode(script[0])) + 1
    suffix = len(tok.encode_turn_suffix([{"role": "tool", "content": "230166"}]))
    needed = first + suffix + 48 + 1  # history + reply + a full turn + the end-of-turn id
    for budget, reasons in ((needed, ["completed"]), (needed - 1, ["sequence_budget"])):
        sampler = ScriptedSampler(tok, lambda text, j: script[turn_of(text)])
        out = rl.rollout(env, [ROW], tok, sampler, jax.random.key(0),
                         config(max_seq_len=budget, mask_truncated=True))
        assert out.finish_reasons == reasons and out.tokens.shape[1] <= budget
    # Cut: the reply that did not fit is in neither the tokens nor the messages.
    assert out.lengths[0] == first and out.messages(0)[-1] == {"role": "assistant", "content": script[0]}
    assert out.states[0]["tool_calls"] == 1 and out.states[0]["truncated"] and out.truncated[0]
    assert out.loss_mask.sum() == 0 and len(sampler.calls) == 1
    # A prompt that cannot fit a single turn is never sampled.
    sampler = ScriptedSampler(tok, lambda text, j: script[0])
    out = rl.rollout(env, [ROW], tok, sampler, jax.random.key(0), config(group_size=2, max_seq_len=60))
    assert out.finish_reasons == ["sequence_budget"] * 2 and sampler.calls == []
    assert out.completion_mask.sum() == 0 and out.completions == [[], []]


def test_finish_reasons_in_an_env_group(sp_tokenizer):
    # A single-turn task ends "completed" after its one turn, not "max_turns"; a tool task that
    # still calls the tool at its limit ends "max_turns".
    tok = sp_tokenizer
    env = EnvGroup([ArithmeticEnv(), CalculatorEnv(max_turns=2)])
    rows = [{"question": "What is 2 + 2?", "answer": "4", "task": "arithmetic"}, ROW]
    sampler = ScriptedSampler(tok, lambda text, j: "<calc>1+1</calc>")
    out = rl.rollout(env, rows, tok, sampler, jax.random.key(0), config())
    assert out.finish_reasons == ["completed", "max_turns"] and out.num_turns.tolist() == [1, 2]
    assert out.truncated.tolist() == [False, True]


# -- template refusal ------------------------------------------------------------------------
def test_think_stripping_template_refused_with_reason(think_stripping_tokenizer):
    sampler = ScriptedSampler(think_stripping_tokenizer, lambda text, j: "<answer>1</answer>")
    with pytest.raises(TemplateError, match=r"(?s)refusing.*not prefix-preserving.*<think>"):
        rl.rollout(CalculatorEnv(), [ROW], think_stripping_tokenizer, sampler, jax.random.key(0), config())
    assert sampler.calls == []


def test_sampler_mismatch_refused(sp_tokenizer):
    sampler = ScriptedSampler(sp_tokenizer, lambda text, j: "<answer>1</answer>", max_new_tokens=16)
    with pytest.raises(ValueError, match="max_new_tokens"):
        rl.rollout(CalculatorEnv(), [ROW], sp_tokenizer, sampler, jax.random.key(0), config())
    sampler.max_new_tokens, sampler.stop_token_ids = 48, (sp_tokenizer.eos_id,)
    with pytest.raises(ValueError, match="end-of-turn"):
        rl.rollout(CalculatorEnv(), [ROW], sp_tokenizer, sampler, jax.random.key(0), config())


# -- batching: one sampler call per turn --------------------------------------------------------
def test_one_sampler_call_per_turn_for_all_live_episodes(sp_tokenizer):
    tok = sp_tokenizer

    def policy(text, j):  # plan j answers in turn j (0-based); earlier turns call the tool
        turn = turn_of(text)
        plan = j if turn == 0 else plan_of(text)
        action = "<answer>1</answer>" if turn >= plan else f"<calc>{turn}*2</calc>"
        return f"<think>plan {plan}</think>" + action

    rows = [{**ROW, "question": f"What is {k} * 2?"} for k in range(3)]
    sampler = ScriptedSampler(tok, policy)
    out = rl.rollout(CalculatorEnv(max_turns=4), rows, tok, sampler, jax.random.key(0), config(group_size=4))
    assert [(len(prompts), n) for prompts, n in sampler.calls] == [(3, 4), (9, 1), (6, 1), (3, 1)]
    assert out.num_turns.tolist() == [1, 2, 3, 4] * 3  # group-major: row k's episodes contiguous
    assert out.finish_reasons == ["completed"] * 12 and out.metrics["time/sampler_calls"] == 4
    assert len(set(sampler.keys)) == 4  # a fresh key each turn
    # Later turns sample each episode's exact token history.
    for prompts, _ in sampler.calls[1:]:
        for p in prompts:
            assert any(out.tokens[i, :len(p)].tolist() == p for i in range(len(out)))


# -- concurrency and failures ----------------------------------------------------------------
def test_slow_tool_runs_concurrently_across_64_episodes(sp_tokenizer):
    tok = sp_tokenizer
    delay = 0.2

    def slow(expression: str) -> str:
        """Answers slowly."""
        time.sleep(delay)
        return "ok"

    env = ToolEnv([slow], call_parser=TagToolCallParser("calc", "slow", "expression"), max_turns=3)
    rows = [{"question": f"Question {k}?", "answer": "1"} for k in range(16)]
    policy = lambda text, j: "<calc>x</calc>" if turn_of(text) < 2 else "<answer>1</answer>"  # noqa: E731
    out = rl.rollout(env, rows, tok, ScriptedSampler(tok, policy), jax.random.key(0), config(group_size=4))
    chain = 2 * delay  # each episode's two tool calls, one after the other
    m = out.metrics
    print(f"64 episodes x 2 calls of {delay} s: env wait {m['time/env_s']:.2f} s, "
          f"rollout {m['time/total_s']:.2f} s; chain {chain:.1f} s, sum {64 * chain:.1f} s")
    assert len(out) == 64 and m["tool_calls/mean"] == 2 and m["finish/completed"] == 1
    assert chain <= m["time/env_s"] < 3 * chain
    assert m["time/total_s"] < 3 * chain + 2.0


class FlakyCalculatorEnv(CalculatorEnv):
    async def env_response(self, messages, state):
        if "boom" in messages[-1]["content"]:
            raise RuntimeError("the tool server went away")
        return await super().env_response(messages, state)


def test_one_failing_episode_does_not_stop_the_batch(sp_tokenizer, caplog):
    tok = sp_tokenizer
    script = ["<calc>673*342</calc>", "<answer>230166</answer>"]
    policy = lambda text, j: "<calc>boom</calc>" if j == 1 else script[turn_of(text)]  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="grpo_jax.rollout"):
        out = rl.rollout(FlakyCalculatorEnv(), [ROW], tok, ScriptedSampler(tok, policy), jax.random.key(0),
                         config(group_size=3))
    assert out.finish_reasons == ["completed", "env_error", "completed"]
    assert out.num_turns.tolist() == [2, 1, 2]
    assert "the tool server went away" in out.states[1]["env_error"]
    assert out.metrics["env_errors"] == 1 and not out.truncated[1]
    assert out.loss_mask[1].sum() == 0 and out.completion_mask[1].sum() > 0  # mask_env_errors
    assert out.messages(1)[-1]["content"] == "<calc>boom</calc>"
    assert any("env_response" in r.getMessage() and "episode 1" in r.getMessage() for r in caplog.records)


# -- end to end with a real (tiny, random) model ---------------------------------------------
class NudgeEnv(MultiTurnEnv):
    """Answers every turn with "Continue." until the turn limit."""
    max_turns = 3

    async def env_response(self, messages, state):
        return [{"role": "user", "content": "Continue."}], state


def test_model_sampler_logprobs_match_teacher_forced_forward(sp_tokenizer):
    tok = sp_tokenizer
    model = create_model(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                     n_kv_heads=2, head_dim=8, d_ff=64, max_position_embeddings=512), seed=1)
    # Extra stop ids make the random model end turns early, so episodes run several turns.
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.9, stop_token_ids=tuple(tok.stop_ids) +
                              tuple(range(100, 200)), prompt_bucket=128, batch_bucket=4)
    rows = [{"question": "What is 12 + 30?"}, {"question": "Add the tens, then the ones."}]
    out = rl.rollout(NudgeEnv(), rows, tok, rl.model_sampler(model, sampling), jax.random.key(4),
                     config(group_size=2, max_new_tokens=6, max_seq_len=128))
    assert out.tokens.shape[0] == 4 and out.tokens.shape[1] % 32 == 0
    assert out.num_turns.max() > 1 and set(out.finish_reasons) <= {"max_turns", "length"}
    mask = out.completion_mask
    assert ((out.logprobs != 0) == mask).all()  # log-probs exactly on the model's tokens
    first_model_token = mask[np.arange(4), out.prompt_lengths]
    assert first_model_token.all() and not mask[np.arange(4), out.prompt_lengths - 1].any()
    scored = jax.jit(sequence_logprobs, static_argnames="temperature")(
        model, jnp.asarray(out.tokens), jnp.asarray(out.positions), jnp.asarray(out.segment_ids),
        temperature=0.9)
    teacher = np.asarray(scored)  # [N, T - 1]: column t - 1 scores token t
    np.testing.assert_allclose(out.logprobs[:, 1:][mask[:, 1:]], teacher[mask[:, 1:]], atol=1e-5)
    assert out.metrics["time/sampler_s"] > 0


def test_config_validation():
    with pytest.raises(ValueError, match="max_seq_len"):
        rl.RolloutConfig(max_new_tokens=64, max_seq_len=64)
    with pytest.raises(ValueError, match="unknown fields"):
        rl.RolloutConfig.from_any({"group_sise": 4})
    assert rl.RolloutConfig.from_any({"group_size": 4}).group_size == 4
    assert dataclasses.replace(rl.RolloutConfig(), mask_truncated=True).mask_truncated
