"""The floor for a Python gateway: FastAPI + httpx forwarding chat completions, nothing
else (no auth, no metrics, no limits). Upstream base URL from ``BENCH_UPSTREAM``.
Run: ``BENCH_UPSTREAM=http://127.0.0.1:9000 uvicorn bench.minimal_passthrough:app``."""

import os

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

app = FastAPI()
client = httpx.AsyncClient(base_url=os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9000"),
                           timeout=600, limits=httpx.Limits(max_connections=None))


@app.post("/v1/chat/completions")
async def chat(request: Request) -> StreamingResponse:
    req = client.build_request("POST", "/v1/chat/completions", content=await request.body(),
                               headers={"content-type": "application/json"})
    up = await client.send(req, stream=True)
    return StreamingResponse(up.aiter_raw(), status_code=up.status_code,
                             media_type=up.headers.get("content-type"),
                             background=BackgroundTask(up.aclose))
