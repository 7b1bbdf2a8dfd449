"""What the router reads in a request: the text it scores, and the system prompt that may steer it."""
from __future__ import annotations


def message_text(message: dict) -> str:
    """A chat message's text: its string content, or the text parts of a list of content parts."""
    c = message.get("content") or ""
    return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if isinstance(p, dict))


def chat_query(conversation: list[dict]) -> tuple[str, str | None]:
    """The last user message (else the last message), and the system / developer prompts joined (or None)."""
    users = [message_text(m) for m in conversation if m.get("role") == "user"]
    system = "\n".join(t for m in conversation if m.get("role") in ("system", "developer") and (t := message_text(m)))
    return (users[-1] if users else message_text(conversation[-1]) if conversation else ""), system or None
