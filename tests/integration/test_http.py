"""The HTTP front door as a process in front of the whole stack: the official `openai` client, raw HTTP, metrics,
disconnects. The built-in random model: texts are arbitrary bytes, so assertions compare the model with itself."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.loadtest.launch import free_ports
from common.client import Client
from stack import ROOT, TINY_MODEL, Stack

MODEL = "tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def start_http(client_endpoint: str) -> tuple[subprocess.Popen, str]:
    port = free_ports(1)[0]
    args = [sys.executable, "-m", "services.cli", "http", "--log-level", "warning", "--set", TINY_MODEL,
            "--set", f"endpoints.client={client_endpoint}", "--set", f"endpoints.http=127.0.0.1:{port}"]
    return subprocess.Popen(args, cwd=ROOT), f"http://127.0.0.1:{port}"


def wait_listening(proc: subprocess.Popen, base: str, timeout: float = 60.0) -> httpx.Response:
    """Poll /health until the process answers at all; returns that answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the http process exited with {proc.returncode}"
        try:
            return httpx.get(f"{base}/health", timeout=10)
        except httpx.TransportError:
            time.sleep(0.05)  # a client's retry while the process starts, not a handshake
    raise AssertionError(f"{base} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture(scope="module")
def stack():
    s = Stack(["scheduler.policy=fcfs", "cache.swap=defer"])
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def base(stack):
    proc, url = start_http(stack.endpoint)
    try:
        assert wait_listening(proc, url).status_code == 200
        yield url
    finally:
        assert stop(proc) == 0


@pytest.fixture(scope="module")
def oai(base):
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def stack_stats(stack: Stack) -> dict:
    with Client(stack.endpoint, timeout=30) as client:
        return client.stats()


def wait_idle(stack: Stack, timeout: float = 30.0) -> dict:
    """Stats once no job is live and the KV pool is whole (frees reach the KV manager with the next batch)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = stack_stats(stack)
        if stats["jobs_live"] == 0 and stats["kv_free_blocks"] == stats["kv_total_blocks"]:
            return stats
        assert time.monotonic() < deadline, f"the stack is not idle after {timeout} s: {stats}"
        time.sleep(0.05)


def wait_cancelled(stack: Stack, count: int, which: str, timeout: float = 20.0) -> None:
    """Until the scheduler has cancelled `count` jobs in all; names the request whose cancel is missing."""
    deadline = time.monotonic() + timeout
    while (cancelled := stack_stats(stack)["jobs_cancelled"]) < count:
        assert time.monotonic() < deadline, f"{which}: its job was not cancelled ({cancelled} cancelled, {count} due)"
        time.sleep(0.05)


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def sse_events(raw: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing: every event is one `data: ` line."""
    assert raw.endswith("\n\n"), raw[-80:]
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


def test_models_and_health(base, oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert httpx.get(f"{base}/health", timeout=10).json() == {"status": "ready"}


def test_chat_completion_streamed_and_not(oai):
    full = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    choice = full.choices[0]
    assert (choice.message.role, choice.finish_reason) == ("assistant", "length")
    prompt = "system: Be brief.\nuser: Hi\nassistant:"  # the documented fallback template, one byte a token
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == \
        (len(prompt.encode()), 12, len(prompt.encode()) + 12)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same tokens either way
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stop_string_is_never_emitted_and_ends_the_job(oai, stack):
    reference = oai.completions.create(model=MODEL, prompt="Stop here:", max_tokens=48, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    # a two-character stop string first seen well inside the greedy output: with one byte per token it
    # always spans two chunks of the stream
    at = next((i for i in range(6, len(reference) - 2) if reference.find(reference[i:i + 2]) == i), None)
    assert at is not None, f"no usable stop string in {reference!r}"
    stop = reference[at:at + 2]
    before = stack_stats(stack)["jobs_cancelled"]
    full = oai.completions.create(model=MODEL, prompt="Stop here:", max_tokens=48, temperature=0, stop=[stop, "\0\0"],
                                  extra_body={"ignore_eos": True})
    assert (full.choices[0].text, full.choices[0].finish_reason) == (reference[:at], "stop")
    streamed = list(oai.completions.create(model=MODEL, prompt="Stop here:", max_tokens=48, temperature=0,
                                           stop=stop, stream=True, extra_body={"ignore_eos": True}))
    pieces = [c.choices[0].text for c in streamed]
    assert "".join(pieces) == reference[:at] and all(stop not in p for p in pieces)
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert wait_idle(stack)["jobs_cancelled"] >= before + 2  # both jobs ended on the match, not at max_tokens


def test_the_same_seed_gives_the_same_text(oai):
    def sample(seed: int) -> str:
        return oai.completions.create(model=MODEL, prompt=[65, 66, 67], max_tokens=16, temperature=1.0, seed=seed,
                                      extra_body={"ignore_eos": True}).choices[0].text

    assert sample(1234) == sample(1234)


def test_logprobs_from_the_last_stage_streamed_and_not(oai):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3,
                  extra_body={"ignore_eos": True})
    content = oai.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert len(content) == 10
    for token in content:
        top = [t.logprob for t in token.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and sum(math.exp(x) for x in top) <= 1 + 1e-6
        # greedy: the sampled token is the most likely one
        assert token.top_logprobs[0].bytes == token.bytes and token.logprob == pytest.approx(top[0], abs=1e-5)
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.bytes, round(t.logprob, 4)) for t in streamed] == [(t.bytes, round(t.logprob, 4)) for t in content]
    legacy = oai.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == 6 and all(lp <= 0 for lp in legacy.token_logprobs)
    assert legacy.top_logprobs == [{}] * 6
    assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:i]) for i in range(6)]


def test_openai_errors_for_bad_input(oai):
    cases = [
        (openai.BadRequestError, dict(n=2), "unsupported_parameter"),
        (openai.BadRequestError, dict(logprobs=True, top_logprobs=6), "unsupported_parameter"),
        (openai.BadRequestError, dict(max_tokens=10**6), "context_too_long"),
        (openai.BadRequestError, dict(extra_body={"frobnicate": 1}), "invalid_request"),
        (openai.BadRequestError, dict(temperature=-1), "invalid_request"),
        (openai.NotFoundError, dict(model="no-such-model"), "model_not_found"),
    ]
    for error, kwargs, code in cases:
        kwargs = {"model": MODEL, "messages": CHAT, "max_tokens": 4, **kwargs}
        with pytest.raises(error) as caught:
            oai.chat.completions.create(**kwargs)
        assert caught.value.code == code, (kwargs, caught.value.body)
        assert caught.value.message


def test_sse_framing_and_done(base):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 5, "temperature": 0, "stream": True, "ignore_eos": True}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage


def test_raw_bad_requests_get_4xx_with_a_message_and_the_next_request_is_served(base):
    chat = f"{base}/v1/chat/completions"
    cases = [
        (chat, b'{"messages": [', 400),  # malformed JSON
        (chat, json.dumps({"messages": CHAT, "max_tokens": "5"}).encode(), 400),  # a string for an integer
        (chat, json.dumps({"messages": "Hi"}).encode(), 400),  # a string for the message list
        (chat, json.dumps({"max_tokens": 5}).encode(), 400),  # no messages
        (chat, json.dumps({"messages": CHAT, "max_tokens": -3}).encode(), 400),
        (chat, json.dumps({"messages": CHAT, "stream_options": {"include_usage": True}}).encode(), 400),
        (f"{base}/v1/completions", json.dumps({"prompt": [1, True]}).encode(), 400),  # a bool is no token id
        (f"{base}/v1/completions", json.dumps({"prompt": "x" * (2 << 20)}).encode(), 413),  # over 1 MiB
        # under 1 MiB but past the context: refused here (sent, it would cost the front door its connection)
        (f"{base}/v1/completions", json.dumps({"prompt": "x" * 500_000}).encode(), 400),
    ]
    for url, content, status in cases:
        response = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code == status, (content[:80], response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"] and error["code"], error
    response = httpx.post(chat, json={"messages": CHAT, "max_tokens": 3}, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1


def test_metrics_move_after_requests(base, oai):
    before = httpx.get(f"{base}/metrics", timeout=30).text
    oai.completions.create(model=MODEL, prompt="metrics", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    list(oai.completions.create(model=MODEL, prompt="metrics", max_tokens=6, temperature=0, stream=True,
                                extra_body={"ignore_eos": True}))
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt="metrics", max_tokens=4, n=3)
    after = httpx.get(f"{base}/metrics", timeout=30).text

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("fastserve:request_success_total", finished_reason="length") == 2
    assert moved("fastserve:request_errors_total", code="unsupported_parameter") == 1
    assert moved("fastserve:generation_tokens_total") == 12
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert moved(f"fastserve:{histogram}_count") == 2
        assert moved(f"fastserve:{histogram}_sum") > 0
    assert moved("fastserve:inter_token_latency_seconds_count") >= 2  # gaps between token events
    assert metric(after, "fastserve:stack_up") == 1
    assert metric(after, "fastserve:kv_total_blocks") > 0
    assert moved("fastserve:ingress_requests_accepted_total") == 2


def test_job_gauges_move_while_a_request_runs(base, stack):
    wait_idle(stack)
    gauges = ("num_requests_running", "num_requests_waiting", "num_requests_preempted", "num_requests_held",
              "num_requests_swapped")

    def read() -> dict[str, float]:
        text = httpx.get(f"{base}/metrics", timeout=30).text
        shown = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert all(f"fastserve:{g}" in shown for g in gauges), sorted(shown)
        return {g: shown[f"fastserve:{g}"] for g in gauges}

    assert set(read().values()) == {0}
    body = {"prompt": "gauges", "max_tokens": 150, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base}/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            while not next(lines).startswith("data: "):
                pass  # the first token is out: the job runs
            during = read()  # 150 tokens take far longer than one scrape
            rest = list(lines)
    assert "data: [DONE]" in rest, rest[-3:]
    assert during == {"num_requests_running": 1, "num_requests_waiting": 0, "num_requests_preempted": 0,
                      "num_requests_held": 0, "num_requests_swapped": 0}
    wait_idle(stack)
    assert set(read().values()) == {0}


@pytest.mark.xfail(strict=False, reason="known race: run after other tests, about one run in two leaves one of the "
                   "two disconnected requests uncancelled (docs/HTTP.md, Known limits)")
def test_disconnecting_cancels_the_job_and_the_kv_pool_is_whole(base, stack):
    before = wait_idle(stack)["jobs_cancelled"]
    body = {"prompt": "a long one", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: ")
                if seen >= 5:
                    break  # leaving the block closes the connection mid-stream
    wait_cancelled(stack, before + 1, "the streamed request")
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming request whose client gives up
        httpx.post(f"{base}/v1/completions", json=body, timeout=1.0)
    wait_cancelled(stack, before + 2, "the non-streamed request")
    stats = wait_idle(stack, timeout=20)  # 2000 tokens would take far longer than this
    assert stats["jobs_cancelled"] == before + 2
    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    assert metric(metrics, "fastserve:request_success_total", finished_reason="abort") >= 2


def test_health_is_503_while_ingress_does_not_answer():
    dead = f"tcp://127.0.0.1:{free_ports(1)[0]}"  # nothing listens: stats queries go unanswered
    proc, url = start_http(dead)
    try:
        response = wait_listening(proc, url)
        assert response.status_code == 503 and response.json()["error"]["code"] == "timeout"
    finally:
        assert stop(proc) == 0
