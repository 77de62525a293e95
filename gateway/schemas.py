"""Pydantic models of the OpenAI request bodies the gateway validates.

Only what the gateway must check is typed; every other field a client sends is kept
(``extra="allow"``) and passed to the layer unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
