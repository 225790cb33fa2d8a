"""`nanokv serve` over HTTP, on the tiny Llama: the official openai client against a real uvicorn
server on a free loopback port. Greedy text through the server is what `LLM.generate` / `chat`
gives; streamed chunks add up to the whole text; concurrent requests give what sequential ones
give; a client that goes away frees its KV memory; bad input gets an OpenAI-shaped 4xx and the
server keeps serving."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from nanokv.cli import main
from nanokv.llm import LLM
from nanokv.pool import KVPool
from nanokv.scheduler import Scheduler
from nanokv.serve import ServerThread, build_app, start_server
from nanokv.serve.server import ServerHandle, kv_bytes_for_tokens

MODEL = "tiny-llama"  # the name the test servers answer to
MIN_CACHE = 16  # small, so that kv_budget=0.5 of a 100-token prompt really evicts
MAX_BODY = 1 << 16
NEW_TOKENS = 12
PROMPTS = [
    "the quick brown fox",
    "hello world, a kv cache test",
    "the lazy dog jumps over",
    "a kv cache",
    "brown fox, hello",
    "over the lazy dog the quick",
    "world test",
    "jumps over the quick brown fox and the lazy dog",
]
LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 10  # ~100 tokens


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(tiny_llama_dir, dtype="float32", device="cpu", min_cache=MIN_CACHE)


@pytest.fixture(scope="module")
def server(llm: LLM) -> Iterator[ServerHandle]:
    options = {"kv_memory_bytes": 64 << 20, "max_body_bytes": MAX_BODY, "model_name": MODEL}
    with start_server(llm, **options) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=30)


def complete(client: openai.OpenAI, prompt: str, model: str = MODEL, **options):
    options = {"max_tokens": NEW_TOKENS, "temperature": 0, **options}
    return client.completions.create(model=model, prompt=prompt, **options)


def chat(client: openai.OpenAI, text: str, model: str = MODEL, **options):
    options = {"max_tokens": NEW_TOKENS, "temperature": 0, **options}
    messages = [{"role": "user", "content": text}]
    return client.chat.completions.create(model=model, messages=messages, **options)


def stats(server: ServerHandle) -> dict:
    return httpx.get(f"{server.url}/stats").json()


def wait_idle(server: ServerHandle, timeout: float = 10.0) -> dict:
    """/stats once nothing runs, waits or holds pool pages (fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        now = stats(server)
        idle = now["running"] == now["prefilling"] == now["waiting"] == 0
        if idle and now["pool_used_bytes"] == 0:
            return now
        assert time.monotonic() < deadline, f"the server is not idle: {now}"
        time.sleep(0.02)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param


# --- the happy paths ------------------------------------------------------------------------


def test_health_and_models(server: ServerHandle, client: openai.OpenAI):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_is_what_llm_generate_gives(server: ServerHandle, client: openai.OpenAI):
    response = complete(client, PROMPTS[0])
    (want,) = server.llm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
    choice = response.choices[0]
    assert choice.text == want.text and choice.finish_reason == want.finish_reason == "length"
    prompt_tokens = len(server.llm.tokenizer.encode(PROMPTS[0]))
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == NEW_TOKENS
    assert response.usage.total_tokens == prompt_tokens + NEW_TOKENS
    assert response.object == "text_completion" and response.model == MODEL


def test_chat_is_what_llm_chat_gives(server: ServerHandle, client: openai.OpenAI):
    response = chat(client, "hello world")
    (want,) = server.llm.chat("hello world", max_new_tokens=NEW_TOKENS)
    message = response.choices[0].message
    assert message.role == "assistant" and message.content == want.text
    assert response.choices[0].finish_reason == want.finish_reason
    assert response.usage.prompt_tokens == len(want.prompt_token_ids)
    assert response.object == "chat.completion"


def test_stop_strings_and_ignore_eos(server: ServerHandle, client: openai.OpenAI):
    """'kv' meets EOS within 16 greedy tokens: `ignore_eos` runs past it, as LLM.generate does."""
    (ends,) = server.llm.generate("kv", max_new_tokens=16)
    assert ends.finish_reason == "stop" and len(ends.token_ids) < 16
    assert complete(client, "kv", max_tokens=16).choices[0].text == ends.text
    (longer,) = server.llm.generate("kv", max_new_tokens=16, ignore_eos=True)
    response = complete(client, "kv", max_tokens=16, extra_body={"ignore_eos": True})
    assert response.choices[0].text == longer.text and response.usage.completion_tokens == 16
    (whole,) = server.llm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
    stop = whole.text[3:5]
    (cut,) = server.llm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, stop=[stop])
    assert cut.finish_reason == "stop" and len(cut.text) < len(whole.text)
    response = complete(client, PROMPTS[0], stop=stop)
    assert response.choices[0].text == cut.text and response.choices[0].finish_reason == "stop"


def test_streamed_completion_adds_up_to_the_whole(client: openai.OpenAI):
    whole = complete(client, PROMPTS[1])
    chunks = list(complete(client, PROMPTS[1], stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streamed_chat_starts_with_the_role_and_adds_up(client: openai.OpenAI):
    whole = chat(client, "a kv cache")
    chunks = list(chat(client, "a kv cache", stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    plain = list(chat(client, "a kv cache", stream=True))  # no include_usage: no usage chunk
    assert all(c.choices and c.usage is None for c in plain)


def test_stream_ends_with_done(server: ServerHandle):
    body = {"prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0, "stream": True}
    response = httpx.post(f"{server.url}/v1/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_concurrent_requests_give_the_sequential_texts(server: ServerHandle, client):
    sequential = [complete(client, p).choices[0].text for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(pool.map(lambda p: complete(client, p).choices[0].text, PROMPTS))
    assert concurrent == sequential
    assert stats(server)["peak_admitted"] > 1  # they did share decode steps


def test_per_request_kv_policy_and_budget(server: ServerHandle, client: openai.OpenAI, llm):
    kv = {"kv_policy": "snapkv", "kv_budget": 0.5}
    response = complete(client, LONG_PROMPT, extra_body=kv)
    reference = LLM(
        llm.model_dir, policy="snapkv", budget=0.5, min_cache=llm.min_cache, dtype="float32",
        device="cpu",
    )  # fmt: skip
    (want,) = reference.generate(LONG_PROMPT, max_new_tokens=NEW_TOKENS)
    assert response.choices[0].text == want.text
    (full,) = llm.generate(LONG_PROMPT, max_new_tokens=NEW_TOKENS)
    assert want.text != full.text  # the budget did evict: the request took its own policy
    with start_server(llm, policy="snapkv", budget=0.5, model_name=MODEL) as snap:
        default = openai.OpenAI(base_url=snap.base_url, api_key="unused", max_retries=0)
        assert complete(default, LONG_PROMPT).choices[0].text == want.text
    with pytest.raises(ValueError, match="unknown policy"):
        start_server(llm, policy="lru", kv_memory_bytes=16 << 20)


def test_a_kv_budget_alone_runs_the_default_eviction_policy(server: ServerHandle, client, llm):
    """The full-cache server given kv_budget without kv_policy compresses with LaProx, as
    `nanokv generate --budget` does, instead of keeping every token."""
    response = complete(client, LONG_PROMPT, extra_body={"kv_budget": 0.5})
    named = complete(client, LONG_PROMPT, extra_body={"kv_policy": "laprox", "kv_budget": 0.5})
    assert response.choices[0].text == named.choices[0].text
    (full,) = llm.generate(LONG_PROMPT, max_new_tokens=NEW_TOKENS)
    assert response.choices[0].text != full.text


def test_a_client_that_disconnects_frees_its_memory(server: ServerHandle, llm: LLM):
    prompt, new_tokens = PROMPTS[3], 240
    before = wait_idle(server)
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    with (
        httpx.Client() as http,
        http.stream("POST", f"{server.url}/v1/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    after = wait_idle(server)
    assert after["generated_tokens"] - before["generated_tokens"] < new_tokens
    (alone,) = llm.generate(prompt, max_new_tokens=new_tokens)
    assert alone.finish_reason == "length"  # it would have run on: the disconnect stopped it


# --- bad input: an OpenAI-shaped 4xx, and the server keeps serving -------------------------

LONG = "the quick brown fox " * 100  # ~400 tokens: past the tiny model's 256-token context
BAD_REQUESTS = {
    "malformed JSON": ("completions", b'{"prompt": "x",', 400, None),
    "not an object": ("completions", [1, 2], 400, None),
    "no prompt": ("completions", {"max_tokens": 2}, 400, "prompt"),
    "two prompts": ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    "unknown model": ("completions", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
    "max_tokens 0": ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens -3": ("chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                           "max_tokens": -3}, 400, "max_tokens"),
    "n 2": ("completions", {"prompt": "x", "n": 2}, 400, "n"),
    "kv_budget 0": ("completions", {"prompt": "x", "kv_budget": 0}, 400, "kv_budget"),
    "kv_budget 2.5": ("completions", {"prompt": "x", "kv_policy": "snapkv", "kv_budget": 2.5},
                      400, "kv_budget"),
    "kv_budget string": ("completions", {"prompt": "x", "kv_budget": "half"}, 400, "kv_budget"),
    "kv_budget on full": ("completions", {"prompt": "x", "kv_policy": "full", "kv_budget": 0.5},
                          400, "kv_budget"),
    "kv_policy unknown": ("completions", {"prompt": "x", "kv_policy": "lru"}, 400, "kv_policy"),
    "kv_policy quest": ("completions", {"prompt": "x", "kv_policy": "quest"}, 400, "kv_policy"),
    "temperature -1": ("completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    "empty stop": ("completions", {"prompt": "x", "stop": [""]}, 400, None),
    "empty prompt": ("completions", {"prompt": ""}, 400, None),
    "token id past vocab": ("completions", {"prompt": [1, 99999]}, 400, "prompt"),
    "prompt past context": ("completions", {"prompt": LONG}, 400, None),
    "max_tokens past context": ("completions", {"prompt": "x", "max_tokens": 1000}, 400, None),
    "no messages": ("chat/completions", {"messages": []}, 400, "messages"),
    "image content": ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None),
    "body past the limit": ("completions", b"x" * (MAX_BODY + 1), 413, None),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_input_gets_an_openai_error(server: ServerHandle, client: openai.OpenAI, case: str):
    route, body, status, param = BAD_REQUESTS[case]
    url = f"{server.url}/v1/{route}"
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(url, json=body)
    assert_openai_error(response, status, param)
    assert complete(client, "hello", max_tokens=2).choices[0].text is not None


def test_a_chunked_body_past_the_limit_is_refused(server: ServerHandle, client: openai.OpenAI):
    chunks = iter([b'{"prompt": "'] + [b"x" * 8192] * (MAX_BODY // 8192 + 1) + [b'"}'])
    response = httpx.post(f"{server.url}/v1/completions", content=chunks)
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413)
    assert complete(client, "hello", max_tokens=2).choices


def test_the_openai_client_reads_the_errors(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        complete(client, "x", extra_body={"kv_policy": "lru"})
    assert bad.value.param == "kv_policy"


def test_unknown_routes_and_methods_are_openai_shaped(server: ServerHandle):
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404)
    assert_openai_error(httpx.get(f"{server.url}/v1/completions"), 405)


# --- servers with their own settings --------------------------------------------------------


def test_the_api_key_guards_v1_only(llm: LLM):
    with start_server(llm, kv_memory_bytes=16 << 20, api_key="sekret", model_name=MODEL) as keyed:
        for key in (None, "wrong"):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            response = httpx.get(f"{keyed.base_url}/models", headers=headers)
            assert_openai_error(response, 401)
        with pytest.raises(openai.AuthenticationError):
            opened = openai.OpenAI(base_url=keyed.base_url, api_key="wrong", max_retries=0)
            opened.models.list()
        good = openai.OpenAI(base_url=keyed.base_url, api_key="sekret", max_retries=0)
        assert complete(good, "hello", max_tokens=2).choices
        assert httpx.get(f"{keyed.url}/health").status_code == 200


def test_a_full_queue_is_503_and_a_request_that_never_fits_is_400(llm: LLM):
    """One request may wait: with the scheduler not yet stepping, the first waits, the second is
    refused with 503 and Retry-After; once it steps, the first runs and the server serves. The
    pool holds 128 tokens of cache: a request for 200 new tokens can never fit it."""
    scheduler = Scheduler(llm, KVPool(kv_bytes_for_tokens(llm, 128)), max_waiting=1)
    thread = ServerThread(build_app(llm, scheduler, model_name=MODEL)).start()
    url = f"{thread.url}/v1/completions"
    try:
        assert_openai_error(httpx.post(url, json={"prompt": "x", "max_tokens": 200}), 400)
        body = {"prompt": "hello", "max_tokens": 4, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as http, http.stream("POST", url, json=body) as first:
            assert scheduler.stats().waiting == 1
            refused = http.post(url, json={**body, "stream": False})
            assert_openai_error(refused, 503)
            assert int(refused.headers["retry-after"]) >= 1
            scheduler.start()
            assert "data: [DONE]" in list(first.iter_lines())
        served = httpx.post(url, json={**body, "stream": False}, timeout=30)
        assert served.json()["choices"][0]["finish_reason"] == "length"
    finally:
        thread.stop()
        scheduler.stop()


def test_health_is_503_until_the_model_is_attached(llm: LLM, server: ServerHandle):
    app = build_app(None, None, model_name="loading")
    thread = ServerThread(app).start()
    try:
        assert httpx.get(f"{thread.url}/health").status_code == 503
        response = httpx.post(f"{thread.url}/v1/completions", json={"prompt": "x"})
        assert_openai_error(response, 503)
        app.state.nanokv.attach(llm, server.scheduler)
        assert httpx.get(f"{thread.url}/health").status_code == 200
    finally:
        thread.stop()


# --- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--kv-memory", "lots"],
        ["--max-kv-tokens", "0"],
        ["--port", "70000"],
        ["--policy", "snapkv+quest"],
        ["--policy", "full", "--budget", "0.5"],
        ["--max-waiting", "0"],
        ["--max-body", "big"],
        ["--prefill-share", "1"],
    ],
)
def test_serve_refuses_bad_flags_in_one_line(flags: list[str], capsys):
    assert main(["serve", *flags]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nanokv: error: ")


def wait_or_dump_threads(process: subprocess.Popen, timeout: float) -> int:
    """The process's exit code; if it has not exited within `timeout` seconds, fails with the
    stack of each of its threads (SIGABRT makes Python's fault handler print them)."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, err = process.communicate(timeout=10)
        pytest.fail(f"the process did not exit within {timeout} s; its threads:\n{err[-8000:]}")


def test_serve_command_serves_until_ctrl_c(tiny_llama_dir: Path):
    command = [
        sys.executable, "-m", "nanokv.cli", "serve", "--model", str(tiny_llama_dir), "--port", "0",
        "--dtype", "float32", "--kv-dtype", "bfloat16", "--device", "cpu", "--max-kv-tokens",
        "512", "--prefill-share", "0.25",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(60, process.kill)  # a hung server ends the test, not the run
    watchdog.start()
    try:
        lines = iter(process.stderr.readline, "")
        ready = re.compile(r"(http://\S+)/v1 model=(\S+) policy=full budget=1 kv-dtype=bfloat16")
        match = next((m for m in map(ready.search, lines) if m), None)
        assert match, "nanokv serve exited before it was ready"
        assert httpx.get(f"{match.group(1)}/health").status_code == 200
        client = openai.OpenAI(base_url=f"{match.group(1)}/v1", api_key="x", max_retries=0)
        assert complete(client, "hello", model=match.group(2), max_tokens=2).choices
        process.send_signal(signal.SIGINT)
        assert wait_or_dump_threads(process, timeout=20) == 0
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
