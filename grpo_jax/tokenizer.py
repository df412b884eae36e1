"""One tokenizer interface over Hugging Face tokenizers and SentencePiece models.

Built for token-in / token-out multi-turn rollouts: the history is never
re-tokenized. A rollout keeps

    ids = encode_chat(prompt_messages, tools=schemas)      # prompt, ends with the
                                                           # assistant generation prompt
    ids += sampled_ids                                     # model tokens, ending in a
                                                           # stop token (or cut: then the
                                                           # rollout appends end_of_turn_ids)
    ids += encode_turn_suffix(env_messages, tools=schemas) # tool / user messages and the
                                                           # next generation prompt
    ...

and, whenever the chat template is *prefix-preserving* (rendering a
conversation turn by turn gives a prefix of rendering it in one go) and the
sampled text re-tokenizes to the sampled ids, ``ids`` equals
``encode_chat(whole_conversation)``. ``check_prefix_preserving`` verifies the
template property on a sample conversation at start-up and explains a refusal.

``encode_turn_suffix`` finds the suffix by rendering a fixed dummy
conversation ``[user, assistant(MARKER)]`` with and without the new messages
and taking the text after the assistant's end-of-turn token(s), i.e. right
after the stop token the model sampled (for ChatML: everything after
``<|im_end|>``, starting with its newline).

Messages are dicts ``{"role": "system" | "user" | "assistant" | "tool",
"content": str}``; ``tools`` is a list of JSON-schema dicts, as in HF chat
templates. Templates are Jinja, with the Hugging Face conventions: variables
``messages``, ``tools``, ``add_generation_prompt``, ``bos_token``,
``eos_token`` (and the other special tokens), functions ``raise_exception``
and ``strftime_now``, a ``tojson`` filter, ``trim_blocks`` and
``lstrip_blocks``, rendered in Jinja's immutable sandbox.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import re
from typing import Any, Iterable, Mapping, Sequence

# Special tokens that end an assistant turn in common chat formats (ChatML,
# Llama 3, Phi-3, Gemma) or a document (Qwen base); those present become stop ids.
KNOWN_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
                     "<end_of_turn>")
# Symbols ``train_sentencepiece`` adds as single, never-split pieces.
CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")

# A ChatML-like template for small SentencePiece models: every role
# (system, user, assistant, tool) as <|im_start|>ROLE\nCONTENT<|im_end|>\n,
# tools listed in a system block.
DEFAULT_CHAT_TEMPLATE = r"""
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if messages and messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\n\n' -}}{%- endif -%}
{{- '# Tools\n' -}}
{%- for tool in tools -%}{{- (tool | tojson) + '\n' -}}{%- endfor -%}
{{- 'Call a tool with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if not (tools and loop.first and message['role'] == 'system') -%}
{{- '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

# Content of the dummy assistant turn; found again by plain text search.
_MARKER = "ASSISTANT-CONTENT-MARKER-7f3a9c"
_DUMMY_HEAD = ({"role": "user", "content": "USER-CONTENT-MARKER-2b8e41"},
               {"role": "assistant", "content": _MARKER})


class TemplateError(ValueError):
    """A chat template is missing, fails to render, or cannot be used for
    token-in / token-out rollouts."""


class Tokenizer:
    """The interface. Use ``from_pretrained`` / ``from_sentencepiece``.

    Attributes:
      vocab_size: number of token ids (including added tokens; a model's
        embedding table may be larger).
      bos_id: beginning-of-sequence id, or None if the tokenizer has none.
      eos_id: end-of-sequence id.
      pad_id: padding id (eos_id when the tokenizer defines none).
      stop_ids: ids that end an assistant turn when sampled: eos plus the
        known end-of-turn tokens present (``KNOWN_STOP_TOKENS``) plus any
        extra ones given at loading.
      end_of_turn_ids: the stop token(s) the chat template writes right
        after an assistant message's content (ChatML: the id of
        ``<|im_end|>``). The rollout appends them when a turn is cut by the
        length limit. Raises TemplateError when not locatable.
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]

    # -- backend ----------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added. Special-token text (e.g.
        ``<|im_end|>``) in ``text`` becomes its special id."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are kept unless skipped."""
        raise NotImplementedError

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The chat template applied to ``messages``, as text."""
        raise NotImplementedError

    @property
    def chat_template_text(self) -> str | None:
        """The chat template's Jinja source (None when there is none); e.g. for
        ``grpo_jax.envs.tool_calls.parser_for_tokenizer``."""
        return getattr(self, "chat_template", None)

    # -- chat, shared by the backends ----------------------------------------
    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Prompt ids: ``encode(render(messages, ...))``."""
        return self.encode(self.render(messages, add_generation_prompt=add_generation_prompt,
                                       tools=tools))

    @functools.cached_property
    def _end_of_turn(self) -> tuple[tuple[int, ...], str]:
        """(end-of-turn ids, their text), read off the dummy conversation."""
        rendered = self.render(list(_DUMMY_HEAD), add_generation_prompt=False)
        start = rendered.find(_MARKER)
        if start < 0:
            raise TemplateError("the chat template does not render an assistant message's "
                                "content verbatim, so its end cannot be located")
        after = rendered[start + len(_MARKER):]
        after_ids = self.encode(after)
        count = 0
        while count < len(after_ids) and after_ids[count] in self.stop_ids:
            count += 1
        ids = tuple(after_ids[:count])
        text = self.decode(ids)
        if not ids or not after.startswith(text):
            raise TemplateError(
                "cannot locate the end of an assistant turn: the chat template writes "
                f"{after[:40]!r} after an assistant message, which does not start with a stop "
                f"token (stop tokens: {[self.decode([i]) for i in self.stop_ids]})")
        return ids, text

    @property
    def end_of_turn_ids(self) -> tuple[int, ...]:
        return self._end_of_turn[0]

    def turn_suffix_text(self, new_messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = True,
                         tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """Text that follows an assistant turn's end-of-turn token(s) when
        ``new_messages`` come next, up to and including the next generation
        prompt (if ``add_generation_prompt``); ``tools`` as the prompt was
        rendered with (a template may render turns differently with tools)."""
        # Rendered afresh each time: a template may print today's date.
        base = self.render(list(_DUMMY_HEAD), add_generation_prompt=False, tools=tools)
        cut = base.find(_MARKER) + len(_MARKER) + len(self._end_of_turn[1])
        full = self.render(list(_DUMMY_HEAD) + list(new_messages),
                           add_generation_prompt=add_generation_prompt, tools=tools)
        if full[:cut] != base[:cut]:
            raise TemplateError(
                "the chat template rewrites an earlier assistant turn when messages follow it: "
                + _first_difference(base[:cut], full[:cut]))
        return full[cut:]

    def encode_turn_suffix(self, new_messages: Sequence[Mapping[str, Any]], *,
                           add_generation_prompt: bool = True,
                           tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Ids that follow the sampled end-of-turn token(s) for ``new_messages``
        (env / tool / user messages), up to and including the next assistant
        generation prompt: ``encode(turn_suffix_text(...))``."""
        return self.encode(self.turn_suffix_text(new_messages, tools=tools,
                                                 add_generation_prompt=add_generation_prompt))

    def check_prefix_preserving(self, conversation: Sequence[Mapping[str, Any]],
                                tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Raises TemplateError unless turn-by-turn rendering equals one-go rendering.

        Replays ``conversation`` the way a rollout builds it (prompt with
        generation prompt; each assistant content + end-of-turn text; the
        suffix of the messages that follow) and compares the text after every
        assistant turn with ``render`` of the conversation so far. Templates
        that drop or rewrite earlier assistant turns (Qwen3's drops the
        ``<think>`` block of turns before the last user message) fail here.
        """
        messages = [dict(m) for m in conversation]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns or turns[0] == 0:
            raise ValueError("the conversation needs an assistant message after a prompt")
        end_text = self._end_of_turn[1]
        text = self.render(messages[:turns[0]], add_generation_prompt=True, tools=tools)
        for k, i in enumerate(turns):
            text += (messages[i].get("content") or "") + end_text
            stop = turns[k + 1] if k + 1 < len(turns) else len(messages)
            last = k + 1 == len(turns)
            if stop > i + 1:
                text += self.turn_suffix_text(messages[i + 1:stop], tools=tools,
                                              add_generation_prompt=not last)
            reference = self.render(messages[:stop], add_generation_prompt=not last, tools=tools)
            matches = reference.startswith(text) if last and stop == i + 1 else reference == text
            if not matches:
                hint = ""
                if text.count("<think>") > reference.count("<think>"):
                    hint = (" The template drops the <think> reasoning of earlier assistant "
                            "turns (as Qwen3's does).")
                raise TemplateError(
                    f"the chat template is not prefix-preserving: after assistant turn {k} "
                    f"(message {i}), rendering turn by turn differs from rendering the "
                    f"conversation in one go, so the token-in/token-out history would not be "
                    f"what the model sees when the conversation is re-rendered.{hint} "
                    + _first_difference(text, reference)
                    + " Use a template that keeps earlier turns verbatim.")


def _first_difference(turn_by_turn: str, one_go: str) -> str:
    at = next((n for n, (a, b) in enumerate(zip(turn_by_turn, one_go)) if a != b),
              min(len(turn_by_turn), len(one_go)))
    lo = max(0, at - 40)
    return (f"First difference at character {at}: turn by turn {turn_by_turn[lo:at + 40]!r}, "
            f"in one go {one_go[lo:at + 40]!r}.")


# -- Jinja rendering with the Hugging Face conventions -------------------------
def _raise_template_error(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile_template(source: str):
    import jinja2.ext
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as error:
        raise TemplateError(f"the chat template does not compile: {error}") from error


def render_template(source: str, messages, *, add_generation_prompt: bool, tools=None,
                    **special_tokens: str) -> str:
    """Renders a chat template ``source`` (used by the SentencePiece backend)."""
    import jinja2

    try:
        return _compile_template(source).render(
            messages=[dict(m) for m in messages], tools=tools,
            add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as error:
        raise TemplateError(f"the chat template failed to render: {error}") from error


def _unique(ids: Iterable[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(i for i in ids if i is not None and i >= 0))


# -- Hugging Face backend ------------------------------------------------------
class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer loaded from a local directory."""

    def __init__(self, hf_tokenizer, extra_stop_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        vocab = hf_tokenizer.get_vocab()
        known = [vocab.get(token) for token in KNOWN_STOP_TOKENS]
        eos = hf_tokenizer.eos_token_id
        self.stop_ids = _unique([eos, *known, *extra_stop_ids])
        if not self.stop_ids:
            raise ValueError("the tokenizer has no eos token and no known end-of-turn token")
        self.eos_id = eos if eos is not None else self.stop_ids[0]
        pad = hf_tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_id
        self.bos_id = hf_tokenizer.bos_token_id
        self.vocab_size = len(hf_tokenizer)

    @property
    def chat_template_text(self) -> str | None:
        template = getattr(self.hf, "chat_template", None)
        return template if isinstance(template, str) or template is None else template.get("default")

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def render(self, messages, *, add_generation_prompt: bool, tools=None) -> str:
        if not getattr(self.hf, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template")
        import jinja2

        try:
            return self.hf.apply_chat_template(
                [dict(m) for m in messages], tools=tools, tokenize=False,
                add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as error:
            raise TemplateError(f"the chat template failed to render: {error}") from error


def from_pretrained(path: str | os.PathLike, *, chat_template: str | None = None,
                    extra_stop_tokens: Sequence[str] = ()) -> HFTokenizer:
    """Loads an HF tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``;
    the chat template from ``tokenizer_config.json`` or ``chat_template.jinja``)
    without network. ``chat_template`` overrides the saved one; ids listed in
    ``generation_config.json`` ``eos_token_id`` and ``extra_stop_tokens`` join
    ``stop_ids``."""
    from transformers import AutoTokenizer

    path = pathlib.Path(path)
    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if chat_template is not None:
        hf.chat_template = chat_template
    extra = [hf.convert_tokens_to_ids(token) for token in extra_stop_tokens]
    generation_config = path / "generation_config.json"
    if generation_config.exists():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        extra += eos if isinstance(eos, list) else [eos]
    return HFTokenizer(hf, extra_stop_ids=[i for i in extra if isinstance(i, int)])


# -- SentencePiece backend -----------------------------------------------------
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with a Jinja chat template.

    Special tokens: control pieces (``<s>``, ``</s>``, ``<pad>``) and
    user-defined pieces of the form ``<|...|>``. In ``encode``, text of a
    control piece becomes its id (SentencePiece alone would spell it out), so
    templates may write ``{{ bos_token }}``; user-defined pieces are matched
    by SentencePiece itself.
    """

    def __init__(self, model_path: str | os.PathLike, chat_template: str | None,
                 extra_stop_tokens: Sequence[str] = ()):
        import sentencepiece

        self.model_path = str(model_path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        self.chat_template = chat_template
        self.vocab_size = self.sp.get_piece_size()
        pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]
        self._piece_ids = {piece: i for i, piece in enumerate(pieces)}
        controls = [i for i in range(self.vocab_size) if self.sp.is_control(i)]
        chat_markers = [i for i, p in enumerate(pieces) if p.startswith("<|") and p.endswith("|>")]
        self._special_ids = frozenset(controls + chat_markers)
        self._control_by_text = {pieces[i]: i for i in controls if pieces[i]}
        self._control_pattern = (re.compile("(" + "|".join(
            re.escape(p) for p in sorted(self._control_by_text, key=len, reverse=True)) + ")")
            if self._control_by_text else None)
        known = [self._piece_ids.get(t) for t in (*KNOWN_STOP_TOKENS, *extra_stop_tokens)]
        eos = self.sp.eos_id()
        self.stop_ids = _unique([eos, *known])
        if not self.stop_ids:
            raise ValueError("the model has no eos piece and no known end-of-turn piece")
        self.eos_id = eos if eos >= 0 else self.stop_ids[0]
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        if self._control_pattern is None:
            return list(self.sp.encode(text))
        ids = []
        for n, part in enumerate(self._control_pattern.split(text)):
            if n % 2:
                ids.append(self._control_by_text[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # SentencePiece drops control pieces; decode runs between specials and
        # spell the specials out unless asked to skip them.
        pieces, run = [], []
        for i in (int(i) for i in ids):
            if i in self._special_ids:
                if run:
                    pieces.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    pieces.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def render(self, messages, *, add_generation_prompt: bool, tools=None) -> str:
        if not self.chat_template:
            raise TemplateError(f"no chat template for {self.model_path}")

        def piece(i):
            return self.sp.id_to_piece(i) if i is not None and i >= 0 else ""

        return render_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            tools=tools, bos_token=piece(self.bos_id), eos_token=piece(self.eos_id),
            pad_token=piece(self.pad_id), unk_token=piece(self.sp.unk_id()))


def from_sentencepiece(model_path: str | os.PathLike, chat_template: str | None = None, *,
                       extra_stop_tokens: Sequence[str] = ()) -> SentencePieceTokenizer:
    """Loads a SentencePiece ``.model``. The chat template is ``chat_template``
    if given, else ``chat_template.jinja`` next to the model if present, else
    none (chat methods then raise TemplateError)."""
    if chat_template is None:
        sibling = pathlib.Path(model_path).with_name("chat_template.jinja")
        if sibling.exists():
            chat_template = sibling.read_text(encoding="utf-8")
    return SentencePieceTokenizer(model_path, chat_template, extra_stop_tokens)


def train_sentencepiece(corpus: Iterable[str], output_dir: str | os.PathLike,
                        vocab_size: int = 512,
                        special_tokens: Sequence[str] = CHAT_SPECIAL_TOKENS,
                        extra_symbols: Sequence[str] = (),
                        model_type: str = "bpe",
                        chat_template: str = DEFAULT_CHAT_TEMPLATE) -> SentencePieceTokenizer:
    """Trains a small SentencePiece model for tiny tasks and saves it with a chat template.

    Writes ``output_dir/tokenizer.model`` (+ ``.vocab``) and
    ``output_dir/chat_template.jinja``; reload with
    ``from_sentencepiece(output_dir / "tokenizer.model")``.

    Ids: 0 ``<pad>``, 1 ``<unk>``, 2 ``<s>`` (bos), 3 ``</s>`` (eos), then
    ``special_tokens``, ``extra_symbols`` and ``"\\n"`` as user-defined pieces
    (never split, never merged with neighbours: newline is template
    structure, so a suffix tokenizes the same alone as in context), then
    256 byte-fallback pieces and the learned ones. Text is not normalised
    (no NFKC, whitespace kept, no dummy prefix), so ``decode(encode(t)) == t``.
    ``vocab_size`` must leave room for all of these and the corpus characters.
    """
    import sentencepiece

    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    symbols = list(dict.fromkeys([*special_tokens, *extra_symbols, "\n"]))
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(list(corpus)), model_prefix=str(output_dir / "tokenizer"),
            vocab_size=vocab_size, model_type=model_type, user_defined_symbols=symbols,
            byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
            allow_whitespace_only_pieces=True, hard_vocab_limit=False, character_coverage=1.0,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, max_sentence_length=1 << 16,
            num_threads=1, minloglevel=2)
    except RuntimeError as error:
        raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size} must exceed "
                         f"4 + 256 bytes + {len(symbols)} symbols + the corpus characters): "
                         f"{error}") from error
    (output_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return from_sentencepiece(output_dir / "tokenizer.model")
