"""Which chats to ``ai-sysadmin`` are a frontend's background tasks (titles, tags,
follow-ups): those go to ``gateway.task_layer`` (the small trigger layer) instead of the
sysadmin. Recognised by the frontend's ``metadata.task`` or by ``gateway.task_patterns``
on the head of the last message.

One detector per gateway, built from its settings (``GatewayState.task_detector``).
"""

from __future__ import annotations

import re
from typing import Any

# The ``metadata.task`` values that frontends (Open WebUI, LibreChat) send with their
# background requests.
TASK_NAMES = frozenset({
    "title_generation", "tags_generation", "follow_up_generation", "query_generation",
    "emoji_generation", "autocomplete_generation", "image_prompt_generation", "title",
})


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


class TaskDetector:
    """Recognises frontend background tasks (titles, tags, follow-ups)."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = [re.compile(p, re.MULTILINE) for p in patterns]

    def is_task(self, body: dict[str, Any]) -> bool:
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and str(metadata.get("task", "")) in TASK_NAMES:
            return True
        messages = body.get("messages") or []
        if not messages:
            return False
        head = _text_of(messages[-1])[:400]
        return any(p.search(head) for p in self.patterns)
