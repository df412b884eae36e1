"""An OpenAI-compatible HTTP server on the rollout engine (docs/serve.md).

    engine = Engine(model, EngineConfig(slots=16, max_length=2048, stop_token_ids=tok.stop_ids,
                                        pad_id=tok.pad_id), detokenize=tok.decode)
    with serve(engine, tok, model_name="policy") as server:      # a background thread
        ...  # openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        records = server.recorder.pop("episode-7")               # exact ids and log-probs
"""

from grpo_jax.serve.app import create_app
from grpo_jax.serve.protocol import APIError
from grpo_jax.serve.recorder import Record, Recorder
from grpo_jax.serve.server import Server, build_engine, serve
from grpo_jax.serve.service import ServeConfig, Service

__all__ = ["APIError", "Record", "Recorder", "ServeConfig", "Server", "Service", "build_engine", "create_app", "serve"]
