"""The OpenAPI description of the API, for API keys only.

FastAPI's default ``/openapi.json``, ``/docs`` and ``/redoc`` are served to anyone; the
gateway turns them off (see ``create_app``) so that every route but liveness, the model
list (when public) and the static dashboard page needs a key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from gateway.auth import require_key

router = APIRouter()


@router.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_key)])
async def openapi(request: Request) -> dict[str, Any]:
    schema: dict[str, Any] = request.app.openapi()
    return schema
