"""Tiny tokenizers built inside the test run, without network.

Plain builders (``build_*``: take a directory, return a path) and
session-scoped pytest fixtures wrapping them. Other test modules import
either: ``from tokenizer_fixtures import hf_tokenizer, sp_tokenizer``
(importing a fixture into a test module makes it available there).

* ``build_hf_tokenizer_dir``: a byte-level BPE (``tokenizers``) trained on a
  few sentences, special tokens ``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``, plain added tokens ``<tool_call>``, ``</tool_call>``,
  ``<think>``, ``</think>``, saved as an HF directory (``tokenizer.json``,
  ``tokenizer_config.json``, ``chat_template.jinja``) with a ChatML template
  in the style of Qwen2.5's (default system prompt, tools in the system
  message, tool results as ``<tool_response>`` blocks in a user turn).
* the same directory with ``LLAMA31_STYLE_TEMPLATE``: tools in the first user
  message and Llama 3.1 JSON calls (``llama_style_tokenizer``).
* the same directory with ``THINK_STRIPPING_TEMPLATE``, in the style of
  Qwen3's: earlier assistant turns lose their ``<think>...</think>`` part.
* ``build_sp_tokenizer``: a SentencePiece model from
  ``grpo_jax.tokenizer.train_sentencepiece`` with its default template.
"""

from __future__ import annotations

import json
import pathlib

import pytest

CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant.",
    "What is 12 + 30? The answer is 42.",
    "Let me think step by step. First add the tens, then the ones.",
    "Use the calculator tool to compute the product of 17 and 23.",
    '{"name": "calculator", "arguments": {"expression": "17 * 23"}}',
    "The result is 391. Final answer: 391",
    "system user assistant tool response function call",
    "Countdown: reach the target number with + - * / and each number once.",
)

# ChatML in the style of Qwen2.5: a default system prompt, tools listed in the
# system message, consecutive tool results grouped in one user turn.
CHATML_TEMPLATE = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_text = messages[0]['content'] -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system_text = 'You are a helpful assistant.' -%}
  {%- set turns = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system_text -}}
{%- if tools -%}
  {{- '\n\n# Tools\n\nFunctions you may call:\n<tools>' -}}
  {%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
  {{- '\n</tools>\n\nTo call one, reply with <tool_call>{"name": ..., "arguments": {...}}</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in turns -%}
  {%- if message['role'] == 'tool' -%}
    {%- if loop.first or turns[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' -}}
    {%- if loop.last or turns[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- else -%}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

# In the style of Qwen3's: assistant turns before the last user message are
# rendered without their reasoning (the text up to '</think>' is dropped).
THINK_STRIPPING_TEMPLATE = r"""
{%- set ns = namespace(last_user=-1) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
  {%- set content = message['content'] -%}
  {%- if message['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content -%}
    {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
  {%- endif -%}
  {{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

# In the style of Llama 3.1's (on the ChatML tokens of the fixture): the tool schemas and the
# call format go into the FIRST USER message, calls are bare JSON `{"name", "parameters"}`
# (optionally after <|python_tag|>), tool results come back in an `ipython` turn.
LLAMA31_STYLE_TEMPLATE = r"""
{%- set ns = namespace(first_user=true) -%}
{%- for message in messages -%}
  {%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}
  {{- '<|im_start|>' + role + '\n' -}}
  {%- if tools and message['role'] == 'user' and ns.first_user -%}
    {{- 'Respond with {"name": function name, "parameters": {argument: value}}, optionally after <|python_tag|>.\n' -}}
    {%- for tool in tools -%}{{- (tool | tojson) + '\n\n' -}}{%- endfor -%}
    {%- set ns.first_user = false -%}
  {%- endif -%}
  {{- message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

HF_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
HF_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")


def build_hf_tokenizer_dir(directory, chat_template: str = CHATML_TEMPLATE,
                           vocab_size: int = 400) -> pathlib.Path:
    """Trains a byte-level BPE and writes an HF tokenizer directory; returns it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(HF_SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(CORPUS) * 4, trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t in HF_ADDED_TOKENS])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "model_max_length": 4096}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "chat_template.jinja").write_text(chat_template)
    return directory


def build_think_stripping_tokenizer_dir(directory) -> pathlib.Path:
    return build_hf_tokenizer_dir(directory, chat_template=THINK_STRIPPING_TEMPLATE)


def build_sp_tokenizer_dir(directory, vocab_size: int = 400,
                           extra_symbols=("<answer>", "</answer>")) -> pathlib.Path:
    """Trains a SentencePiece model with the default chat template; returns
    the directory (load with ``from_sentencepiece(dir / "tokenizer.model")``)."""
    from grpo_jax.tokenizer import train_sentencepiece

    directory = pathlib.Path(directory)
    train_sentencepiece(CORPUS, directory, vocab_size=vocab_size, extra_symbols=extra_symbols)
    return directory


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    return build_hf_tokenizer_dir(tmp_path_factory.mktemp("hf_tokenizer"))


@pytest.fixture(scope="session")
def hf_tokenizer(hf_tokenizer_dir):
    from grpo_jax.tokenizer import from_pretrained

    return from_pretrained(hf_tokenizer_dir)


@pytest.fixture(scope="session")
def think_stripping_tokenizer(tmp_path_factory):
    from grpo_jax.tokenizer import from_pretrained

    return from_pretrained(build_think_stripping_tokenizer_dir(
        tmp_path_factory.mktemp("think_tokenizer")))


@pytest.fixture(scope="session")
def llama_style_tokenizer(tmp_path_factory):
    from grpo_jax.tokenizer import from_pretrained

    return from_pretrained(build_hf_tokenizer_dir(tmp_path_factory.mktemp("llama_style_tokenizer"),
                                                  chat_template=LLAMA31_STYLE_TEMPLATE))


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    return build_sp_tokenizer_dir(tmp_path_factory.mktemp("sp_tokenizer"))


@pytest.fixture(scope="session")
def sp_tokenizer(sp_tokenizer_dir):
    from grpo_jax.tokenizer import from_sentencepiece

    return from_sentencepiece(sp_tokenizer_dir / "tokenizer.model")
