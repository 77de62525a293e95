"""The web dashboard: a static page (HTML, CSS, ES modules shipped in the package, no
build step, no CDN) and the two small JSON routes it needs besides the API.

The page itself holds no secret and needs no key; every call it makes sends the key the
admin typed (kept in ``sessionStorage``) as ``Authorization: Bearer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, Response

from gateway.auth import is_loopback, require_key
from gateway.errors import OpenAIError
from gateway.state import GatewayState, request_store
from layers.store import MAX_SEQ

router = APIRouter(tags=["dashboard"])

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Scripts and styles from this origin only; no inline script, no framing, no referrer
# (the key never travels in a URL, but the page's paths need not either).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def _assets() -> dict[str, Path]:
    """The files the page may load, by name: exactly what ships in ``gateway/static``."""
    return {
        p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES
    }


def _file(path: Path) -> FileResponse:
    return FileResponse(
        path,
        media_type=CONTENT_TYPES[path.suffix],
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return _file(STATIC_DIR / "index.html")


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    path = _assets().get(name)
    if path is None:
        raise OpenAIError(404, f"no dashboard asset {name!r}", code="unknown_url")
    return _file(path)


@router.get("/dashboard/session", include_in_schema=False)
async def session(request: Request) -> dict[str, Any]:
    """Whether the page must ask for a key before calling the API (no key configured:
    loopback clients are served without one). Reveals nothing else."""
    gw: GatewayState = request.app.state.gw
    client = request.client.host if request.client else None
    return {"key_required": not (gw.keys.open_to_loopback and is_loopback(client))}


@router.get("/v1/dashboard", dependencies=[Depends(require_key)])
async def overview(request: Request) -> dict[str, Any]:
    """What the page needs to start: where the verdict stream stands, and what the key
    and this process allow."""
    gw: GatewayState = request.app.state.gw
    pipeline = gw.pipeline
    last_seq = int(pipeline.bus.last_seq) if pipeline is not None else 0
    return {
        "object": "dashboard",
        "last_verdict_seq": last_seq,
        "layer_control": gw.supervisor is not None,
        "admin_key_configured": gw.keys.admin is not None,
        "autonomy": gw.settings.actions.autonomy,
        "task_layer": gw.settings.gateway.task_layer,
    }


@router.get("/v1/audit", dependencies=[Depends(require_key)])
async def audit(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    after: Annotated[int | None,
                     Query(ge=0, le=MAX_SEQ, description="entries after this seq")] = None,
) -> dict[str, Any]:
    """The append-only audit log: the newest ``limit`` entries (oldest first), or the
    entries after ``after`` when given (for paging forward, as `ai-sysadmin audit`)."""
    store = await request_store(request)
    if after is None:
        async with store.tx() as tx:
            rows = await tx.execute("SELECT COALESCE(MAX(seq), 0) AS m FROM audit")
        after = max(0, int(rows[0]["m"]) - limit)
    entries = await store.list_audit(after=after, limit=limit)
    return {"object": "list", "data": [{"object": "audit", **e.model_dump()} for e in entries]}
