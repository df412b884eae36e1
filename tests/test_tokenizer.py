"""Tests for grpo_jax.tokenizer: ids, chat rendering, and the token-in /
token-out identity prompt + sampled + suffix == encode_chat(whole)."""

import json
import shutil
import time

import pytest
from tokenizer_fixtures import (  # noqa: F401  (fixtures are used by name)
    CHATML_TEMPLATE, CORPUS, build_hf_tokenizer_dir, build_sp_tokenizer_dir, hf_tokenizer,
    hf_tokenizer_dir, llama_style_tokenizer, sp_tokenizer, sp_tokenizer_dir, think_stripping_tokenizer)

from grpo_jax import tokenizer as tok_lib
from grpo_jax.tokenizer import TemplateError, from_pretrained, from_sentencepiece

TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluates an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}]

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "17 * 23"}}</tool_call>'
CONVERSATION = [
    {"role": "system", "content": "You are a careful calculator user."},
    {"role": "user", "content": "What is 17 * 23?"},
    {"role": "assistant", "content": CALL},
    {"role": "tool", "content": "391"},
    {"role": "assistant", "content": "The result is 391."},
    {"role": "user", "content": "Thanks! And 12 + 30?"},
    {"role": "assistant", "content": "Final answer: 42"},
]


@pytest.fixture(params=["hf", "sp"])
def any_tokenizer(request, hf_tokenizer, sp_tokenizer):
    return {"hf": hf_tokenizer, "sp": sp_tokenizer}[request.param]


def _rollout_ids(tok, conversation, tools=None, cut_at=None):
    """Builds ids as a rollout does: prompt, then for each assistant turn the
    sampled ids (content + end-of-turn), then the env messages as a suffix.
    ``cut_at``: (turn index, n) cuts that turn's sampled ids to n tokens with
    no stop token, as the length limit would; the rollout appends
    end_of_turn_ids. Env messages after the last assistant turn are followed
    by the next generation prompt. Returns (ids, the conversation as the model
    produced it)."""
    turns = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    produced = [dict(m) for m in conversation]
    ids = tok.encode_chat(conversation[:turns[0]], tools=tools)
    for k, i in enumerate(turns):
        sampled = tok.encode(conversation[i]["content"])
        if cut_at is not None and cut_at[0] == k:
            sampled = sampled[:cut_at[1]]
            produced[i]["content"] = tok.decode(sampled)
        ids += sampled + list(tok.end_of_turn_ids)
        stop = turns[k + 1] if k + 1 < len(turns) else len(conversation)
        if stop > i + 1:
            ids += tok.encode_turn_suffix(conversation[i + 1:stop], tools=tools)
    return ids, produced


def test_fixtures_are_fast_and_importable(tmp_path):
    start = time.monotonic()
    build_hf_tokenizer_dir(tmp_path / "hf")
    assert time.monotonic() - start < 2.0
    start = time.monotonic()
    build_sp_tokenizer_dir(tmp_path / "sp")
    assert time.monotonic() - start < 2.0
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert {p.name for p in (tmp_path / "sp").iterdir()} == {
        "tokenizer.model", "tokenizer.vocab", "chat_template.jinja"}


def test_hf_special_ids(hf_tokenizer):
    tok = hf_tokenizer
    im_end, endoftext = tok.encode("<|im_end|>"), tok.encode("<|endoftext|>")
    assert len(im_end) == 1 and len(endoftext) == 1
    assert tok.eos_id == im_end[0] and tok.pad_id == endoftext[0] and tok.bos_id is None
    assert tok.stop_ids == (im_end[0], endoftext[0])
    assert tok.end_of_turn_ids == (im_end[0],)
    assert len(tok.encode("<tool_call>")) == 1 and tok.vocab_size > max(tok.encode(CALL))


def test_sp_special_ids(sp_tokenizer):
    tok = sp_tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    im_end = tok.encode("<|im_end|>")
    assert len(im_end) == 1 and tok.stop_ids == (3, im_end[0])
    assert tok.end_of_turn_ids == tuple(im_end)
    for symbol in ("<|im_start|>", "<tool_call>", "</tool_call>", "<answer>", "</answer>", "\n"):
        assert len(tok.encode(symbol)) == 1, symbol
    assert tok.encode("<answer>42</answer>")[0] == tok.encode("<answer>")[0]
    assert tok.vocab_size == 400


def test_roundtrip_and_skipping_specials(any_tokenizer):
    tok = any_tokenizer
    text = "Héllo  wörld 🙂\n\tx = 17 * 23 <tool_call>{}</tool_call><|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<|im_end|>", "")
    assert tok.encode("") == []


def test_sp_control_pieces_in_text_become_ids(sp_tokenizer_dir):
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    tok = from_sentencepiece(sp_tokenizer_dir / "tokenizer.model", chat_template=template)
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "<s>hi</s>" and tok.decode(ids, skip_special_tokens=True) == "hi"


def test_chatml_render_is_the_expected_text(hf_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}]
    assert hf_tokenizer.render(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\na\n</tool_response>\n<tool_response>\nb\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    with_tools = hf_tokenizer.render(messages[:1], add_generation_prompt=False, tools=TOOLS)
    assert '"name": "calculator"' in with_tools and with_tools.startswith("<|im_start|>system\n")


def test_sp_default_template_renders_all_roles(sp_tokenizer):
    messages = [{"role": r, "content": r.upper()} for r in ("system", "user", "assistant", "tool")]
    assert sp_tokenizer.render(messages, add_generation_prompt=True) == "".join(
        f"<|im_start|>{r}\n{r.upper()}<|im_end|>\n" for r in ("system", "user", "assistant",
                                                              "tool")) + "<|im_start|>assistant\n"
    text = sp_tokenizer.render(messages[1:2], add_generation_prompt=False, tools=TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools\n") and '"calculator"' in text


def test_turn_suffix_starts_right_after_the_stop_token(hf_tokenizer, sp_tokenizer):
    tool = [{"role": "tool", "content": "391"}]
    assert hf_tokenizer.turn_suffix_text(tool) == (
        "\n<|im_start|>user\n<tool_response>\n391\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    assert sp_tokenizer.turn_suffix_text(tool) == (
        "\n<|im_start|>tool\n391<|im_end|>\n<|im_start|>assistant\n")
    user = [{"role": "user", "content": "More?"}]
    assert sp_tokenizer.turn_suffix_text(user, add_generation_prompt=False) == (
        "\n<|im_start|>user\nMore?<|im_end|>\n")
    suffix = hf_tokenizer.encode_turn_suffix(tool)
    assert suffix == hf_tokenizer.encode(hf_tokenizer.turn_suffix_text(tool))
    assert hf_tokenizer.decode(suffix).startswith("\n<|im_start|>")


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_token_in_token_out_equals_one_go(any_tokenizer, tools):
    tok = any_tokenizer
    ids, _ = _rollout_ids(tok, CONVERSATION, tools=tools)
    full = tok.encode_chat(CONVERSATION, add_generation_prompt=False, tools=tools)
    # The rollout stops at the last sampled <|im_end|>; the template adds "\n".
    assert full == ids + tok.encode("\n")
    # Ending on an env message with a generation prompt: exact equality.
    conversation = CONVERSATION[:-1]
    ids, _ = _rollout_ids(tok, conversation, tools=tools)
    assert ids == tok.encode_chat(conversation, add_generation_prompt=True, tools=tools)
    assert ids[-len(tok.encode("<|im_start|>assistant\n")):] == tok.encode(
        "<|im_start|>assistant\n")


def test_a_cut_turn_is_closed_with_end_of_turn_ids(any_tokenizer):
    tok = any_tokenizer
    conversation = CONVERSATION[:-1]
    ids, produced = _rollout_ids(tok, conversation, cut_at=(1, 3))
    assert produced[4]["content"] != conversation[4]["content"]
    assert ids == tok.encode_chat(produced, add_generation_prompt=True)


def test_prefix_preserving_templates_pass(any_tokenizer):
    any_tokenizer.check_prefix_preserving(CONVERSATION)
    any_tokenizer.check_prefix_preserving(CONVERSATION, tools=TOOLS)
    any_tokenizer.check_prefix_preserving(CONVERSATION[:-1])
    with pytest.raises(ValueError):
        any_tokenizer.check_prefix_preserving(CONVERSATION[:2])  # no assistant turn


def test_think_stripping_template_is_refused_with_the_reason(think_stripping_tokenizer):
    tok = think_stripping_tokenizer
    thinking = [
        {"role": "user", "content": "What is 17 * 23?"},
        {"role": "assistant", "content": "<think>\n17 * 23 = 340 + 51</think>\n\n391"},
        {"role": "user", "content": "And 12 + 30?"},
        {"role": "assistant", "content": "<think>\neasy</think>\n\n42"},
    ]
    with pytest.raises(TemplateError) as error:
        tok.check_prefix_preserving(thinking)
    message = str(error.value)
    assert "not prefix-preserving" in message and "<think>" in message
    assert "assistant turn 0" in message and "17 * 23 = 340 + 51" in message
    # Without reasoning blocks the same template keeps history verbatim.
    plain = [dict(m, content=m["content"].split("\n\n")[-1]) for m in thinking]
    tok.check_prefix_preserving(plain)


def test_templates_without_a_locatable_turn_end_are_refused(sp_tokenizer_dir):
    model = sp_tokenizer_dir / "tokenizer.model"
    no_stop = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    with pytest.raises(TemplateError, match="cannot locate the end of an assistant turn"):
        from_sentencepiece(model, chat_template=no_stop).end_of_turn_ids
    rewriting = "{% for m in messages %}{{ m['content'] | upper }}<|im_end|>{% endfor %}"
    with pytest.raises(TemplateError, match="verbatim"):
        from_sentencepiece(model, chat_template=rewriting).encode_turn_suffix(
            [{"role": "user", "content": "x"}])
    failing = "{{ raise_exception('only user messages') }}"
    with pytest.raises(TemplateError, match="only user messages"):
        from_sentencepiece(model, chat_template=failing).render([], add_generation_prompt=True)


def test_missing_template_and_overrides(tmp_path, sp_tokenizer_dir, hf_tokenizer_dir):
    shutil.copy(sp_tokenizer_dir / "tokenizer.model", tmp_path / "bare.model")
    bare = from_sentencepiece(tmp_path / "bare.model")
    with pytest.raises(TemplateError, match="no chat template"):
        bare.encode_chat([{"role": "user", "content": "x"}])
    reloaded = from_sentencepiece(sp_tokenizer_dir / "tokenizer.model")
    assert reloaded.chat_template == tok_lib.DEFAULT_CHAT_TEMPLATE
    assert reloaded.encode(CORPUS[2]) == bare.encode(CORPUS[2])
    custom = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<|im_end|>{% endfor %}"
    hf = from_pretrained(hf_tokenizer_dir, chat_template=custom)
    assert hf.render([{"role": "user", "content": "x"}], add_generation_prompt=False) == (
        "[user]x<|im_end|>")


def test_stop_ids_from_generation_config_and_extra_tokens(tmp_path, hf_tokenizer_dir):
    directory = tmp_path / "with_generation_config"
    shutil.copytree(hf_tokenizer_dir, directory)
    tok = from_pretrained(directory)
    start = tok.encode("<|im_start|>")[0]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [start]}))
    assert start in from_pretrained(directory).stop_ids
    assert from_pretrained(hf_tokenizer_dir, extra_stop_tokens=["<tool_call>"]).stop_ids[-1] == (
        tok.encode("<tool_call>")[0])


def test_training_reports_a_too_small_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        tok_lib.train_sentencepiece(CORPUS, tmp_path, vocab_size=100)


def test_chatml_fixture_template_is_the_saved_one(hf_tokenizer_dir):
    assert (hf_tokenizer_dir / "chat_template.jinja").read_text() == CHATML_TEMPLATE


# -- native tool calling: schemas in the template, the call format read off it -----------------
LLAMA_CALL = '<|python_tag|>{"name": "calculator", "parameters": {"expression": "17 * 23"}}'


def test_tool_schemas_rendered_and_prefix_preserving(hf_tokenizer, llama_style_tokenizer):
    from grpo_jax.envs.tool_calls import Llama3JSONToolCallParser, parser_for_tokenizer
    from grpo_jax.envs.tools import JSONToolCallParser

    schema_text = json.dumps(TOOLS[0], ensure_ascii=False)
    qwen = hf_tokenizer.render(CONVERSATION[:2], add_generation_prompt=True, tools=TOOLS)
    assert qwen.startswith("<|im_start|>system\nYou are a careful calculator user.\n\n# Tools")
    assert "<tools>\n" + schema_text + "\n</tools>" in qwen
    assert schema_text not in hf_tokenizer.render(CONVERSATION[:2], add_generation_prompt=True)
    llama = llama_style_tokenizer.render(CONVERSATION[:2], add_generation_prompt=True, tools=TOOLS)
    assert "<|im_start|>user\nRespond with" in llama and schema_text in llama
    conversation = [dict(m) for m in CONVERSATION]
    conversation[2] = {"role": "assistant", "content": LLAMA_CALL}
    for tok, conv in ((hf_tokenizer, CONVERSATION), (llama_style_tokenizer, conversation)):
        tok.check_prefix_preserving(conv, tools=TOOLS)
        ids, produced = _rollout_ids(tok, conv, tools=TOOLS)
        assert ids == tok.encode_chat(produced, add_generation_prompt=False, tools=TOOLS)[:len(ids)]
    assert llama_style_tokenizer.turn_suffix_text(CONVERSATION[3:4], tools=TOOLS) == (
        "\n<|im_start|>ipython\n391<|im_end|>\n<|im_start|>assistant\n")
    # The call format is chosen from the template text.
    assert hf_tokenizer.chat_template_text.startswith("{%-")
    assert isinstance(parser_for_tokenizer(hf_tokenizer), JSONToolCallParser)
    assert isinstance(parser_for_tokenizer(llama_style_tokenizer), Llama3JSONToolCallParser)
