"""What a client may send and how it is read.

Bodies are read under a size limit, refused with 413 before they are buffered; JSON that
does not parse, is not an object or nests too deeply is a 400; a body that fails its
model is a 400 with ``param`` (:func:`~gateway.errors.validation_error`).

The Pydantic models of the OpenAI request bodies the gateway validates type only what
the gateway must check; every other field a client sends is kept (``extra="allow"``) and
passed to the layer unchanged (:func:`read_model` returns the raw dict with the model).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import OpenAIError, validation_error

# -- reading a body ------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing anything over ``limit`` bytes with 413 without buffering it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise OpenAIError(400, "invalid Content-Length header") from None
        if size > limit:
            raise OpenAIError(
                413, f"request body of {size} bytes exceeds the {limit}-byte limit",
                code="request_too_large",
            )
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise OpenAIError(
                413, f"request body exceeds the {limit}-byte limit", code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise OpenAIError(400, "request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise OpenAIError(400, "request body is not valid UTF-8", code="invalid_json") from None
    except RecursionError:
        raise OpenAIError(400, "request JSON is nested too deeply", code="invalid_json") from None
    except ValueError as exc:
        raise OpenAIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    except RecursionError:
        raise OpenAIError(400, "request JSON is nested too deeply", code="invalid_json") from None


async def read_model(request: Request, model: type[M], limit: int) -> tuple[M, dict[str, Any]]:
    """Body → (validated model, raw dict). The raw dict keeps fields we pass through."""
    data = parse_json_object(await read_body(request, limit))
    return validate(model, data), data


# -- the request bodies --------------------------------------------------------------------

MAX_MESSAGES = 1024
MAX_TOKENS_BOUND = 1_000_000
# Stop strings a request may carry (OpenAI allows 4; llama-server any number). The layer's
# own are added to them.
MAX_STOPS = 32
StopList = Annotated[list[str], Field(max_length=MAX_STOPS)]


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(Loose):
    type: str


class ChatMessage(Loose):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(Loose):
    include_usage: bool = False


class JsonSchemaSpec(Loose):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Loose):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("json_schema.schema is required when type is json_schema")
        return self


class ChatCompletionRequest(Loose):
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # strict: the raw body is what reaches the layer, so "12" or true must not pass as 12.
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND, strict=True)
    # llama-server's own name for the output length (it wins over max_tokens); -1: no limit.
    n_predict: int | None = Field(None, ge=-1, le=MAX_TOKENS_BOUND, strict=True)
    stop: str | StopList | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=1, description="only one choice per request")
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, Any] | None = None


class CompletionRequest(Loose):
    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str] | list[int]
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND, strict=True)
    n_predict: int | None = Field(None, ge=-1, le=MAX_TOKENS_BOUND, strict=True)
    stop: str | StopList | None = None
    temperature: float | None = Field(None, ge=0, le=2)


class EmbeddingRequest(Loose):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
