"""Request bodies of the OpenAI-compatible endpoints, and OpenAI-style errors.

Bodies accept unknown fields (clients send many optional ones); fields the server cannot honour
with a non-default value are refused in `unsupported`, by name, rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Body):
    id: Optional[str] = None
    type: str = "function"
    function: FunctionCall


class Message(_Body):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    messages: list[Message]
    model: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                    # not OpenAI: as vLLM's extra field
    min_p: float = 0.0                # not OpenAI: as vLLM's extra field
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # Accepted only at their defaults (`unsupported`).
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict[str, Any]] = None
    parallel_tool_calls: Optional[bool] = None


class TokensRequest(_Body):
    prompt_ids: list[int] = Field(min_length=1)
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    episode_id: Optional[str] = None


def unsupported(request: ChatRequest) -> None:
    """Raises `APIError` for a field the server cannot honour."""
    if request.top_logprobs:
        raise APIError("top_logprobs > 0 is not supported (the engine returns the sampled token's log-prob "
                       "only); use logprobs=true", param="top_logprobs", code="unsupported")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            raise APIError(f"{name} is not supported", param=name, code="unsupported")
    if request.logit_bias:
        raise APIError("logit_bias is not supported", param="logit_bias", code="unsupported")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise APIError("response_format other than text (JSON mode, schemas) is not supported",
                       param="response_format", code="unsupported")


def check_sampling(n: int, temperature: float, top_p: float, top_k: int, min_p: float,
                   max_tokens: int | None, stop: list[str]) -> None:
    """The sampling fields' ranges, as OpenAI states them (param named in the error)."""
    checks = [(n >= 1, "n", "n must be >= 1"), (temperature >= 0, "temperature", "temperature must be >= 0"),
              (0 < top_p <= 1, "top_p", "top_p must be in (0, 1]"), (top_k >= 0, "top_k", "top_k must be >= 0"),
              (0 <= min_p <= 1, "min_p", "min_p must be in [0, 1]"),
              (max_tokens is None or max_tokens >= 1, "max_tokens", "max_tokens must be >= 1"),
              (all(isinstance(s, str) and s for s in stop), "stop", "stop strings must be non-empty")]
    for ok, param, message in checks:
        if not ok:
            raise APIError(message, param=param)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
