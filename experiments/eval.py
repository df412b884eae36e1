r"""Evaluates a run: `python experiments/eval.py --config configs/NAME.py --workdir DIR [--step N]`.

Restores the newest checkpoint of DIR (or step N; the untrained model when DIR has none) and
prints one JSON line of held-out metrics (eval/accuracy, eval/tool_call_rate, pass@k ...).
Runs on several processes like `experiments/train.py` (same flags); process 0 prints.

Or evaluates any OpenAI-compatible endpoint on the config's env, with the same held-out rows
and rubric: `--base_url URL [--model NAME] [--api_key KEY]` (no workdir needed). An agent env
runs its agent with a client on the endpoint; any other env sends its conversations there
(`grpo_jax.agent_rollout.evaluate_endpoint`). Greedy (temperature 0) when config.eval.greedy,
else config.eval.temperature; config.sampling.max_new_tokens tokens a reply.
"""

import json
import os

from absl import app, flags, logging

from grpo_jax import cli

_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_BASE_URL = flags.DEFINE_string("base_url", None, "An OpenAI-compatible endpoint (its root or /v1) to evaluate "
                                "instead of a checkpoint.")
_MODEL = flags.DEFINE_string("model", None, "The endpoint's model (default: the first it lists).")
_API_KEY = flags.DEFINE_string("api_key", None, "The endpoint's API key (default: $OPENAI_API_KEY, else 'none').")
# --workdir is only needed without --base_url: main checks it (cli marks it required).
flags.FLAGS.set_default("workdir", "")


def evaluate_endpoint_of_config(config, base_url: str, model: str | None, api_key: str | None) -> dict:
    """The held-out metrics of `config`'s env on the endpoint (what --base_url prints)."""
    from grpo_jax import components
    from grpo_jax.agent_rollout import evaluate_endpoint

    api_key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
    if model is None:  # the endpoint's own (ours serves one model)
        import openai

        base = base_url.rstrip("/")
        listed = openai.OpenAI(base_url=base if base.endswith("/v1") else base + "/v1", api_key=api_key).models.list()
        model = listed.data[0].id
    env = components.build_env(config.env)
    rows = env.dataset("test", n=config.eval.num_examples, seed=config.env.data_seed)
    metrics = evaluate_endpoint(env, rows, base_url, model, api_key=api_key, correct_fn=config.eval.correct_fn,
                                threshold=config.eval.get("threshold", 0.5),
                                temperature=0.0 if config.eval.greedy else config.eval.temperature,
                                max_tokens=config.sampling.max_new_tokens)
    return {"base_url": base_url, "model": model, **metrics}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _BASE_URL.value:
        print(json.dumps(evaluate_endpoint_of_config(cli.config(), _BASE_URL.value, _MODEL.value, _API_KEY.value)))
        return
    if not cli.workdir():
        raise app.UsageError("--workdir is required (or --base_url to evaluate an endpoint)")
    cli.initialize_distributed()
    import jax

    from grpo_jax import components
    from grpo_jax.checkpoint import Checkpointer
    from grpo_jax.evaluation import evaluate_run

    run = components.build(cli.config(), cli.workdir())
    checkpointer = Checkpointer(os.path.join(cli.workdir(), "checkpoints"))
    if checkpointer.latest_step() is None:
        step, params = 0, run.init_state().params
    else:
        step, state, _, _ = components.restore(run, checkpointer, _STEP.value)
        params = state.params
    metrics, _ = evaluate_run(run, params, step)
    checkpointer.close()
    if jax.process_index() == 0:
        print(json.dumps({"step": step, **metrics}))


if __name__ == "__main__":
    app.run(main)
