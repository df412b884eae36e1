"""uvicorn in a background thread on a free localhost port (`serve`), for tests, trainers and
agent environments that talk to the model over HTTP from the same process.

    with serve(engine, tokenizer, model_name="policy") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")

The app's event loop (and so the engine's scheduler) runs in the server thread.
"""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI

from grpo_jax.serve.app import create_app


class Server:
    """A running uvicorn server; `url` is its base URL (`http://127.0.0.1:PORT`)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 start_timeout_s: float = 60.0):
        self.app = app
        # lifespan off: the app has no startup work; ws off: no websocket library needed.
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", ws="none",
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"serve-{host}:{port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {host}:{port}"
                                   + (f": {self._error!r}" if self._error else " (is the port in use?)"))
            time.sleep(0.01)
        sock = self._server.servers[0].sockets[0]
        bound_host, self.port = sock.getsockname()[:2]
        self.host = host
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{self.port}"

    def _serve(self):
        try:
            self._server.run()
        except BaseException as e:  # startup failures (bind errors) are reported by __init__
            self._error = e

    @property
    def recorder(self):
        return self.app.state.recorder

    def stop(self, timeout_s: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(app_or_engine, tokenizer=None, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
          **app_kwargs) -> Server:
    """Starts a server in a background thread and returns it once it accepts connections:
    `serve(app)` for an app of `create_app`, or `serve(engine, tokenizer, **create_app kwargs)`.
    Binds to localhost unless `host` says otherwise; port 0 picks a free one."""
    if isinstance(app_or_engine, FastAPI):
        if tokenizer is not None or app_kwargs:
            raise TypeError("serve(app) takes no tokenizer or app arguments (the app has them)")
        app = app_or_engine
    else:
        if tokenizer is None:
            raise TypeError("serve(engine, tokenizer, ...) needs the tokenizer")
        app = create_app(app_or_engine, tokenizer, **app_kwargs)
    return Server(app, host, port, log_level=log_level)


def build_engine(model, tokenizer, **engine_config):
    """An `Engine` on `model` with the tokenizer's stop and pad ids and its detokenizer (stop
    strings); `engine_config`: other `EngineConfig` fields (slots, max_length, ...)."""
    from grpo_jax.engine import Engine, EngineConfig

    engine_config.setdefault("stop_token_ids", tuple(tokenizer.stop_ids))
    engine_config.setdefault("pad_id", tokenizer.pad_id)
    return Engine(model, EngineConfig(**engine_config), detokenize=tokenizer.decode)
