"""A worker's error answer, in OpenAI's shape: mapped by HTTP status and vLLM's error type.

vLLM answers `{"error": {"message", "type": "BadRequestError", "param", "code": 400}}`, and
FastAPI's own 404 for a route it does not serve is `{"detail": "Not Found"}`. OpenAI clients
branch on status and on string types (`invalid_request_error`, `not_found_error`,
`rate_limit_error`, ...), and know a prompt over the context as `context_length_exceeded`.
"""

from __future__ import annotations

import json

from server.errors import OpenAIError

# vLLM's exception class names (its `error.type`) -> OpenAI's error types.
_VLLM_TYPES = {
    "BadRequestError": "invalid_request_error",
    "NotFoundError": "not_found_error",
    "RateLimitError": "rate_limit_error",
    "AuthenticationError": "authentication_error",
    "PermissionDeniedError": "permission_error",
    "NotImplementedError": "invalid_request_error",
}
_STATUS_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error",
}
# The phrase vLLM's input-length check uses (vllm/entrypoints/.../serving: "This model's
# maximum context length is N tokens. However, your prompt contains ..."). Only this one is
# a context-length error; other messages that happen to say "too long" are not.
_CONTEXT_PHRASE = "maximum context length"

# Which request field holds the prompt, per route: the `param` of a context-length error.
PROMPT_PARAM = {"chat": "messages", "completions": "prompt", "responses": "input",
                "embeddings": "input", "tokenize": "prompt"}


def _read(payload: bytes) -> tuple[str, str | None, object, object]:
    """(message, vLLM type, param, code) from a worker's error body, whatever its shape."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return payload.decode(errors="replace")[:500], None, None, None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"]
        return (str(detail.get("message") or ""), detail.get("type"), detail.get("param"),
                detail.get("code"))
    if isinstance(body, dict) and "detail" in body:  # FastAPI's own errors
        return str(body["detail"]), None, None, None
    return str(body)[:500], None, None, None


def normalise_upstream_error(
    status_code: int, payload: bytes, route: str = "", method_path: str = ""
) -> OpenAIError:
    """The OpenAIError to send for a worker's non-2xx answer."""
    message, vllm_type, param, code = _read(payload)
    param = param if isinstance(param, str) else None
    code = code if isinstance(code, str) else None  # vLLM puts the status int there
    if status_code == 404 and message == "Not Found":
        # FastAPI's 404 for an unknown path: the worker does not serve this route.
        return OpenAIError(404, f"The workers do not serve {method_path or 'this route'}.",
                           type="not_found_error", code="route_not_served")
    if 400 <= status_code < 500:
        kind = _STATUS_TYPES.get(status_code) or _VLLM_TYPES.get(str(vllm_type),
                                                                 "invalid_request_error")
        if status_code == 400 and _CONTEXT_PHRASE in message.lower():
            code, param = "context_length_exceeded", PROMPT_PARAM.get(route, param)
        return OpenAIError(status_code, message or "Invalid request.", type=kind, param=param,
                           code=code)
    if status_code in (503, 504):
        # The worker is overloaded or timed out: the same status tells clients to retry later.
        return OpenAIError(status_code, f"The worker is unavailable: {message or status_code}",
                           type="server_error", code="upstream_unavailable")
    return OpenAIError(502, f"The worker failed: {message or status_code}", type="server_error",
                       code="upstream_error")
