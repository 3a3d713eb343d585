"""One error type and the handlers that turn every failure into OpenAI's error JSON.

Clients written against OpenAI parse `{"error": {"message", "type", "param", "code"}}`; a
bare 500 or an HTML traceback breaks them, so every path out of the gateway goes through
here.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("tessera.gateway")


class OpenAIError(Exception):
    """An error the client should see, with OpenAI's fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _field_path(error: dict, payload: object) -> str | None:
    """OpenAI-style `param` ("messages.0.content") for a pydantic error.

    Pydantic puts union member labels and discriminator tags into `loc` ("user", "str",
    "list[...]"); walking the payload keeps only the steps that exist in the request, plus
    the name of a missing field or of the discriminator that did not match.
    """
    loc = [step for step in error.get("loc", ()) if step != "body"]
    parts: list[str] = []
    node = payload
    for step in loc:
        if isinstance(node, dict) and isinstance(step, str) and step in node:
            node = node[step]
            parts.append(step)
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
            parts.append(str(step))
    kind = error.get("type")
    if kind == "missing" and loc:
        parts.append(str(loc[-1]))
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        discriminator = str(error.get("ctx", {}).get("discriminator", ""))
        parts.append("role" if "role" in discriminator else "type")
    return ".".join(parts) or None


def validation_error(errors: list[dict], payload: object = None) -> OpenAIError:
    """The 400 for a failed pydantic validation, naming the bad field as `param`.

    For a value that matches no member of a union, the deepest error is the useful one
    (`messages.0.content.0.text` is not a string), not the first member's complaint.
    """
    if not errors:
        return OpenAIError(400, "Invalid request.", code="invalid_value")
    if errors[0].get("type") == "json_invalid":
        return OpenAIError(400, "We could not parse the JSON body of your request.",
                           code="invalid_json")
    # Deepest first; at equal depth a broken constraint ("must be >= 0") says more than a
    # union member's type mismatch ("should be a string").
    first = max(errors, key=lambda error: (len(error.get("loc", ())),
                                           not str(error.get("type", "")).endswith("_type")))
    param = _field_path(first, payload)
    where = f" at '{param}'" if param else ""
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return OpenAIError(400, f"Invalid request{where}: {message}", param=param,
                       code="invalid_value")


def no_healthy_worker_error() -> OpenAIError:
    return OpenAIError(503, "No healthy worker is available to serve this request; try again "
                       "shortly.", type="server_error", code="no_healthy_worker")


async def _on_openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return exc.response()


async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(list(exc.errors())).response()


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return OpenAIError(exc.status_code, str(exc.detail), type=kind).response()


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug of ours: log the traceback, give the client a shaped error and the request id.
    request_id = getattr(request.state, "request_id", "-")
    logger.exception("unhandled error request_id=%s", request_id)
    return OpenAIError(
        500,
        f"The gateway failed while handling request {request_id}.",
        type="server_error",
        code="internal_error",
    ).response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _on_openai_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
