"""The HTTP app in process around a fake ingress client: status codes, defaults, stop strings, mid-stream errors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.client import InternalError, Overloaded, RequestTimeout, Unavailable
from common.protocol import FinishEvent, TokenEvent, TokenLogprobs
from services.http.app import create_app
from services.http.chat import ChatTemplate
from services.http.front import FrontDoor, PromptEncoder, ServedModel
from services.http.metrics import Metrics


class FakeClient:
    """Plays AsyncClient: each stream() answers with the next script (events, or an exception to raise)."""

    def __init__(self) -> None:
        self.scripts: list[list[Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.cancelled: list[str] = []
        self.stats_error: Exception | None = None
        self.stats_values: dict[str, int | float] = {"kv_free_blocks": 10, "kv_total_blocks": 10, "jobs_live": 3,
                                                     "jobs_level_0": 1, "jobs_level_3": 2}

    def stream(self, prompt: str | None = None, **params: Any):
        self.requests.append(params)
        script = self.scripts.pop(0) if self.scripts else [FinishEvent(params["request_id"], "length", [1], "x", 1, 1)]

        async def events():
            for item in script:
                await asyncio.sleep(0)
                if isinstance(item, Exception):
                    raise item
                yield item

        return events()

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def stats(self, timeout: float | None = None) -> dict[str, int | float]:
        if self.stats_error is not None:
            raise self.stats_error
        return dict(self.stats_values)

    async def close(self) -> None:
        pass


def tokens(*texts: str) -> list[TokenEvent]:
    return [TokenEvent("r", [ord(t[0]) if t else 0] * max(1, len(t)), t) for t in texts]


@pytest.fixture
async def app_client():
    fake = FakeClient()
    front = FrontDoor(fake, ServedModel("tiny", 64, 0), PromptEncoder.for_model("tiny"), ChatTemplate.fallback(),
                      Metrics(), default_max_tokens=16, max_body_bytes=4096)
    transport = httpx.ASGITransport(app=create_app(front))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10) as http:
        yield http, fake


async def test_stack_errors_map_to_http_statuses(app_client):
    http, fake = app_client
    for error, status in [(Overloaded("full"), 429), (Unavailable("starting"), 503), (InternalError("died"), 500),
                          (RequestTimeout("slow"), 504)]:
        fake.scripts.append([error])
        response = await http.post("/v1/completions", json={"prompt": "hi"})
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == error.code
        assert response.json()["error"]["message"] == error.message


async def test_default_max_tokens_is_the_context_left_capped(app_client):
    http, fake = app_client
    await http.post("/v1/completions", json={"prompt": "abcd"})
    await http.post("/v1/completions", json={"prompt": "a" * 60})
    assert [r["max_tokens"] for r in fake.requests] == [16, 4]  # min(default 16, 64 - prompt)
    assert fake.requests[0]["prompt_ids"] == list(b"abcd") and fake.requests[0]["temperature"] == 1.0
    response = await http.post("/v1/completions", json={"prompt": "a" * 64})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_too_long"


async def test_stop_strings_go_to_the_stack_and_its_stop_is_the_finish_reason(app_client):
    http, fake = app_client
    fake.scripts.append([*tokens("ab", "c"), FinishEvent("r", "stop", [60, 47], "", 3, 5)])  # ingress matched "</"
    response = await http.post("/v1/completions", json={"prompt": "hi", "stop": ["</", "never"]})
    choice = response.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["logprobs"]) == ("abc", "stop", None)
    assert fake.requests[0]["stop"] == ["</", "never"] and fake.requests[0]["logprobs"] is None
    assert response.json()["usage"]["completion_tokens"] == 5 and fake.cancelled == []


def entry(token: int, logprob: float, k: int = 2) -> TokenLogprobs:
    """What the stack sends for a token: its logprob and k alternatives (itself first, then the next id)."""
    return TokenLogprobs(logprob, [token, token + 1][:k], [logprob, logprob - 1.0][:k])


async def test_completion_logprobs_in_openais_legacy_shape(app_client):
    http, fake = app_client
    fake.scripts.append([TokenEvent("r", [104, 105], "hi", [entry(104, -0.5), entry(105, -0.25)]),
                         FinishEvent("r", "length", [33], "!", 2, 3, [entry(33, -1.5)])])
    response = await http.post("/v1/completions", json={"prompt": "x", "logprobs": 2, "max_tokens": 3})
    assert fake.requests[0]["logprobs"] == 2
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs == {"tokens": ["h", "i", "!"], "token_logprobs": [-0.5, -0.25, -1.5],
                        "top_logprobs": [{"h": -0.5, "i": -1.5}, {"i": -0.25, "j": -1.25}, {"!": -1.5, '"': -2.5}],
                        "text_offset": [0, 1, 2]}
    response = await http.post("/v1/completions", json={"prompt": "x", "logprobs": 6})
    assert response.status_code == 400


async def test_streamed_chat_logprobs_come_with_their_chunks(app_client):
    http, fake = app_client
    fake.scripts.append([TokenEvent("r", [0xC3], "", [entry(0xC3, -0.1, 1)]),  # half a character: no text yet
                         TokenEvent("r", [0xA9], "\u00e9", [entry(0xA9, -0.2, 1)]), FinishEvent("r", "length", [], "", 2, 2)])
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True, "logprobs": True, "top_logprobs": 1}
    response = await http.post("/v1/chat/completions", json=body)
    chunks = [json.loads(e.removeprefix("data: ")) for e in response.text.strip().split("\n\n")[:-1]]
    content = [c["choices"][0]["logprobs"]["content"] for c in chunks if c["choices"][0]["logprobs"]]
    assert content == [[{"token": "\ufffd", "logprob": -0.1, "bytes": [0xC3],
                         "top_logprobs": [{"token": "\ufffd", "logprob": -0.1, "bytes": [0xC3]}]}],
                       [{"token": "\ufffd", "logprob": -0.2, "bytes": [0xA9],
                         "top_logprobs": [{"token": "\ufffd", "logprob": -0.2, "bytes": [0xA9]}]}]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "\u00e9"
    assert fake.requests[0]["logprobs"] == 1
    for bad in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 6}):
        response = await http.post("/v1/chat/completions", json={"messages": body["messages"], **bad})
        assert response.status_code == 400, bad


async def test_a_failure_mid_stream_is_an_error_event_then_done(app_client):
    http, fake = app_client
    fake.scripts.append([*tokens("a", "b"), InternalError("a worker died")])
    response = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "stream": True})
    assert response.status_code == 200
    events = [e.removeprefix("data: ") for e in response.text.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "internal"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "ab"


async def test_job_gauges_follow_the_stacks_stats(app_client):
    http, fake = app_client

    async def gauges() -> dict[str, float]:
        text = (await http.get("/metrics")).text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name.startswith("fastserve:num_requests_") and not s.labels}

    names = {"num_requests_running": "jobs_running", "num_requests_waiting": "jobs_waiting",
             "num_requests_preempted": "jobs_preempted", "num_requests_held": "jobs_held",
             "num_requests_swapped": "jobs_swapped"}
    assert not set(await gauges()) & {f"fastserve:{n}" for n in names}  # absent from the stats: not shown
    for step in (1, 2):
        fake.stats_values.update({key: step * k for k, key in enumerate(names.values(), 1)})
        shown = await gauges()
        assert {n: shown[f"fastserve:{n}"] for n in names} == {n: step * k for k, n in enumerate(names, 1)}


async def test_health_models_unknown_routes_and_body_limit(app_client):
    http, fake = app_client
    assert (await http.get("/health")).status_code == 200
    metrics = (await http.get("/metrics")).text
    assert 'fastserve:num_requests_by_level{level="0"} 1.0' in metrics
    assert 'fastserve:num_requests_by_level{level="3"} 2.0' in metrics
    fake.stats_error = Unavailable("starting")
    response = await http.get("/health")
    assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
    assert (await http.get("/v1/models")).json()["data"][0]["id"] == "tiny"
    response = await http.post("/v1/completions", json={"prompt": "hi", "model": "other"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert (await http.get("/v1/nothing")).json()["error"]["code"] == "not_found"
    response = await http.post("/v1/completions", json={"prompt": "x" * 5000})
    assert response.status_code == 413 and fake.requests == []

    async def chunked():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000

    response = await http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert fake.requests == []
    metrics = (await http.get("/metrics")).text
    assert "fastserve:stack_up 0.0" in metrics and 'fastserve:request_errors_total{code="model_not_found"} 1.0' in metrics
