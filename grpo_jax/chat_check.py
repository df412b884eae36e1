"""The chat-template check of multi-turn rollouts: rendering turn by turn must equal rendering in
one go (prefix-preserving), or a rollout's token history would not be the conversation the
model is trained and evaluated on."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from grpo_jax.envs.base import Environment, Message, Row
from grpo_jax.tokenizer import TemplateError, Tokenizer

# -- the chat template check -------------------------------------------------------------------
# A conversation with the turns a tool / multi-turn rollout produces, reasoning included:
# templates that drop earlier <think> blocks (Qwen3's) or regroup turns are caught on it.
PROBE_COMPLETION: tuple[Message, ...] = (
    {"role": "assistant", "content": "<think>I should use the tool.</think><calc>17*23</calc>"},
    {"role": "tool", "content": "391"},
    {"role": "assistant", "content": "<think>The tool says 391.</think>The result is 391."},
    {"role": "user", "content": "And 12 + 30?"},
    {"role": "assistant", "content": "<think>Easy.</think>42"},
)


def env_tool_schemas(env: Environment | None) -> list[dict[str, Any]] | None:
    """The tool schemas `env` gives the chat template (`env.tool_schemas()`), None for an env
    without native tools."""
    schemas = None if env is None else env.tool_schemas()
    return list(schemas) if schemas else None


def check_template(tokenizer: Tokenizer, env: Environment | None = None, row: Row | None = None, *,
                   tools: Sequence[Mapping[str, Any]] | None = None) -> None:
    """Raises `TemplateError` (saying why) unless the chat template is prefix-preserving on the
    env's gold demonstration for `row` (when it has one) and on `PROBE_COMPLETION` after the
    row's prompt: rendering turn by turn must equal rendering in one go, or the token history a
    rollout builds would not be the conversation the model is trained and evaluated on.
    `tools` (default: the env's `env_tool_schemas`) are rendered as the rollout renders them."""
    if tools is None:
        tools = env_tool_schemas(env)
    if env is not None and row is not None:
        prompt, _ = env.initial_state(row)
    else:
        prompt = [{"role": "user", "content": "What is 17 * 23?"}]
    conversations = {"the probe conversation": list(prompt) + [dict(m) for m in PROBE_COMPLETION]}
    if env is not None and row is not None:
        try:
            gold = env.gold_completion(row)
        except Exception:  # a demonstration is optional: the probe still runs
            gold = []
        if any(m["role"] == "assistant" for m in gold):
            conversations = {"the env's gold demonstration": list(prompt) + list(gold), **conversations}
    for name, conversation in conversations.items():
        try:
            tokenizer.check_prefix_preserving(conversation, tools=tools)
        except TemplateError as error:
            raise TemplateError(
                f"refusing this chat template for multi-turn rollouts (checked on {name}): "
                f"{error}") from error
