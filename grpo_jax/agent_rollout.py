"""Agent episodes on the policy: `rollout(agent_env, ...)` lands here (`play`), and
`evaluate_endpoint` plays an env's held-out rows against any OpenAI-compatible endpoint.

`play(env, rows, tokenizer, sampler, key, config, episode_offset=)`:
    1. the rollout's engine (the `EngineSampler`'s, or one made on a lockstep sampler's model)
       is served by an OpenAI-compatible server on 127.0.0.1 (`grpo_jax.serve`, uvicorn in a
       background thread; one per rollout, stopped at its end);
    2. every row's `group_size` agent episodes run at once on this thread's event loop, each
       with a client whose requests carry its global id `episode_offset + k` and default to the
       rollout's sampling settings (`grpo_jax.envs.agent`);
    3. each episode's records are popped from the server's recorder and assembled into one row
       (`grpo_jax.envs.agent_trajectory`: exact ids and log-probs, segments for non-extending
       requests, cut at `max_seq_len`), then packed into a `Rollout`.

Why a server per rollout: the trainer makes a new engine (new weights) every step, and the
server's engine, sampling seed and recorder belong to one rollout, so a late request of a
timed-out agent can never be recorded into the next step's episode with the same id. Starting
and stopping uvicorn costs ~0.2 s a rollout on CPU (`time/server_s` in the metrics).

Sampling: request k of episode i without a `seed` of its own gets one made of (s, i, k), s
drawn from the rollout's key: an episode's draws do not depend on the order the concurrent
episodes' requests reach the server, so a rollout samples the same tokens again (as far as the
agent's own code is deterministic) and a resumed run samples what an uninterrupted one would.
Which requests share a decode call still follows their timing, so log-probs (and the loss) can
differ in the last float bits between two runs (measured: loss within 5e-8).

Finish reasons: "completed" (the agent returned), "env_error" (it raised or timed out),
"sequence_budget" (its row was cut at `max_seq_len`). Metrics added to the rollout's:
agent/requests/mean, agent/segments/mean, agent/non_prefix_requests, agent/off_temperature
(completions not trained: another temperature), agent/over_budget_tokens (model tokens not
trained: past `max_new_tokens x max_turns`, the trainer's loss-token bound of a row; set
rollout.max_turns to the agent's requests an episode), agent/truncated, agent/timeouts (counts
over the rollout), time/server_s.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from grpo_jax.engine import Engine, EngineConfig, GenerationParams
from grpo_jax.envs.agent import AgentEnv, play_episodes
from grpo_jax.envs.agent_trajectory import assemble
from grpo_jax.samplers import EngineSampler, ModelSampler, model_sampler
from grpo_jax.trajectories import Rollout, pack_episodes
from grpo_jax.utils import nan_mean, run_sync
logger = logging.getLogger(__name__)


def sampling_defaults(params: GenerationParams) -> dict[str, Any]:
    """The request fields an agent's requests get unless they set them."""
    out: dict[str, Any] = {"temperature": params.temperature, "max_tokens": params.max_new_tokens}
    if params.top_k:
        out["top_k"] = params.top_k
    if params.top_p < 1:
        out["top_p"] = params.top_p
    if params.min_p:
        out["min_p"] = params.min_p
    return out


def _engine_of(sampler, tokenizer, config, episodes: int) -> tuple[Engine, GenerationParams]:
    if isinstance(sampler, EngineSampler):
        engine, params = sampler.engine, sampler.params
    elif isinstance(sampler, ModelSampler):  # a lockstep rollout's model: served by an engine all the same
        made = model_sampler(sampler.model, sampler.config,
                             EngineConfig(slots=min(max(episodes, 1), 64), max_length=config.max_seq_len))
        engine, params = made.engine, made.params
    else:
        raise TypeError(f"agent rollouts sample from an EngineSampler or a ModelSampler (model_sampler), "
                        f"got {type(sampler).__name__}")
    if engine.detokenize is None:  # stop strings in the agents' requests need it
        engine.detokenize = tokenizer.decode
    return engine, params


def play(env: AgentEnv, rows: Sequence[Mapping], tokenizer, sampler, key, config, *,
         episode_offset: int = 0) -> Rollout:
    """The rollout of `env`'s agent on `rows` (see the module docstring); `rollout.rollout`
    calls it with its parsed `RolloutConfig` (not imported here: `rollout` imports this module)."""
    from grpo_jax.serve import serve  # the web stack is imported only by runs that serve

    rows = list(rows)
    if not rows:
        raise ValueError("rollout needs at least one row")
    group = config.group_size
    ids = [episode_offset + k for k in range(len(rows) * group)]
    engine, params = _engine_of(sampler, tokenizer, config, len(ids))
    stats_before = dict(engine.stats)
    seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
    started = time.perf_counter()
    server = serve(engine, tokenizer, model_name=env.model_name, seed=seed)
    server_s = time.perf_counter() - started
    try:
        episodes = run_sync(lambda: play_episodes(env, [r for r in rows for _ in range(group)], server.url,
                                                  [str(i) for i in ids], defaults=sampling_defaults(params),
                                                  seeds=[(seed, i) for i in ids]))
        records = [server.recorder.pop(str(i)) for i in ids]
    finally:
        stopping = time.perf_counter()
        server.stop()
        server_s += time.perf_counter() - stopping
    # The trainer's bound on a row's loss tokens (TrainConfig.max_loss_tokens): turns x tokens a turn.
    budget = config.max_new_tokens * config.max_turns if config.max_turns else None
    packed, counts = [], dict(non_prefix=0, off_temperature=0, over_budget=0, truncated=0, timeouts=0)
    for episode, recs in zip(episodes, records):
        row = assemble(recs, max_seq_len=config.max_seq_len, temperature=params.temperature, max_model_tokens=budget)
        state = episode.state
        state.update(completion_tokens=row.model_tokens, agent_segments=len(row.segments))
        if episode.error is not None:
            reason = "env_error"
        elif row.truncated:
            reason, state["truncated"] = "sequence_budget", True
        else:
            reason = "completed"
        state["finish_reason"] = reason
        counts["non_prefix"] += row.non_prefix
        counts["off_temperature"] += row.off_temperature
        counts["over_budget"] += row.over_budget
        counts["truncated"] += row.truncated
        counts["timeouts"] += bool(state.get("agent_timeout"))
        packed.append(dict(tokens=row.tokens, mask=row.mask, logprobs=row.logprobs, segments=row.segments,
                           prompt=episode.prompt, completion=episode.completion, state=state, finish_reason=reason,
                           num_turns=row.requests))
    delta = {k: v - stats_before.get(k, 0) for k, v in engine.stats.items()}
    timing = dict(sampler_s=delta.get("busy_s", 0.0), env_s=0.0, total_s=time.perf_counter() - started,
                  sampler_calls=delta.get("decode_calls", 0) + delta.get("prefill_calls", 0))
    pad_id = tokenizer.pad_id if config.pad_id is None else config.pad_id
    result = pack_episodes(packed, group_size=group, pad_id=pad_id, length_multiple=config.length_multiple,
                           max_seq_len=config.max_seq_len, mask_truncated=config.mask_truncated,
                           mask_env_errors=config.mask_env_errors, timing=timing)
    n = max(len(packed), 1)
    result.metrics.update({
        "agent/requests/mean": sum(e["num_turns"] for e in packed) / n,
        "agent/segments/mean": sum(len(e["segments"]) for e in packed) / n,
        "agent/non_prefix_requests": float(counts["non_prefix"]),
        "agent/off_temperature": float(counts["off_temperature"]),
        "agent/over_budget_tokens": float(counts["over_budget"]),
        "agent/truncated": float(counts["truncated"]),
        "agent/timeouts": float(counts["timeouts"]),
        "time/server_s": server_s,
    })
    if counts["off_temperature"]:
        logger.warning("agent rollout: %d completions were sampled at another temperature than %g and are not "
                       "trained (their tokens stay as context)", counts["off_temperature"], params.temperature)
    return result


# -- evaluation against any OpenAI-compatible endpoint --------------------------------------------
def evaluate_endpoint(env, rows: Sequence[Mapping], base_url: str, model: str, *, api_key: str = "none",
                      correct_fn: str = "correct_answer", threshold: float = 0.5, temperature: float = 0.0,
                      max_tokens: int | None = None, timeout_s: float = 600.0) -> dict[str, float]:
    """Held-out metrics of `env` on `rows` with the model `model` served at `base_url`, scored by
    the env's rubric: eval/accuracy (`correct_fn` >= `threshold`; NaN scores count as wrong),
    eval/reward, eval/reward/<fn>, eval/turns, eval/tool_call_rate, eval/errors (episodes whose
    agent failed or whose request was refused), eval/num_problems. An `AgentEnv` runs its agent
    with a client on the endpoint; any other env plays its turns (`run_episodes`) with a policy
    that sends the conversation to the endpoint (without the env's native tool schemas)."""
    rows = list(rows)
    defaults: dict[str, Any] = {"temperature": temperature, **({"max_tokens": max_tokens} if max_tokens else {})}
    if isinstance(env, AgentEnv):
        episodes = run_sync(lambda: play_episodes(env, rows, base_url, [None] * len(rows), api_key=api_key,
                                                  defaults={**defaults, "model": model}))
        prompts, completions, states = ([e.prompt for e in episodes], [e.completion for e in episodes],
                                        [e.state for e in episodes])
        errors = sum(e.error is not None for e in episodes)
        turns = [e.state.get("agent_requests", 0) for e in episodes]
    else:
        prompts, completions, states, errors = _text_episodes(env, rows, base_url, model, api_key, defaults, timeout_s)
        turns = [sum(m["role"] == "assistant" for m in c) for c in completions]
    scores = env.score(prompts, completions, states)
    if correct_fn not in scores.scores:
        raise KeyError(f"correct_fn={correct_fn!r} is not a rubric function; the rubric has {sorted(scores.scores)}")
    values = np.asarray(scores.scores[correct_fn], np.float64)
    correct = np.where(np.isnan(values), False, values >= threshold)
    metrics = {"eval/num_problems": float(len(rows)), "eval/accuracy": float(correct.mean()) if rows else 0.0,
               "eval/reward": nan_mean(scores.rewards), "eval/turns": float(np.mean(turns)) if rows else 0.0,
               "eval/tool_call_rate": float(np.mean([(s.get("tool_calls") or 0) > 0 for s in states])) if rows else 0.0,
               "eval/errors": float(errors)}
    metrics.update({f"eval/reward/{k}": nan_mean(v) for k, v in scores.scores.items()})
    return metrics


def _text_episodes(env, rows, base_url, model, api_key, defaults, timeout_s):
    """An ordinary env's episodes with the endpoint as the policy; a refused request ends as an
    empty turn (counted)."""
    from grpo_jax.envs.agent import make_client
    from grpo_jax.envs.base import run_episodes

    failures = []

    async def policy(messages):
        client = make_client(base_url, api_key=api_key, defaults={"model": model, **defaults}, timeout_s=timeout_s)
        try:
            reply = await client.chat.completions.create(model=model, messages=[
                {"role": m["role"], "content": m["content"]} for m in messages])
            return reply.choices[0].message.content or ""
        except Exception as e:  # the endpoint's refusal is this episode's, not the evaluation's
            failures.append(repr(e))
            logger.warning("evaluate_endpoint: a request failed: %r", e)
            return ""
        finally:
            await client.close()

    episodes = run_episodes(env, rows, policy)
    return ([e.prompt for e in episodes], [e.completion for e in episodes], [e.state for e in episodes],
            len(failures))


__all__ = ["evaluate_endpoint", "play", "sampling_defaults"]
