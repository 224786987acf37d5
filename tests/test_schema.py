"""server/schema.py: accepted shapes, every rejected field with its param, identity precedence."""

from __future__ import annotations

import pytest

from server.schema import (
    Message,
    RequestError,
    parse_chat_request,
    parse_completion_request,
    parse_identity,
)

USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return parse_chat_request({"messages": USER, **fields}, {})


def rejected(fields: dict, endpoint=parse_chat_request, headers=None) -> RequestError:
    body = {"messages": USER, "prompt": "x", **fields}
    with pytest.raises(RequestError) as info:
        endpoint(body, headers or {})
    assert info.value.status == 400 and info.value.type == "BadRequestError"
    return info.value


def test_minimal_chat_defaults():
    req = chat()
    assert req.messages == (Message("user", "hi"),)
    p = req.params
    assert (p.model, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (None, None, 1.0, 1.0, 0, 0.0)
    assert (p.stream, p.include_usage, p.stop, p.ignore_eos) == (False, False, (), False)
    assert (
        p.identity.tenant == "default" and p.identity.slo_class == "interactive" and p.identity.app_id == ""
    )


def test_content_parts_roles_and_unknown_fields():
    messages = [
        {"role": "developer", "content": "d"},
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        {"role": "user", "content": "q", "name": "bob"},
    ]
    req = parse_chat_request({"messages": messages, "frequency_penalty": 0.5, "whatever": {}}, {})
    assert [m.content for m in req.messages] == ["d", "a\nb", "", "42", "q"]
    assert req.messages[3].to_template_dict() == {"role": "tool", "content": "42", "tool_call_id": "call_1"}
    assert req.messages[4].name == "bob"


def test_sampling_fields_map_to_sampling_params():
    p = chat(
        max_tokens=7,
        temperature=0,
        top_p=0.5,
        top_k=-1,
        min_p=0.1,
        seed=3,
        stop_token_ids=[5],
        ignore_eos=True,
    ).params
    s = p.sampling(7)
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (7, 0.0, 0.5, 0, 0.1, 3)
    assert s.stop_token_ids == (5,) and s.ignore_eos and s.is_greedy


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=5, max_completion_tokens=9).params.max_tokens == 9
    assert chat(max_tokens=5).params.max_tokens == 5


def test_stop_forms():
    assert chat(stop="x").params.stop == ("x",)
    assert chat(stop=["a", "b", "a"]).params.stop == ("a", "b")
    assert chat(stop=None).params.stop == ()
    assert len(chat(stop=[str(i) for i in range(16)]).params.stop) == 16


def test_stream_options():
    p = chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}).params
    assert p.stream and p.include_usage and p.continuous_usage_stats


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.1}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"seed": 2**64}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": "5"}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"stream": 1}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "y"}}, "stream_options.include_usage"),
        ({"metadata": {"a": 1}}, "metadata"),
        ({"metadata": "x"}, "metadata"),
        ({"user": 5}, "user"),
        ({"model": 5}, "model"),
        ({"service_tier": "turbo"}, "service_tier"),
        ({"priority": "high"}, "priority"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_chat_rejections_name_the_param(fields, param):
    assert rejected(fields).param == param


def test_body_must_be_an_object():
    with pytest.raises(RequestError):
        parse_chat_request([1, 2], {})


# ---- completions -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, text, ids",
    [
        ("once", "once", None),
        (["once"], "once", None),
        ([1, 2, 3], None, (1, 2, 3)),
        ([[4, 5]], None, (4, 5)),
    ],
)
def test_completion_prompt_forms(prompt, text, ids):
    req = parse_completion_request({"prompt": prompt, "max_tokens": 3}, {})
    assert (req.prompt, req.prompt_token_ids) == (text, ids)
    assert req.params.max_tokens == 3


@pytest.mark.parametrize("prompt", [None, "", [], ["a", "b"], [[1], [2]], [1, "a"], [-1], 5, [True]])
def test_completion_prompt_rejections(prompt):
    assert rejected({"prompt": prompt}, parse_completion_request).param == "prompt"


def test_completion_logprobs_and_echo_rejected_but_zero_logprobs_fine():
    assert rejected({"logprobs": 2}, parse_completion_request).param == "logprobs"
    assert rejected({"echo": True}, parse_completion_request).param == "echo"
    assert parse_completion_request({"prompt": "x", "logprobs": None}, {}).params.max_tokens is None


# ---- identity ----------------------------------------------------------------------------------------


def test_tenant_precedence():
    body = {"user": "u", "metadata": {"tenant": "m"}}
    assert parse_identity(body, {"x-tenant-id": "h"}).tenant == "h"
    assert parse_identity(body, {}).tenant == "m"
    assert parse_identity({"user": "u"}, {}).tenant == "u"
    assert parse_identity({}, {}).tenant == "default"


def test_app_precedence():
    assert parse_identity({"metadata": {"app_id": "m"}}, {"x-app-id": "h"}).app_id == "h"
    assert parse_identity({"metadata": {"app_id": "m"}}, {}).app_id == "m"
    assert parse_identity({}, {}).app_id == ""


@pytest.mark.parametrize(
    "tier, slo_class",
    [
        ("flex", "batch"),
        ("batch", "batch"),
        ("auto", "interactive"),
        ("default", "interactive"),
        ("priority", "interactive"),
        ("scale", "interactive"),
        (None, "interactive"),
    ],
)
def test_service_tier_maps_to_slo_class(tier, slo_class):
    assert parse_identity({"service_tier": tier}, {}).slo_class == slo_class


def test_slo_header_wins_and_unknown_class_is_rejected():
    assert parse_identity({"service_tier": "flex"}, {"x-slo-class": "Interactive"}).slo_class == "interactive"
    assert parse_identity({}, {"x-slo-class": "batch"}).slo_class == "batch"
    error = rejected({}, headers={"x-slo-class": "platinum"})
    assert error.param == "X-SLO-Class"
    # A deployment may know more classes.
    custom = parse_identity({}, {"x-slo-class": "gold"}, slo_classes=("gold", "interactive"))
    assert custom.slo_class == "gold"


def test_priority_passes_through():
    assert parse_identity({"priority": -3}, {}).priority == -3
    assert parse_identity({}, {}).priority == 0


def test_app_shape_from_metadata():
    identity = parse_identity(
        {"metadata": {"app_id": "job-1", "app_type": "Map-Reduce", "app_num_requests": "17"}}, {}
    )
    assert (identity.app_id, identity.app_type, identity.app_num_requests) == ("job-1", "map-reduce", 17)
    assert (parse_identity({}, {}).app_type, parse_identity({}, {}).app_num_requests) == ("", 0)


@pytest.mark.parametrize(
    ("metadata", "param"),
    [
        ({"app_type": "pipeline"}, "metadata.app_type"),
        ({"app_num_requests": "0"}, "metadata.app_num_requests"),
        ({"app_num_requests": "-3"}, "metadata.app_num_requests"),
        ({"app_num_requests": "2.5"}, "metadata.app_num_requests"),
        ({"app_num_requests": "many"}, "metadata.app_num_requests"),
        ({"app_num_requests": "100001"}, "metadata.app_num_requests"),
    ],
)
def test_bad_app_shape_is_a_request_error(metadata, param):
    with pytest.raises(RequestError) as info:
        parse_identity({"metadata": metadata}, {})
    assert info.value.param == param and info.value.status == 400
