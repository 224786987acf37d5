"""server/sse.py: framing bytes, the chunk sequence (role with the first token), usage and error bodies."""

from __future__ import annotations

import orjson

from server import sse


def test_event_framing_is_compact_json_and_blank_line():
    assert sse.sse_event({"a": 1, "b": [1, 2]}) == b'data: {"a":1,"b":[1,2]}\n\n'
    assert sse.DONE == b"data: [DONE]\n\n"


def test_chat_sequence_role_goes_with_the_first_token():
    chunks = sse.ChunkBuilder("chatcmpl-1", 1700000000, "m", is_chat=True)
    assert not chunks.sent_first
    first = chunks.text("Hel")
    second = chunks.text("lo")
    last = chunks.finish("!", "stop")
    assert chunks.sent_first
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "Hel"},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert second["choices"][0]["delta"] == {"content": "lo"}
    assert last["choices"][0]["delta"] == {"content": "!"}
    assert last["choices"][0]["finish_reason"] == "stop"
    for chunk in (first, second, last):
        assert chunk["id"] == "chatcmpl-1" and chunk["created"] == 1700000000 and chunk["model"] == "m"
        assert chunk["object"] == "chat.completion.chunk"
        assert "usage" not in chunk


def test_terminal_chunk_without_text_has_an_empty_delta():
    chunks = sse.ChunkBuilder("chatcmpl-1", 1, "m", is_chat=True)
    chunks.text("x")
    assert chunks.finish("", "length")["choices"][0]["delta"] == {}


def test_usage_chunk_has_no_choices_and_cached_tokens():
    chunks = sse.ChunkBuilder("chatcmpl-1", 1, "m", is_chat=True)
    chunk = chunks.usage(sse.usage_body(10, 3, 8))
    assert chunk["choices"] == []
    assert chunk["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    assert chunk["id"] == "chatcmpl-1" and chunk["object"] == "chat.completion.chunk"


def test_continuous_usage_rides_on_content_chunks():
    chunks = sse.ChunkBuilder("cmpl-1", 1, "m", is_chat=False)
    assert chunks.text("a", sse.usage_body(5, 1))["usage"]["completion_tokens"] == 1


def test_completion_chunks():
    chunks = sse.ChunkBuilder("cmpl-1", 1, "m", is_chat=False)
    first = chunks.text("Once")
    last = chunks.finish("", "length")
    assert first["object"] == "text_completion"
    assert first["choices"] == [{"index": 0, "text": "Once", "logprobs": None, "finish_reason": None}]
    assert last["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}


def test_error_body_is_vllm_shaped():
    body = sse.error_body("bad", "BadRequestError", "n", 400)
    assert body == {"error": {"message": "bad", "type": "BadRequestError", "param": "n", "code": 400}}
    assert orjson.loads(sse.sse_event(body)[len(b"data: ") :]) == body


def test_non_streaming_bodies():
    usage = sse.usage_body(4, 2)
    chat = sse.chat_completion_body("chatcmpl-9", 2, "m", "hi", "stop", usage)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert chat["choices"][0]["finish_reason"] == "stop" and chat["usage"]["total_tokens"] == 6
    text = sse.completion_body("cmpl-9", 2, "m", "hi", "length", usage)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "hi"
