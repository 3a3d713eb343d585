"""Request models that mirror OpenAI's schema for the two generation routes.

The gateway validates what it must reason about (model, messages, stream, token limits) and
passes every other field through untouched: vLLM accepts extras such as `top_k` or
`guided_json`, and dropping them would silently change a client's request.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # A string, a list of content parts (text, image_url, ...), or null for tool calls.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class GenerationRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=128)
    user: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def upstream_body(self) -> dict[str, Any]:
        """The JSON sent to the worker: declared fields that were set, plus every extra."""
        return self.model_dump(exclude_unset=True, exclude_none=False, mode="json")


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    # A string, a list of strings, a list of token ids, or a list of token id lists.
    prompt: str | list[str] | list[int] | list[list[int]]

    @model_validator(mode="after")
    def _prompt_not_empty(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self
