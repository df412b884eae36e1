r"""Serves a policy over an OpenAI-compatible HTTP API (docs/serve.md).

    python experiments/serve.py --hf_path DIR [--port 8000] [--slots 16] [--max_length 4096]
    python experiments/serve.py --config configs/NAME.py --workdir DIR [--step N]

An HF directory (weights and tokenizer, e.g. one `experiments/export.py` wrote), or a run's
checkpoint (the newest, or step N; the untrained model when the workdir has none). Binds to
127.0.0.1 unless --host says otherwise. One process: the engine runs on this host's devices.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_HF_PATH = flags.DEFINE_string("hf_path", None, "HF checkpoint directory (config.json, safetensors, tokenizer).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (instead of --hf_path).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (with --config).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (with --config; default: the newest).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 exposes the server to the network).")
_PORT = flags.DEFINE_integer("port", 8000, "Port (0: a free one, printed).")
_SLOTS = flags.DEFINE_integer("slots", 16, "Episodes decoded at once (the engine's KV-cache slots).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Tokens per request, prompt and completion "
                                   "(default: the model's context, at most 4096).")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 256, "Prompt tokens a slot prefills per call.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 8, "Decode steps per device call.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Name in /v1/models (default: the directory's name).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of an --hf_path model.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of requests that give none (each draws a new key from it).")


def _hf_tokenizer(path: str):
    from grpo_jax import tokenizer as tokenizer_lib

    sp_model = os.path.join(path, "tokenizer.model")
    if not os.path.exists(os.path.join(path, "tokenizer.json")) and os.path.exists(sp_model):
        return tokenizer_lib.from_sentencepiece(sp_model)  # a tiny task's export
    return tokenizer_lib.from_pretrained(path)


def _from_run(config, workdir: str):
    from grpo_jax import components
    from grpo_jax.checkpoint import Checkpointer

    run = components.build(config, workdir)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    if checkpointer.latest_step() is None:
        step, params = 0, run.init_state().params
    else:
        step, state, _, _ = components.restore(run, checkpointer, _STEP.value)
        params = state.params
    checkpointer.close()
    logging.info("serving step %d of %s", step, workdir)
    return run.sampling_policy(params), run.tokenizer, f"{os.path.basename(os.path.normpath(workdir))}-step{step}"


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    if bool(_HF_PATH.value) == bool(_CONFIG.value):
        raise app.UsageError("give --hf_path, or --config with --workdir")
    if _CONFIG.value and not _WORKDIR.value:
        raise app.UsageError("--config needs --workdir")
    import uvicorn

    from grpo_jax.models import load_hf
    from grpo_jax.serve import build_engine, create_app

    if _HF_PATH.value:
        path = _HF_PATH.value
        model, tokenizer = load_hf(path, dtype=_DTYPE.value), _hf_tokenizer(path)
        name = os.path.basename(os.path.normpath(path))
    else:
        model, tokenizer, name = _from_run(_CONFIG.value, _WORKDIR.value)
    max_length = _MAX_LENGTH.value or min(model.config.max_position_embeddings, 4096)
    engine = build_engine(model, tokenizer, slots=_SLOTS.value, max_length=max_length,
                          prefill_chunk=min(_PREFILL_CHUNK.value, max_length), decode_steps=_DECODE_STEPS.value)
    application = create_app(engine, tokenizer, model_name=_MODEL_NAME.value or name, seed=_SEED.value)
    logging.info("serving %s on http://%s:%d/v1 (slots=%d, max_length=%d)", _MODEL_NAME.value or name, _HOST.value,
                 _PORT.value, engine.config.slots, max_length)
    uvicorn.run(application, host=_HOST.value, port=_PORT.value, log_level="info", lifespan="off", ws="none")


if __name__ == "__main__":
    app.run(main)
