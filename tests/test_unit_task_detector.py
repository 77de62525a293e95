"""TaskDetector (gateway/tasks.py): which chats to `ai-sysadmin` are a frontend's
background tasks (titles, tags, follow-ups) that go to the small trigger layer, and which
are a person's questions that get the sysadmin. The default patterns are the configured
ones (``gateway.task_patterns``); the prompts are the frontends' own wording."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.tasks import TASK_NAMES, TaskDetector
from layers.config import GatewayConfig

DEFAULT = TaskDetector(GatewayConfig().task_patterns)

# Background prompts as Open WebUI and LibreChat send them.
OPENWEBUI_TITLE = (
    "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
    "### Guidelines:\n- The title should clearly represent the main theme\n"
    "### Chat History:\n<chat_history>\nUSER: why is nginx down?\n</chat_history>"
)
OPENWEBUI_TAGS = "### Task:\nGenerate 1-3 broad tags categorizing the main themes of the chat history"
OPENWEBUI_FOLLOW_UPS = "  ### Task:\nSuggest 3-5 relevant follow-up questions or prompts"
LIBRECHAT_TITLE = "Please generate a concise, 5-word-or-less title for the conversation."
OLDER_TITLE = "Create a short title for this conversation, using the user's language."
GENERATE_TITLE = "Generate a concise, 3-5 word title for the following text: disk is full"


def chat(*contents: Any, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": c}
                for i, c in enumerate(contents)]
    return {"model": "ai-sysadmin", "messages": messages, **extra}


@pytest.mark.parametrize("prompt", [OPENWEBUI_TITLE, OPENWEBUI_TAGS, OPENWEBUI_FOLLOW_UPS,
                                    LIBRECHAT_TITLE, OLDER_TITLE, GENERATE_TITLE])
def test_frontend_background_prompts_are_tasks(prompt: str) -> None:
    assert DEFAULT.is_task(chat(prompt))
    # also at the end of a conversation: it is the last message that counts
    assert DEFAULT.is_task(chat("why is nginx down?", "It exited with code 1.", prompt))


@pytest.mark.parametrize("question", [
    "Why did nginx.service fail at 03:12?",
    "Which task failed in the backup job? ### Task: column is empty",  # not at a line start
    "Give the incident a better name",
    "My disk is full. What should I delete first?",
    "",
])
def test_a_persons_questions_are_not_tasks(question: str) -> None:
    assert not DEFAULT.is_task(chat(question))


def test_a_task_prompt_earlier_in_the_history_does_not_make_the_next_question_a_task() -> None:
    assert not DEFAULT.is_task(chat(OPENWEBUI_TITLE, "🔧 Nginx Down", "and how do I fix it?"))


def test_only_the_start_of_the_last_message_is_looked_at() -> None:
    pasted = "x" * 400 + "\n### Task:\nGenerate a title"
    assert not DEFAULT.is_task(chat(pasted))
    assert DEFAULT.is_task(chat("x" * 300 + "\n### Task:\nGenerate a title"))


def test_content_given_as_parts_is_read_like_text() -> None:
    parts = [{"type": "text", "text": "### Task:"}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "Generate a title"}]
    assert DEFAULT.is_task(chat(parts))
    assert not DEFAULT.is_task(chat([{"type": "text", "text": "what is on this screenshot?"}]))


@pytest.mark.parametrize("task", sorted(TASK_NAMES))
def test_metadata_task_marks_a_task_whatever_the_text(task: str) -> None:
    assert DEFAULT.is_task(chat("why is nginx down?", metadata={"task": task}))


@pytest.mark.parametrize("metadata", [{"task": "chat"}, {"task": ""}, {}, "title_generation",
                                      {"other": "title_generation"}, None])
def test_other_metadata_does_not(metadata: Any) -> None:
    assert not DEFAULT.is_task(chat("why is nginx down?", metadata=metadata))


@pytest.mark.parametrize("body", [
    {"model": "ai-sysadmin"},
    {"model": "ai-sysadmin", "messages": []},
    {"model": "ai-sysadmin", "messages": None},
    {"model": "ai-sysadmin", "messages": [{"role": "assistant", "content": None}]},
    {"model": "ai-sysadmin", "messages": [{"role": "assistant", "tool_calls": []}]},
])
def test_bodies_without_text_are_not_tasks_and_do_not_fail(body: dict[str, Any]) -> None:
    assert not DEFAULT.is_task(body)


def test_the_configured_patterns_are_the_ones_used() -> None:
    own = TaskDetector([r"(?i)^\[bg\]"])
    assert own.is_task(chat("[BG] summarise"))
    assert not own.is_task(chat(OPENWEBUI_TITLE))  # the defaults are replaced, not extended
    none = TaskDetector([])
    assert not none.is_task(chat(OPENWEBUI_TITLE))
    assert none.is_task(chat(OPENWEBUI_TITLE, metadata={"task": "title_generation"}))
