"""Agent environments: train (and evaluate) the user's own agent code, written against the
official `openai` SDK, as it is (docs/agents.md).

    async def agent(client: openai.AsyncOpenAI, task: dict):
        messages = [{"role": "user", "content": task["question"]}]
        reply = await client.chat.completions.create(model="policy", messages=messages)
        ...                                   # tools run here, in the agent's own code
        return answer                         # anything: the rubric sees it as state["agent_result"]

    env = AgentEnv(agent, rubric=Rubric([my_reward]), dataset={"train": rows, "test": held_out})

An episode is `await agent(client, task)`: `client` is an `openai.AsyncOpenAI` on the policy's
OpenAI-compatible server (`grpo_jax.serve`, started by the rollout, `grpo_jax.agent_rollout`)
whose requests carry the episode's id (`X-Episode-Id`), so the server records the exact ids and
log-probs it sampled for it; `task` is the dataset row. What is trained is what was sampled
(`grpo_jax.envs.agent_trajectory`). The same agent runs against any endpoint for evaluation
(`experiments/eval.py --base_url`).

The client's HTTP transport (below the SDK, so `with_options`, raw and streamed responses all
pass it) does two things:
  - fills the sampling fields a request leaves out with the rollout's (`temperature`,
    `max_tokens`, top-k/p, min-p) and names the served model (agents may pass any `model`);
    an agent that sets its own temperature gets it, and those tokens are not trained;
  - keeps the episode's (request messages, reply) pairs, from which the messages the rubric
    scores are rebuilt (`agent_trajectory.conversation`).

An agent that raises, or runs past `timeout_s`, ends its episode "env_error" (logged, counted,
`state["env_error"]`); the other episodes go on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import logging
import time
from typing import Any, Awaitable, Callable, Mapping, Sequence

import numpy as np

from grpo_jax.envs.agent_trajectory import conversation, message
from grpo_jax.envs.base import Environment, Message, Row, State

logger = logging.getLogger(__name__)

Agent = Callable[[Any, dict], Awaitable[Any]]


def _http_module():
    """The HTTP library the installed `openai` SDK is built on (httpx, or httpx2 in later SDKs)."""
    import openai

    client_class = next(c for c in openai.DefaultAsyncHttpxClient.__mro__[1:] if c.__name__ == "AsyncClient")
    return importlib.import_module(client_class.__module__.split(".")[0])


class _EpisodeTransport:
    """Wraps the SDK's HTTP transport: fills sampling defaults into chat completion requests
    and keeps each exchange (`exchanges`: (request messages, reply message or None))."""

    def __init__(self, inner, defaults: Mapping[str, Any], exchanges: list, seed: Sequence[int] | None = None):
        self.inner, self.defaults, self.exchanges, self.seed = inner, dict(defaults), exchanges, seed
        self.requests = 0  # chat requests sent so far: the index a request's seed is made of

    async def handle_async_request(self, request):
        http = _http_module()
        if request.method != "POST" or not request.url.path.endswith("/chat/completions"):
            return await self.inner.handle_async_request(request)
        body = json.loads(await request.aread() or b"{}")
        for key, value in self.defaults.items():
            if key == "model":
                body["model"] = value  # the served model, whatever name the agent's code uses
            elif key == "max_tokens":
                if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
                    body["max_tokens"] = value
            elif body.get(key) is None:
                body[key] = value
        if self.seed is not None and body.get("seed") is None:
            # Request k of the episode draws from (seed..., k), whatever order requests reach the server in.
            body["seed"] = int(np.random.SeedSequence([*self.seed, self.requests]).generate_state(1)[0] >> 1)
        self.requests += 1
        content = json.dumps(body).encode()
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"content-length"]
        request = http.Request(request.method, request.url, headers=headers, content=content,
                               extensions=request.extensions)
        response = await self.inner.handle_async_request(request)
        if body.get("stream"):  # a streamed reply is not kept; the next request usually echoes it
            self.exchanges.append((body.get("messages") or [], None))
            return response
        data = await response.aread()
        reply = None
        if response.status_code == 200:
            try:
                reply = json.loads(data)["choices"][0]["message"]
            except (ValueError, KeyError, IndexError, TypeError):
                reply = None
        self.exchanges.append((body.get("messages") or [], reply))
        headers = [(k, v) for k, v in response.headers.raw
                   if k.lower() not in (b"content-length", b"content-encoding", b"transfer-encoding")]
        return http.Response(response.status_code, headers=headers, content=data, request=request,
                             extensions=response.extensions)

    async def aclose(self):
        await self.inner.aclose()


def make_client(base_url: str, *, episode_id: str | None = None, api_key: str = "none",
                defaults: Mapping[str, Any] | None = None, exchanges: list | None = None,
                seed: Sequence[int] | None = None, timeout_s: float = 600.0):
    """An `openai.AsyncOpenAI` on `base_url` (the server's root or its /v1) whose requests carry
    `X-Episode-Id: episode_id`, get `defaults` where they leave a field out ("model" is always
    set) and are appended to `exchanges`. With `seed`, a request without one gets a seed made
    of `seed` and its index (reproducible draws). Close it with `await client.close()`."""
    import openai

    http = _http_module()
    transport = _EpisodeTransport(http.AsyncHTTPTransport(), defaults or {}, [] if exchanges is None else exchanges,
                                  seed)
    base_url = base_url.rstrip("/")
    return openai.AsyncOpenAI(
        base_url=base_url if base_url.endswith("/v1") else base_url + "/v1", api_key=api_key, max_retries=0,
        timeout=timeout_s, default_headers={"X-Episode-Id": episode_id} if episode_id is not None else None,
        http_client=openai.DefaultAsyncHttpxClient(transport=transport, timeout=timeout_s))


def _dataset_fn(dataset) -> Callable[[str, int | None, int], list]:
    """`(split, n, seed) -> rows` of a dataset given as that function, or {split: rows}."""
    if dataset is None or callable(dataset):
        return dataset
    splits = {k: [dict(r) for r in v] for k, v in dict(dataset).items()}

    def rows(split: str, n: int | None = None, seed: int = 0) -> list:
        if split not in splits:
            raise KeyError(f"the agent env's dataset has no {split!r} split (it has {sorted(splits)})")
        return splits[split][:n] if n is not None else list(splits[split])
    return rows


class AgentEnv(Environment):
    """An environment whose episodes are `await agent(client, task)` (see the module docstring).

    Args:
      agent: `async def agent(client, task) -> result`.
      rubric: scores an episode from its messages (`prompt`: those of its first request before
        the first reply, `completion`: the rest) and `state` (`state["agent_result"]`, the
        task's `answer` / `info`); a result must pickle for process-isolated reward functions.
      dataset: `(split, n, seed) -> rows` or {split: rows}; a row is the agent's `task`.
      timeout_s: an episode's time limit (the agent is cancelled: "env_error").
      model_name: the served model's name (what `/v1/models` lists).
      max_concurrency: episodes running at once (None: all; the engine queues their requests).
      Other keywords go to `Environment` (name, parser, system_prompt, reward_timeout_s ...).
    """

    name = "agent"

    def __init__(self, agent: Agent, *, rubric=None, dataset=None, timeout_s: float = 600.0,
                 model_name: str = "policy", max_concurrency: int | None = None, **kwargs):
        super().__init__(rubric=rubric, dataset_fn=_dataset_fn(dataset), **kwargs)
        if not callable(agent):
            raise TypeError(f"agent must be an async function (client, task) -> result, got {agent!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.agent, self.timeout_s, self.model_name = agent, float(timeout_s), model_name
        self.max_concurrency = max_concurrency

    def is_completed(self, messages, state) -> bool:
        raise TypeError("an AgentEnv is played by its agent (grpo_jax.agent_rollout via rollout()), not turn by "
                        "turn: it cannot be a member of an EnvGroup")

    def make_prompt(self, row: Row) -> list[Message]:
        """The row's prompt / question, else the task as JSON: a stand-in conversation for
        template checks and for episodes that never called the model."""
        if row.get("prompt") or row.get("question") is not None:
            return super().make_prompt(row)
        return [{"role": "user", "content": json.dumps({k: v for k, v in row.items() if k not in ("info", "task")},
                                                       default=str)}]


@dataclasses.dataclass
class AgentEpisode:
    """A played agent episode: its messages, state (the env's initial state plus
    `agent_result`, and `env_error` / `agent_timeout` when it failed) and its exchanges."""

    prompt: list[Message]
    completion: list[Message]
    state: State
    exchanges: list
    error: str | None = None
    seconds: float = 0.0


async def play_episode(env: AgentEnv, row: Row, base_url: str, episode_id: str | None, *, api_key: str = "none",
                       defaults: Mapping[str, Any] | None = None, seed: Sequence[int] | None = None) -> AgentEpisode:
    """Runs `env.agent(client, row)` with a client on `base_url` (see `make_client`)."""
    prompt, state = env.initial_state(row)
    exchanges: list = []
    defaults = {"model": env.model_name, **(defaults or {})}
    client = make_client(base_url, episode_id=episode_id, api_key=api_key, defaults=defaults, exchanges=exchanges,
                         seed=seed, timeout_s=env.timeout_s)
    error, started = None, time.perf_counter()
    try:
        state["agent_result"] = await asyncio.wait_for(env.agent(client, dict(row)), env.timeout_s)
    except asyncio.TimeoutError:
        error, state["agent_timeout"] = f"agent: timed out after {env.timeout_s:g} s", True
    except Exception as e:  # the episode's own failure: it ends, the others go on
        error = f"agent: {type(e).__name__}: {e}"
    finally:
        await client.close()
    if error is not None:
        state["agent_result"], state["env_error"] = None, error
        logger.warning("agent env: episode %s ended by an error: %s", episode_id, error)
    messages = conversation(exchanges)
    if messages:  # the first request's messages are the prompt: what the model was first given
        first = len([message(m) for m in exchanges[0][0]])
        prompt, completion = messages[:first], messages[first:]
    else:
        completion = []
    state["agent_requests"] = len(exchanges)
    return AgentEpisode(prompt, completion, state, exchanges, error, time.perf_counter() - started)


async def play_episodes(env: AgentEnv, rows: Sequence[Row], base_url: str, episode_ids: Sequence[str | None], *,
                        api_key: str = "none", defaults: Mapping[str, Any] | None = None,
                        seeds: Sequence[Sequence[int] | None] | None = None) -> list[AgentEpisode]:
    """`play_episode` for every row at once (at most `env.max_concurrency` running); `seeds`:
    each episode's `make_client` seed."""
    limit = asyncio.Semaphore(env.max_concurrency or max(len(rows), 1))
    seeds = list(seeds) if seeds is not None else [None] * len(rows)

    async def one(row, episode_id, seed):
        async with limit:
            return await play_episode(env, row, base_url, episode_id, api_key=api_key, defaults=defaults, seed=seed)
    return list(await asyncio.gather(*(one(r, i, s) for r, i, s in zip(rows, episode_ids, seeds))))
