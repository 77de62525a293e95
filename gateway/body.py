"""Reading request bodies safely: size limit before buffering, JSON errors as 400s."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from gateway.errors import OpenAIError, validation_error

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
