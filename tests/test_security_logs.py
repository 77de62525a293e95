"""Issue 9, logs: prompts and log content (event messages) never reach the gateway's own
log at info level — only when debug logging is explicitly on."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.fake_upstream import FakeUpstream
from tests.reliability_support import ANOMALY, AUTH, GatewayFactory, wait_until

PROMPT = "PROMPT-MARKER-7f3a my database password is hunter2"
LOGLINE = "LOGLINE-MARKER-9c1e"


@pytest.mark.parametrize("level", ["info", "debug"])
def test_prompts_and_log_content_stay_out_of_the_log_unless_debug(
    gateways: GatewayFactory, fakes: Callable[..., FakeUpstream], level: str
) -> None:
    # The fake answers "fine" to everything: the trigger stage's output is then invalid,
    # which it logs (a path that could echo the events it was classifying).
    up = fakes("ok")
    gw = gateways(up.port, gateway={"log_level": level},
                  pipeline={"debounce": 0.0, "poll_interval": 0.2})
    with httpx.Client(headers=AUTH, timeout=30) as c:
        for model in ("meta", "ai-sysadmin"):
            r = c.post(f"{gw.url}/v1/chat/completions",
                       json={"model": model, "messages": [{"role": "user", "content": PROMPT}]})
            assert r.status_code == 200
        events = [{"id": f"log-{level}-{i}", "unit": "db.service",
                   "message": f"{ANOMALY} {LOGLINE} token=abc{i}"} for i in range(4)]
        assert c.post(f"{gw.url}/v1/events", json={"events": events}).status_code == 200
        assert wait_until(lambda: up.requests >= 3, 20)  # the trigger layer was asked
        assert wait_until(lambda: "unusable" in gw.log() or "invalid" in gw.log(), 20)
    gw.stop()
    log = gw.log()
    assert LOGLINE not in log
    if level == "info":
        assert PROMPT not in log and "hunter2" not in log
    else:
        assert PROMPT in log  # debug is the explicit switch that shows prompts
