"""Request models that mirror OpenAI's schema, validated the way OpenAI's API validates them.

Every declared field is strict: no string -> bool/number coercion (pydantic's lax mode would
turn `"stream": "yes"` into True), ints are not bools. Messages follow OpenAI's per-role rules
(what must carry content, only assistants carry `tool_calls`, a tool message names its call).
Fields the gateway does not declare are passed to the worker untouched: vLLM accepts extras
such as `top_k` or `guided_json`, and dropping them would silently change a client's request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)

_STRICT = ConfigDict(extra="allow", strict=True)


class _Strict(BaseModel):
    model_config = _STRICT


# --- content parts
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str
    format: Literal["wav", "mp3"]


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(_Strict):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(_Strict):
    type: Literal["file"]
    file: FileRef


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


class WorkerPart(_Strict):
    """A part type OpenAI does not define but vLLM does (`video_url`, `audio_url`, ...):
    the worker decides; the gateway only checks it is an object with a string `type`."""

    type: str


# Types whose shape OpenAI defines; any other string type goes to the worker as WorkerPart.
_OPENAI_PART_TYPES = {"text", "image_url", "input_audio", "file", "refusal"}


def _part_tag(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    if not isinstance(kind, str):
        return None  # pydantic then reports the missing/invalid discriminator
    return kind if kind in _OPENAI_PART_TYPES else "worker"


def _parts(*allowed: type[BaseModel]) -> Any:
    tags = {"text": TextPart, "image_url": ImageURLPart, "input_audio": InputAudioPart,
            "file": FilePart, "refusal": RefusalPart, "worker": WorkerPart}
    members = [Annotated[model, Tag(tag)] for tag, model in tags.items() if model in allowed]
    union = members[0]
    for member in members[1:]:
        union = union | member
    return list[Annotated[union, Discriminator(_part_tag)]]


TextParts = _parts(TextPart)
UserParts = _parts(TextPart, ImageURLPart, InputAudioPart, FilePart, WorkerPart)
AssistantParts = _parts(TextPart, RefusalPart)


# --- messages, one model per role
class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON document as a string, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class _NotAssistant(_Strict):
    """Only assistant messages carry calls; OpenAI refuses them on any other role."""

    @model_validator(mode="after")
    def _no_calls(self) -> _NotAssistant:
        extra = self.model_extra or {}
        for field in ("tool_calls", "function_call"):
            if field in extra:
                raise ValueError(f"only assistant messages may carry '{field}'")
        return self


class SystemMessage(_NotAssistant):
    role: Literal["system"]
    content: str | TextParts
    name: str | None = None


class DeveloperMessage(_NotAssistant):
    role: Literal["developer"]
    content: str | TextParts
    name: str | None = None


class UserMessage(_NotAssistant):
    role: Literal["user"]
    content: str | UserParts
    name: str | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | AssistantParts | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls and self.function_call is None \
                and self.refusal is None:
            raise ValueError("an assistant message needs content, tool_calls or function_call")
        return self


class ToolMessage(_NotAssistant):
    role: Literal["tool"]
    content: str | TextParts
    tool_call_id: str


class FunctionMessage(_NotAssistant):
    role: Literal["function"]
    content: str | None
    name: str


RoleMessage = Annotated[
    Annotated[SystemMessage, Tag("system")] | Annotated[DeveloperMessage, Tag("developer")]
    | Annotated[UserMessage, Tag("user")] | Annotated[AssistantMessage, Tag("assistant")]
    | Annotated[ToolMessage, Tag("tool")] | Annotated[FunctionMessage, Tag("function")],
    Discriminator("role"),
]
_ROLE_RULES: TypeAdapter[Any] = TypeAdapter(RoleMessage)


class ChatMessage(_Strict):
    """One chat message as pipeline stages see it: any role, content a string or a list of
    part dicts, other fields (`tool_calls`, `tool_call_id`, ...) as extras, so a stage can
    read parts with `.get` and build `ChatMessage(role="system", content=...)`.

    Validation is stricter than this shape: every message must also pass the model of its
    role above (errors then name e.g. `messages.2.tool_call_id`).
    """

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _follows_its_role(cls, data: Any, handler: Any) -> ChatMessage:
        if isinstance(data, dict):
            _ROLE_RULES.validate_python(data)
        return handler(data)


# --- request bodies
class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: dict[str, str]


class RoutedRequest(_Strict):
    """A body the gateway routes to a worker by its `model`."""

    model: str = Field(min_length=1)
    stream: bool = False

    def requested_max_tokens(self) -> int | None:
        """The output-length limit the client asked for (None: none asked, or no generation)."""
        return None


class GenerationRequest(RoutedRequest):
    """Fields shared by chat and text completions."""

    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def upstream_body(self) -> dict[str, Any]:
        """The JSON sent to the worker: declared fields that were set, plus every extra."""
        return self.model_dump(exclude_unset=True, exclude_none=False, mode="json")


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


TokenIds = list[Annotated[int, Field(ge=0)]]
Prompt = str | list[str] | TokenIds | list[TokenIds]


def _not_empty(value: object, field: str) -> None:
    if isinstance(value, list | str) and not value:
        raise ValueError(f"{field} must not be empty")


class CompletionRequest(GenerationRequest):
    # A string, a list of strings, a list of token ids, or a list of token id lists.
    prompt: Prompt
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0)  # the worker enforces its own maximum
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: Prompt) -> Prompt:
        if isinstance(prompt, list):
            _not_empty(prompt, "prompt")
        return prompt


class ResponsesRequest(RoutedRequest):
    """`POST /v1/responses`: `input` is a string or a list of input items (objects)."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    previous_response_id: str | None = None
    store: bool | None = None
    tools: list[dict[str, Any]] | None = None
    user: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, value: Any) -> Any:
        _not_empty(value, "input")
        return value


class EmbeddingRequest(RoutedRequest):
    input: Prompt
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, value: Any) -> Any:
        _not_empty(value, "input")
        return value


class TokenizeRequest(_Strict):
    """vLLM's `POST /tokenize`: a `prompt`, or chat `messages` rendered by the template."""

    model: str | None = Field(None, min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = Field(None, min_length=1)
    tokens: TokenIds
