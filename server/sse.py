"""OpenAI wire shapes: SSE framing, stream chunks, non-streaming bodies and the error body.

The sequence follows vLLM (reference/serving-anchors.md §2.2): the role delta goes out together with the first
token; content chunks; a terminal chunk with finish_reason; a usage chunk with `choices: []` when asked;
`data: [DONE]` always, also after an error event. Every chunk of a response has the same id and created.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_body(message: str, type: str, param: str | None, code: int) -> dict[str, Any]:
    """vLLM's ErrorResponse: the openai client reads body["error"]["message"]."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage_body(
    num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0
) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


class ChunkBuilder:
    """Builds the chunks of one streamed response; `is_chat` picks chat.completion.chunk or text_completion."""

    def __init__(self, response_id: str, created: int, model: str, is_chat: bool):
        self._head = {
            "id": response_id,
            "object": "chat.completion.chunk" if is_chat else "text_completion",
            "created": created,
            "model": model,
        }
        self._is_chat = is_chat
        self._sent_role = False

    def text(self, text: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        """A content chunk. The first chat chunk also carries the role (so it marks the real first token)."""
        return self._chunk(self._delta(text), None, usage)

    def finish(self, text: str, finish_reason: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        """The terminal chunk of the choice; carries the last text piece, if any."""
        return self._chunk(self._delta(text) if text else self._empty_delta(), finish_reason, usage)

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._head, "choices": [], "usage": usage}

    @property
    def sent_first(self) -> bool:
        return self._sent_role

    def _delta(self, text: str) -> dict[str, Any]:
        if not self._is_chat:
            self._sent_role = True
            return {"text": text}
        if self._sent_role:
            return {"content": text}
        self._sent_role = True
        return {"role": "assistant", "content": text}

    def _empty_delta(self) -> dict[str, Any]:
        return {"text": ""} if not self._is_chat else {}

    def _chunk(
        self, delta: dict[str, Any], finish_reason: str | None, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        choice = {"index": 0, **delta} if not self._is_chat else {"index": 0, "delta": delta}
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        chunk = {**self._head, "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        return chunk


def chat_completion_body(
    response_id: str, created: int, model: str, text: str, finish_reason: str, usage: dict[str, Any]
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    return _body(response_id, "chat.completion", created, model, choice, usage)


def completion_body(
    response_id: str, created: int, model: str, text: str, finish_reason: str, usage: dict[str, Any]
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return _body(response_id, "text_completion", created, model, choice, usage)


def _body(
    response_id: str, object: str, created: int, model: str, choice: dict[str, Any], usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }
