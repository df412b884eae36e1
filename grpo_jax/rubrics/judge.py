"""LLM judges: a reward function that asks a chat model whether a completion meets criteria.

    judge = llm_judge(["The answer is correct.", "The reasoning has no errors."],
                      base_url="http://localhost:8000/v1", model="judge")
    rubric = Rubric([correct_answer(), judge], weights=[1.0, 0.5])

Why this format
  The judge is asked to reason about each criterion first and to end with one line in a fixed
  format, `VERDICT: YES` / `VERDICT: NO` (or `SCORE: <number>` on a scale `(lo, hi)`).  A
  verdict after the reasoning is better than one before it (the model commits after it has
  looked, as in chain-of-thought grading), and a fixed final line is parsed reliably; see
  Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena" (their
  "[[A]]"-style verdict after an explanation), and Liu et al. 2023 (G-Eval).

Parsing rules (`parse_verdict`), case-insensitive, markdown (`*`, `_`, `` ` ``, `#`, `>`) ignored
  * A verdict line is a line that starts with `VERDICT:` (binary) or `SCORE:` (with `scale`),
    optionally after a list bullet and "final"; the word elsewhere in a line (in the reasoning) does not count.
  * No verdict line (a refusal, a cut-off reply) -> None.
  * Several verdict lines count only if they all agree (then the last one's value); any
    disagreement, or one line that cannot be read, -> None.
  * Binary: the line's first word is YES (1.0) or NO (0.0); a line naming both -> None.
  * Scale: exactly one number, optionally followed by a denominator equal to `hi`
    ("7/10", "7 out of 10"); prose around it is tolerated ("I'd say 8", "**8**").  A number
    outside [lo, hi] or another denominator -> None.  The score is normalised: (x - lo) / (hi - lo).
  None is never a 0: `llm_judge` raises (ValueError with the reply's tail) and the rubric's guard
  scores the sample NaN and counts it in `failures/<name>`.

Judges
  `llm_judge` works with any OpenAI-compatible chat endpoint through an `openai.AsyncOpenAI`
  client (or a fake one with the same `chat.completions.create`); `engine_judge_client` serves a
  model of ours (the frozen reference policy, an HF checkpoint from `load_hf`) on localhost in
  this process, so in-process and remote judges share one code path.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any, Callable, Sequence

VERDICT_LINE = re.compile(r"^\s*(?:[-+]\s+)?(?:final\s+)?(verdict|score)\s*[:=]\s*(.*)$", re.IGNORECASE)
MARKDOWN = re.compile(r"[*_`#>]")
NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
DENOMINATOR = re.compile(rf"^(.*?{NUMBER}.*?)\s*(?:/|\bout\s+of\b)\s*({NUMBER})\s*(.*)$", re.IGNORECASE)
REPLY_TAIL_CHARS = 300


def _check_scale(scale) -> tuple[float, float] | None:
    if scale is None:
        return None
    lo, hi = (float(x) for x in scale)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"scale must be (lo, hi) with lo < hi, got {scale!r}")
    return lo, hi


def _line_value(value: str, scale: tuple[float, float] | None) -> float | None:
    """The value of one verdict line's text after the colon, or None if it cannot be read."""
    if scale is None:
        words = re.findall(r"[a-z]+", value.lower())
        if not words or words[0] not in ("yes", "no") or {"yes", "no"} <= set(words):
            return None
        return 1.0 if words[0] == "yes" else 0.0
    lo, hi = scale
    match = DENOMINATOR.match(value)
    if match:
        if float(match.group(2)) != hi:
            return None
        value = match.group(1) + " " + match.group(3)
    numbers = re.findall(NUMBER, value)
    if len(numbers) != 1:
        return None
    x = float(numbers[0])
    if not lo <= x <= hi:
        return None
    return (x - lo) / (hi - lo)


def parse_verdict(text: str | None, *, scale: Sequence[float] | None = None) -> float | None:
    """The judge's verdict in `text`: 1.0 / 0.0 (binary), a score in [0, 1] (with `scale`),
    or None when there is none or it is ambiguous (the rules are in the module docstring)."""
    scale = _check_scale(scale)
    keyword = "verdict" if scale is None else "score"
    values = []
    for line in (text or "").splitlines():
        match = VERDICT_LINE.match(MARKDOWN.sub("", line))
        if match and match.group(1).lower() == keyword:
            values.append(_line_value(match.group(2), scale))
    if not values or any(v is None or v != values[-1] for v in values):
        return None
    return values[-1]


def _render(messages) -> str:
    """A transcript of chat messages for the judge: one `[role]` block per message."""
    if isinstance(messages, str):
        return messages
    blocks = []
    for m in messages or ():
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        text = content or ""
        for call in m.get("tool_calls") or ():
            text += ("\n" if text else "") + "[tool call] " + json.dumps(call.get("function", call), sort_keys=True)
        blocks.append(f"[{m.get('role', 'unknown')}]\n{text}")
    return "\n\n".join(blocks)


def judge_prompt(criteria: Sequence[str], prompt_messages, completion_messages, answer: str | None = None,
                 scale: Sequence[float] | None = None) -> list[dict]:
    """Chat messages asking a judge to reason about each criterion in turn, then end with the
    verdict line in the exact format `parse_verdict` reads."""
    scale = _check_scale(scale)
    if isinstance(criteria, str) or not criteria:
        raise ValueError("criteria must be a non-empty sequence of strings")
    listed = "\n".join(f"{i}. {c}" for i, c in enumerate(criteria, 1))
    if scale is None:
        ask = "whether the response meets ALL of the criteria"
        fmt = "VERDICT: YES\nor\nVERDICT: NO"
    else:
        ask = f"how well the response meets the criteria, on a scale from {scale[0]:g} (worst) to {scale[1]:g} (best)"
        fmt = f"SCORE: <a number from {scale[0]:g} to {scale[1]:g}>"
    system = ("You are a careful, impartial judge. You evaluate an AI assistant's response to a conversation. "
              "Do not let the response's length, style or confidence sway you; judge only the criteria.")
    reference = "" if answer is None else f"\n\n# Reference answer\n{answer}"
    user = (f"# Conversation\n{_render(prompt_messages)}\n\n# Response to judge\n{_render(completion_messages)}"
            f"{reference}\n\n# Criteria\n{listed}\n\n"
            f"Decide {ask}. First reason step by step about each criterion, one at a time. "
            f"Then end your reply with exactly one final line, in exactly this format:\n{fmt}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _client(base_url: str, api_key: str, timeout_s: float = 600.0, max_retries: int = 2):
    """An `openai.AsyncOpenAI` that keeps no connections between requests: pooled connections
    belong to the event loop that opened them, and each `Rubric.score` runs a fresh loop."""
    import openai

    from grpo_jax.envs.agent import _http_module

    limits = _http_module().Limits(max_keepalive_connections=0)
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=timeout_s,
                              http_client=openai.DefaultAsyncHttpxClient(timeout=timeout_s, limits=limits))


def llm_judge(criteria: Sequence[str], *, client: Any = None, model: str | None = None,
              base_url: str | None = None, api_key: str = "EMPTY", scale: Sequence[float] | None = None,
              name: str = "judge", temperature: float = 0.0, max_tokens: int = 512,
              cache: bool = True) -> Callable[..., Any]:
    """An async reward function `judge(prompt, completion, answer) -> float` (named `name`).

    It sends `judge_prompt(...)` to `client.chat.completions.create(model=model, ...)` (an
    `openai.AsyncOpenAI`, or one made from `base_url` / `api_key`) and returns `parse_verdict` of
    the reply; an unreadable verdict raises ValueError with the reply's tail (NaN in the rubric,
    counted as a failure).  With `cache`, replies are kept in memory per judge request (criteria,
    scale, rendered prompt, completion and answer): a hit never calls the endpoint and gives the
    same result, failures included; identical requests in flight at once share one call.
    `judge.cache_info()` -> {"hits", "misses", "size"}; `judge.cache_clear()`; `judge.replies`
    -> {request key: reply text} (the cache).
    """
    scale = _check_scale(scale)
    criteria = tuple(criteria)
    judge_prompt(criteria, [], [], scale=scale)  # validates the criteria now, not at the first call
    if model is None:
        raise ValueError("llm_judge needs the judge's model name (`model=`)")
    if client is None:
        if base_url is None:
            raise ValueError("llm_judge needs a `client` or a `base_url`")
        client = _client(base_url, api_key)
    replies: dict[str, str] = {}
    counts = {"hits": 0, "misses": 0}
    inflight: dict[str, asyncio.Task] = {}  # a batch's identical requests wait for the first one

    async def ask(key, messages) -> str:
        response = await client.chat.completions.create(model=model, messages=messages,
                                                        temperature=temperature, max_tokens=max_tokens)
        reply = response.choices[0].message.content or ""
        if cache:
            replies[key] = reply
        return reply

    async def judge(prompt, completion, answer) -> float:
        messages = judge_prompt(criteria, prompt, completion, answer, scale)
        key = json.dumps([model, temperature, max_tokens, messages], sort_keys=True)
        pending = inflight.get(key)
        if cache and key in replies:
            counts["hits"] += 1
            reply = replies[key]
        elif cache and pending is not None and pending.get_loop() is asyncio.get_running_loop():
            counts["hits"] += 1
            reply = await asyncio.shield(pending)  # a caller timing out does not cancel the request
        else:
            counts["misses"] += 1
            if not cache:
                reply = await ask(key, messages)
            else:
                task = inflight[key] = asyncio.ensure_future(ask(key, messages))
                task.add_done_callback(lambda t: inflight.pop(key, None) if inflight.get(key) is t else None)
                reply = await asyncio.shield(task)
        verdict = parse_verdict(reply, scale=scale)
        if verdict is None:
            raise ValueError(f"judge {name!r} gave no readable verdict; its reply ends: "
                             f"{reply[-REPLY_TAIL_CHARS:]!r}")
        return verdict

    judge.__name__ = judge.__qualname__ = name
    judge.cache_info = lambda: {**counts, "size": len(replies)}
    judge.cache_clear = lambda: (replies.clear(), counts.update(hits=0, misses=0))
    judge.replies = replies
    judge.criteria, judge.scale, judge.model = criteria, scale, model
    return judge


def engine_judge_client(model, tokenizer, *, model_name: str = "judge", timeout_s: float = 600.0,
                        **engine_config) -> tuple[Any, Callable[[], None]]:
    """An in-process judge: serves `model` (with `tokenizer`'s chat template) on a free localhost
    port in a background thread (`grpo_jax.serve`) and returns `(client, close)`: an
    `openai.AsyncOpenAI` on it and the function that stops the server.  Use it as
    `llm_judge(criteria, client=client, model=model_name)`.  `engine_config`: `EngineConfig`
    fields (slots, max_length, ...; see `grpo_jax.serve.build_engine`).  The client keeps no
    connections between requests, so it works from any event loop."""
    from grpo_jax.serve import build_engine, serve

    server = serve(build_engine(model, tokenizer, **engine_config), tokenizer, model_name=model_name)
    return _client(server.url + "/v1", "EMPTY", timeout_s, max_retries=0), server.stop
