"""An agent environment: plain `openai` SDK agent code, trained with GRPO (docs/agents.md).

    PYTHONPATH=. python experiments/train.py --config examples/agent_tiny.py --workdir /tmp/agent_tiny

The agent asks the model to say a word, runs a local "tool" on each reply (it counts the target
word and sends the count back as a `tool` message), three times, then asks for the final
answer and returns it. The model never emits real tool calls here: the agent's own code
decides to call its tool, as an agent loop around any model would.

Reward: `target_share` 1.0 (the share of the words the model wrote, over all its turns, that
are the target) + `answered` 0.5 (the returned answer contains the target; the accuracy of
evaluation). A from-scratch tiny model learns to write the target in a few steps.

The model's tokenizer is word level (`write_tokenizer`): every sequence of its tokens decodes
to text that encodes back to the same ids, so each request of an episode extends the previous
one and the episode is one trajectory. (A byte-level BPE does not give that for a random model's
arbitrary ids: its requests then start new segments, which train all the same.)
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import numpy as np

from grpo_jax.envs import AgentEnv
from grpo_jax.rubrics import Rubric

TARGETS = ("yes", "no", "sun", "cat")
FILLER = ("red", "dog", "sky", "hat", "map", "pen", "box", "cup", "owl", "fig", "maybe", "ok")
COUNTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "many")
SPECIALS = ("<pad>", "<|im_start|>", "<|im_end|>")
# Role names and the task's words: everything the template and the agent write.
WORDS = ("[UNK]", "system", "user", "assistant", "tool", "say", "count", "answer", "now") + TARGETS + FILLER + COUNTS
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def write_tokenizer(directory: str | os.PathLike) -> str:
    """Writes the word-level HF tokenizer (ChatML-style template, stop token `<|im_end|>`) to
    `directory` and returns it; an existing one is kept."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    directory = pathlib.Path(directory)
    if (directory / "tokenizer.json").exists():
        return str(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<pad>", "unk_token": "[UNK]"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return str(directory)


def default_tokenizer_dir() -> str:
    """Where the example config keeps its tokenizer (written on first use)."""
    return write_tokenizer(os.path.join(tempfile.gettempdir(), "grpo_jax_agent_example_tokenizer"))


def count_tool(text: str, word: str) -> str:
    """The local tool: how many times `word` is in `text`, as a word of the vocabulary."""
    n = text.split().count(word)
    return COUNTS[min(n, len(COUNTS) - 1)]


async def agent(client, task: dict, tool_calls: int = 3) -> str:
    """The agent: plain `openai` SDK calls; `client` is an `openai.AsyncOpenAI`."""
    messages = [{"role": "user", "content": task["question"]}]
    for _ in range(tool_calls):
        reply = await client.chat.completions.create(model="policy", messages=messages)
        text = reply.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": text})
        messages.append({"role": "tool", "content": count_tool(text, task["answer"])})
    final = await client.chat.completions.create(model="policy", messages=messages + [
        {"role": "user", "content": "answer now"}])
    return final.choices[0].message.content or ""


def target_share(completion, answer) -> float:
    """Share of the model's words (all its turns) that are the target word."""
    words = [w for m in completion if m["role"] == "assistant" for w in m["content"].split()]
    return words.count(answer) / len(words) if words else 0.0


def answered(state, answer) -> float:
    """1.0 when the agent's returned answer contains the target word."""
    return float(answer in str(state.get("agent_result") or "").split())


def make_rows(split: str, n: int | None, seed: int, targets=TARGETS[:1]):
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split]])
    words = [str(w) for w in rng.choice(list(targets), size=100 if n is None else n)]
    return [{"question": f"say {w}", "answer": w} for w in words]


def load_environment(targets=TARGETS[:1], tool_calls: int = 3, timeout_s: float = 120.0, **kwargs) -> AgentEnv:
    """The plug-in entry point (`env.name = "examples.agent_env_example:load_environment"`)."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"targets must be among {TARGETS}, got {sorted(unknown)}")

    async def run(client, task):
        return await agent(client, task, tool_calls=tool_calls)

    return AgentEnv(run, name="say_word", rubric=Rubric([target_share, answered], [1.0, 0.5]),
                    dataset=lambda split, n, seed: make_rows(split, n, seed, targets=tuple(targets)),
                    timeout_s=timeout_s, **kwargs)
