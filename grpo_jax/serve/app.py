"""The OpenAI-compatible FastAPI app on an `Engine` and a `Tokenizer` (`create_app`).

    POST /v1/chat/completions   OpenAI chat completions (n, tools, logprobs, stop, seed, stream)
    GET  /v1/models             the served model
    POST /v1/tokens/generate    ids in, ids + log-probs + finish reasons out (trainers, agent envs)
    GET  /health

Every error is answered in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`:
400 for a bad request (pydantic's validation errors included, which FastAPI would answer 422),
500 for a failure of the server, which keeps serving.
"""

from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from grpo_jax.engine import Engine
from grpo_jax.sampling import SamplingError
from grpo_jax.serve.protocol import APIError, ChatRequest, TokensRequest, error_body
from grpo_jax.serve.recorder import Recorder
from grpo_jax.serve.service import ServeConfig, Service
from grpo_jax.tokenizer import TemplateError

logger = logging.getLogger(__name__)


def _param(loc) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


async def _answer(coroutine):
    """The endpoint's result, or its failure as an OpenAI error response."""
    try:
        return await coroutine
    except APIError as e:
        return JSONResponse(e.body(), status_code=e.status)
    except (SamplingError, TemplateError) as e:  # the engine's / template's word on the input
        return JSONResponse(error_body(str(e)), status_code=400)
    except Exception as e:
        logger.exception("serve: internal error")
        return JSONResponse(error_body(f"internal server error: {type(e).__name__}: {e}", type="server_error"),
                            status_code=500)


def create_app(engine: Engine, tokenizer, config: ServeConfig | None = None, *,
               recorder: Recorder | None = None, **config_fields) -> FastAPI:
    """The app; `config` (or its fields as keywords: `model_name=...`) as `ServeConfig`.
    `app.state.recorder` holds the records, `app.state.service` the logic."""
    config = config or ServeConfig(**config_fields)
    recorder = recorder or Recorder(config.max_episodes)
    service = Service(engine, tokenizer, config, recorder)
    app = FastAPI(title="grpo_jax OpenAI-compatible server", docs_url=None, redoc_url=None)
    app.state.service, app.state.recorder, app.state.engine = service, recorder, engine

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
        else:
            param = _param(first.get("loc", ()))
            message = "; ".join(f"{_param(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors[:5])
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type=kind), status_code=exc.status_code)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, x_episode_id: Optional[str] = Header(None)):
        return await _answer(service.chat(body, x_episode_id))

    @app.post("/v1/tokens/generate")
    async def tokens_generate(body: TokensRequest, x_episode_id: Optional[str] = Header(None)):
        return await _answer(service.tokens(body, x_episode_id))

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app
