"""What the endpoints do, apart from the web framework (`app.create_app` wires them).

Every completion's exact prompt ids, completion ids and log-probs go to the `Recorder` under the
request's episode id: the `X-Episode-Id` header, else the `user` field (chat) or `episode_id`
(tokens); requests without one are not recorded.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import logging
import time
import uuid
from typing import Any, Callable, Sequence

import jax
import numpy as np
from fastapi.responses import StreamingResponse

from grpo_jax.engine import Completion, Engine, GenerationParams, Session
from grpo_jax.sampling import SamplingError
from grpo_jax.serve.chat import (TextStream, TokenBytes, call_parser_for, cut_at_stop, prompt_messages, tool_calls_of,
                                 visible_ids)
from grpo_jax.serve.protocol import (APIError, ChatRequest, TokensRequest, check_sampling, error_body, stop_list,
                                     unsupported)
from grpo_jax.serve.recorder import Recorder
from grpo_jax.tokenizer import TemplateError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model_name: str = "grpo-jax"      # what /v1/models lists and responses name
    seed: int = 0                     # unseeded requests draw with fold_in(key(seed), a counter)
    tool_call_format: str = "auto"    # "auto" (the chat template's, else hermes) | "hermes" | "llama3"
    max_episodes: int = 100_000       # the recorder's bound
    max_n: int = 128                  # choices per request (each takes a slot while it samples)


@dataclasses.dataclass
class _Choice:
    index: int
    completion: Completion
    ids: list[int]                    # the completion without its trailing stop token
    content: str | None
    tool_calls: list[dict]
    finish_reason: str


class Service:
    """The endpoints' logic on an engine and its tokenizer."""

    def __init__(self, engine: Engine, tokenizer, config: ServeConfig, recorder: Recorder):
        self.engine, self.tokenizer, self.config, self.recorder = engine, tokenizer, config, recorder
        self.stop_ids = tuple(engine.config.stop_token_ids)
        self.call_parser = call_parser_for(tokenizer, config.tool_call_format)
        self.template_renders_calls = "tool_calls" in (tokenizer.chat_template_text or "")
        self.token_bytes = TokenBytes(tokenizer)
        self._counter = itertools.count()
        self.created = int(time.time())
        # An episode's session, kept between its requests: a request whose prompt extends it
        # prefills only the new tokens (bounded; the engine evicts idle caches under pressure).
        self._kept: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self.max_kept = 4 * engine.config.slots

    # -- shared ----------------------------------------------------------------------------------
    def _key(self, seed: int | None):
        if seed is None:
            return jax.random.fold_in(jax.random.key(self.config.seed), next(self._counter) % (1 << 31))
        return jax.random.key(seed % (1 << 32))  # JAX keeps a seed's low 32 bits: said, not hidden

    def _params(self, max_tokens, prompt_len: int, temperature, top_k, top_p, min_p, stops) -> GenerationParams:
        room = self.engine.config.max_length - prompt_len
        try:
            return GenerationParams(max_new_tokens=max(1, min(max_tokens or room, room)), temperature=temperature,
                                    top_k=top_k, top_p=top_p, min_p=min_p, stop=tuple(stops))
        except SamplingError as e:
            raise APIError(str(e)) from None

    def _open(self, prompt: Sequence[int], n: int, seed: int | None, param: str) -> list[Session]:
        if n > self.config.max_n:
            raise APIError(f"n must be <= {self.config.max_n} on this server", param="n")
        limit = self.engine.config.max_length
        if len(prompt) >= limit:
            raise APIError(f"the prompt has {len(prompt)} tokens; this server's context is {limit} tokens "
                           "(prompt and completion together)", param=param, code="context_length_exceeded")
        try:
            return self.engine.open(prompt, row_ids=list(range(n)), key=self._key(seed))
        except SamplingError as e:  # EngineError: bad token ids, an empty prompt
            raise APIError(str(e), param=param) from None

    def _start(self, sessions, params, on_tokens_for: Callable[[int], Callable] | None = None) -> list[asyncio.Task]:
        """One task per session; each releases its session when its turn is over. The tasks are
        never cancelled (callers await them shielded): the engine owns a turn until it ends."""
        async def one(i, session):
            try:
                return await self.engine.generate(session, (), params,
                                                  on_tokens=on_tokens_for(i) if on_tokens_for else None)
            finally:
                self.engine.release(session)

        tasks = [asyncio.ensure_future(one(i, s)) for i, s in enumerate(sessions)]
        for t in tasks:  # a disconnected client leaves no unretrieved exception behind
            t.add_done_callback(lambda t: t.cancelled() or t.exception())
        return tasks

    def _continued(self, episode: str | None, prompt: Sequence[int], n: int, seed: int | None, param: str):
        """The episode's kept session and the prompt's new tokens, when `prompt` extends what
        the session holds (its key reset to this request's, so it draws what a fresh session
        would); else a fresh kept session. None without an episode id, or with n > 1."""
        if not episode or n != 1:
            return None
        session = self._kept.pop(episode, None)
        if session is not None and (session.busy or session.released or len(prompt) <= len(session.tokens)
                                    or list(prompt[:len(session.tokens)]) != session.tokens):
            if not session.busy:
                self.engine.release(session)
            session = None
        if session is None:
            (session,) = self._open(prompt, 1, seed, param)
            new_ids: list[int] = []
        else:
            session.key_data = self._open_key(seed)
            session.turn, new_ids = 0, list(prompt[len(session.tokens):])
            self.engine.stats["server_kept_turns"] += 1
        self._kept[episode] = session
        while len(self._kept) > self.max_kept:
            _, old = self._kept.popitem(last=False)
            if not old.busy:
                self.engine.release(old)
        return session, new_ids

    def _open_key(self, seed):
        return np.asarray(jax.random.key_data(self._key(seed)), np.uint32)

    async def _run_kept(self, session: Session, new_ids, params) -> list[Completion]:
        return [await asyncio.shield(self.engine.generate(session, new_ids, params))]

    async def _run(self, sessions, params) -> list[Completion]:
        return list(await asyncio.gather(*(asyncio.shield(t) for t in self._start(sessions, params))))

    def _record(self, episode_id, prompt, completion: Completion, temperature: float) -> None:
        if episode_id:
            self.recorder.record(episode_id, prompt, completion.tokens, completion.logprobs,
                                 finish_reason=completion.finish_reason, temperature=temperature)

    def _choice(self, index: int, completion: Completion, stops, parse_tools: bool) -> _Choice:
        ids = visible_ids(completion.tokens, self.stop_ids)
        text, cut = cut_at_stop(self.tokenizer.decode(ids), stops)
        finish = "length" if completion.finish_reason == "length" and not cut else "stop"
        content, calls = tool_calls_of(text, self.call_parser) if parse_tools else (text, [])
        if calls and finish == "stop":
            finish = "tool_calls"
        return _Choice(index, completion, ids, content, calls, finish)

    @staticmethod
    def _usage(prompt, completions) -> dict[str, int]:
        sampled = sum(len(c.tokens) for c in completions)
        return {"prompt_tokens": len(prompt), "completion_tokens": sampled, "total_tokens": len(prompt) + sampled}

    # -- chat --------------------------------------------------------------------------------------
    async def chat(self, body: ChatRequest, header_episode: str | None):
        unsupported(body)
        stops = stop_list(body.stop)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        check_sampling(body.n, body.temperature, body.top_p, body.top_k, body.min_p, max_tokens, stops)
        tool_choice = body.tool_choice if body.tool_choice is not None else "auto"
        if tool_choice not in ("auto", "none"):
            raise APIError(f"tool_choice {tool_choice!r} is not supported (only 'auto' and 'none': the engine "
                           "does not constrain decoding)", param="tool_choice", code="unsupported")
        for i, tool in enumerate(body.tools or []):
            if tool.get("type") != "function" or not isinstance(tool.get("function"), dict) \
                    or not isinstance(tool["function"].get("name"), str):
                raise APIError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}",
                               param=f"tools[{i}]")
        tools = body.tools if body.tools and tool_choice == "auto" else None
        if tools and "tools" not in (self.tokenizer.chat_template_text or ""):
            raise APIError("this model's chat template does not render tools, so the model would not see them",
                           param="tools", code="unsupported")
        messages = prompt_messages(body.messages, self.call_parser, self.template_renders_calls)
        try:
            prompt = self.tokenizer.encode_chat(messages, add_generation_prompt=True, tools=tools)
        except TemplateError as e:
            raise APIError(f"the chat template cannot render these messages: {e}", param="messages") from None
        params = self._params(max_tokens, len(prompt), body.temperature, body.top_k, body.top_p, body.min_p, stops)
        episode = header_episode or body.user
        kept = None if body.stream else self._continued(episode, prompt, body.n, body.seed, "messages")
        sessions = [kept[0]] if kept else self._open(prompt, body.n, body.seed, "messages")
        meta = dict(id="chatcmpl-" + uuid.uuid4().hex, created=int(time.time()), model=self.config.model_name)
        extra = body.model_extra or {}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._chat_events(sessions, params, prompt, stops, tools is not None, body.logprobs,
                                       include_usage, episode, meta)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completions = await (self._run_kept(*kept, params) if kept else self._run(sessions, params))
        choices = []
        for i, completion in enumerate(completions):
            self._record(episode, prompt, completion, body.temperature)
            c = self._choice(i, completion, stops, tools is not None)
            message: dict[str, Any] = {"role": "assistant", "content": c.content}
            if c.tool_calls:
                message["tool_calls"] = c.tool_calls
            choice = {"index": i, "message": message, "finish_reason": c.finish_reason,
                      "logprobs": self._logprobs(c.ids, completion.logprobs) if body.logprobs else None}
            if extra.get("return_token_ids"):  # as vLLM's extension: the exact ids, for training clients
                choice["token_ids"] = list(completion.tokens)
            choices.append(choice)
        response = {**meta, "object": "chat.completion", "choices": choices,
                    "usage": self._usage(prompt, completions), "system_fingerprint": None}
        if extra.get("return_token_ids"):
            response["prompt_token_ids"] = list(prompt)
        return response

    def _logprobs(self, ids, logprobs) -> dict:
        return {"content": self.token_bytes.logprobs_content(ids, logprobs[:len(ids)]), "refusal": None}

    async def _chat_events(self, sessions, params, prompt, stops, parse_tools, want_logprobs, include_usage,
                           episode, meta):
        """SSE events of a streamed chat completion. Text waits for the end where it could still
        change: all of it when tool calls are parsed (the call text is not content), log-probs
        when stop strings may cut the tokens."""
        queue: asyncio.Queue = asyncio.Queue()
        received: list[list[float]] = [[] for _ in sessions]  # each choice's log-probs so far

        def on_tokens_for(i):
            def on_tokens(ids, logprobs):
                received[i].extend(logprobs)
                queue.put_nowait((i, ids))
            return on_tokens

        tasks = self._start(sessions, params, on_tokens_for)
        for i, t in enumerate(tasks):
            t.add_done_callback(lambda t, i=i: queue.put_nowait((i, None)))
        streams = [TextStream(self.tokenizer.decode, self.stop_ids, stops) for _ in sessions]
        logprobs_sent = [0] * len(sessions)

        def event(choices, usage=None) -> str:
            chunk = {**meta, "object": "chat.completion.chunk", "choices": choices, "system_fingerprint": None}
            if include_usage:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(len(sessions))])
        completions: list[Completion | None] = [None] * len(sessions)
        pending = len(sessions)
        while pending:
            i, ids = await queue.get()
            if ids is not None:
                if parse_tools:
                    continue
                delta = streams[i].push(ids)
                entries = None
                if want_logprobs and not stops:  # without stop strings, sampled tokens are final
                    start = logprobs_sent[i]
                    known = visible_ids(streams[i].ids, self.stop_ids)[start:]
                    entries = self.token_bytes.logprobs_content(known, received[i][start:start + len(known)])
                    logprobs_sent[i] += len(entries)
                if delta or entries:
                    yield event([{"index": i, "delta": {"content": delta},
                                  "logprobs": {"content": entries, "refusal": None} if entries else None,
                                  "finish_reason": None}])
                continue
            pending -= 1
            try:
                completion = completions[i] = tasks[i].result()
            except Exception as e:
                logger.exception("serve: a streamed completion failed")
                yield f"data: {json.dumps(error_body(f'generation failed: {e}', type='server_error'))}\n\n"
                return
            self._record(episode, prompt, completion, params.temperature)
            c = self._choice(i, completion, stops, parse_tools)
            delta: dict[str, Any] = {"content": streams[i].finish(c.content or "")}
            if c.tool_calls:
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(c.tool_calls)]
            lp = None
            if want_logprobs:
                lp = {"content": self.token_bytes.logprobs_content(c.ids[logprobs_sent[i]:],
                                                                   completion.logprobs[logprobs_sent[i]:len(c.ids)]),
                      "refusal": None}
            yield event([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": c.finish_reason}])
        if include_usage:
            yield event([], self._usage(prompt, completions))
        yield "data: [DONE]\n\n"

    # -- tokens ------------------------------------------------------------------------------------
    async def tokens(self, body: TokensRequest, header_episode: str | None):
        stops = stop_list(body.stop)
        check_sampling(body.n, body.temperature, body.top_p, body.top_k, body.min_p, body.max_tokens, stops)
        if body.stop_token_ids is not None and set(body.stop_token_ids) != set(self.stop_ids):
            raise APIError(f"stop_token_ids are fixed by the engine ({list(self.stop_ids)}); per-request stop ids "
                           "are not supported", param="stop_token_ids", code="unsupported")
        params = self._params(body.max_tokens, len(body.prompt_ids), body.temperature, body.top_k, body.top_p,
                              body.min_p, stops)
        episode = header_episode or body.episode_id
        kept = self._continued(episode, body.prompt_ids, body.n, body.seed, "prompt_ids")
        completions = await (self._run_kept(*kept, params) if kept else
                             self._run(self._open(body.prompt_ids, body.n, body.seed, "prompt_ids"), params))
        choices = []
        for i, completion in enumerate(completions):
            self._record(episode, body.prompt_ids, completion, body.temperature)
            choices.append({"index": i, "token_ids": completion.tokens, "logprobs": completion.logprobs,
                            "finish_reason": completion.finish_reason,
                            "text": self.tokenizer.decode(visible_ids(completion.tokens, self.stop_ids))})
        return {"id": "tokens-" + uuid.uuid4().hex, "object": "tokens.completion", "created": int(time.time()),
                "model": self.config.model_name, "choices": choices, "usage": self._usage(body.prompt_ids, completions)}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": self.created,
                                            "owned_by": "grpo_jax", "max_model_len": self.engine.config.max_length}]}
