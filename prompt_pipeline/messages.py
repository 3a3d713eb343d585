"""Chat messages as stages read and rewrite them (shared by SecurityLingua and SeCom).

Messages are the gateway's pydantic objects with `.role` and `.content` (a string or a list
of content-part dicts); rewriting returns new lists and leaves the user's messages as sent.
"""

from __future__ import annotations

from typing import Any


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content
                         if isinstance(part, dict) and part.get("type") == "text"
                         and isinstance(part.get("text"), str))
    return ""


def user_text(messages: list[Any], turns: str) -> str:
    texts = [message_text(m.content) for m in messages if m.role == "user"]
    texts = [text for text in texts if text.strip()]
    if not texts:
        return ""
    return "\n".join(texts) if turns == "all" else texts[-1]


def with_system_note(messages: list[Any], note: str) -> list[Any]:
    """Messages with `note` appended to the first system message, or a new system message
    first; every other message object is passed through untouched."""
    for index, message in enumerate(messages):
        if message.role != "system":
            continue
        content = message.content
        if isinstance(content, list):
            updated = [*content, {"type": "text", "text": note}]
        else:
            updated = f"{content}\n\n{note}" if content else note
        return [*messages[:index], message.model_copy(update={"content": updated}),
                *messages[index + 1:]]
    system = type(messages[0])(role="system", content=note)
    return [system, *messages]
