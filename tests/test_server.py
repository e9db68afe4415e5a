"""`dejavu serve` as real server processes on loopback, with the real default model (SmolLM2).

Two servers start once for the module, side by side:
  main   dense, batch up to 8, API key from the DEJAVU_API_KEY environment variable, --test-faults
  tight  sparse (gate-first MLP, untrained head predictors: `--predictors synthetic`) with the run-time
         guard checking every 2nd step (never tripping), batch 1, a queue of one, 4 s request timeout,
         API key from --api-key
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

MODEL = "smollm2-135m"
LONG = {"ignore_eos": True}  # requests that must run long: sampled text may end at once (p(EOS) ~ 0.2 here)
KEY, TIGHT_KEY = "main-test-key", "tight-test-key"
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The first president of the United States",
           "Once upon a time, in a small village,", "The chemical symbol for gold is", "def fibonacci(n):",
           "The largest planet in the solar system is", "In 1492, Columbus"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], log, env=None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dejavu", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc, url, log_path, timeout=240):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{open(log_path).read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server did not come up in {timeout} s:\n{open(log_path).read()}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    logs = {name: open(d / f"{name}.log", "w") for name in ("main", "tight")}
    main = launch(["--batch-size", "8", "--test-faults"], logs["main"], env={"DEJAVU_API_KEY": KEY})
    tight = launch(["--predictors", "synthetic", "--guard", "--check-every", "2", "--min-agreement", "0",
                    "--batch-size", "1", "--max-queue", "1", "--request-timeout", "4",
                    "--api-key", TIGHT_KEY], logs["tight"])
    try:
        for name, (proc, url) in (("main", main), ("tight", tight)):
            wait_ready(proc, url, d / f"{name}.log")
        yield {"main": main[1], "tight": tight[1]}
    finally:
        for proc, _ in (main, tight):
            proc.terminate()
            proc.wait(timeout=30)
        for f in logs.values():
            f.close()
        for name in logs:  # a traceback in a server log is a bug even when every answer looked right
            text = (d / f"{name}.log").read_text()
            assert "Traceback" not in text or "test fault" in text, text


def client(url, key=KEY, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, **kw)


def metric(url, name, key=KEY) -> float:
    """One sample from /metrics, e.g. 'dejavu_running_requests' or 'x{reason="timeout"}' (0 if absent)."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def batched_steps(url) -> float:
    """Decode steps that ran more than 4 requests together."""
    return metric(url, "dejavu_decode_batch_rows_count") - metric(url, 'dejavu_decode_batch_rows_bucket{le="4.0"}')


def greedy(c, prompt, n=12):
    return c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0).choices[0].text


@pytest.fixture(scope="module")
def single(servers):
    """Each prompt's greedy continuation, requested alone (one request at a time)."""
    c = client(servers["main"])
    return {p: greedy(c, p) for p in PROMPTS}


def test_openai_client_completes_chats_and_streams(servers, single):
    c = client(servers["main"])
    assert [m.id for m in c.models.list().data] == [MODEL]
    r = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert "Paris" in r.choices[0].text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == 5
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True))
    assert streamed == r.choices[0].text == single["The capital of France is"]

    ask = [{"role": "user", "content": "What is the capital of France?"}]
    chat = c.chat.completions.create(model=MODEL, messages=ask, max_tokens=30, temperature=0)
    answer = chat.choices[0].message.content
    assert "Paris" in answer and chat.choices[0].finish_reason == "stop"  # ended by the template's <|im_end|>
    chunks = list(c.chat.completions.create(model=MODEL, messages=ask, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == answer
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    sampled = c.completions.create(model=MODEL, prompt="Once", max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    again = c.completions.create(model=MODEL, prompt="Once", max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    assert sampled.choices[0].text == again.choices[0].text  # a seed makes sampling repeatable
    cut = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                               stop=["."])
    assert cut.choices[0].text == single["The capital of France is"].split(".")[0]
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_streaming_clients_each_get_their_own_continuation(servers, single):
    """A bounded load test: 16 clients at once, 2 streaming requests each; no errors, and every
    answer is its own prompt's greedy continuation as requested alone (nothing lost or mixed up)."""
    url = servers["main"]
    tokens_before, batched_before = metric(url, "dejavu_generated_tokens_total"), batched_steps(url)

    def one_client(i):
        c, out = client(url), []
        for k in range(2):
            p = PROMPTS[(i + k) % len(PROMPTS)]
            t = time.monotonic()
            text = "".join(ch.choices[0].text for ch in c.completions.create(
                model=MODEL, prompt=p, max_tokens=12, temperature=0, stream=True))
            out.append((p, text, time.monotonic() - t))
        return out

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(one_client, range(16)) for r in rs]
    wall = time.monotonic() - t0
    assert len(results) == 32
    for p, text, _ in results:
        assert text == single[p], p
    lat = sorted(r[2] for r in results)
    generated = metric(url, "dejavu_generated_tokens_total") - tokens_before
    print(f"\n32 streaming requests from 16 clients in {wall:.1f} s: p50 {statistics.median(lat):.2f} s, "
          f"p99 {lat[int(0.99 * (len(lat) - 1))]:.2f} s, {generated / wall:.1f} tokens/s")
    assert generated == 32 * 12
    assert batched_steps(url) > batched_before  # the requests really were decoded together
    assert metric(url, 'dejavu_requests_total{route="/v1/completions",status="500"}') == 0


BAD = [  # body (dict, or raw text), status, what the message must name
    ("{not json", 400, "not valid JSON"),
    (dict(prompt="Hi", foo=1), 400, "unknown field 'foo'"),
    (dict(prompt="Hi", max_tokens=0), 400, "max_tokens"),
    (dict(prompt="Hi", max_tokens=100000), 400, "max_tokens 100000 exceeds"),
    (dict(prompt="Hi", temperature=2.5), 400, "temperature"),
    (dict(prompt="Hi", temperature=-1), 400, "temperature"),
    (dict(prompt="Hi", top_p=0), 400, "top_p"),
    (dict(prompt="Hi", n=2), 400, "n:"),
    (dict(prompt="Hi", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (dict(max_tokens=4), 400, "missing field 'prompt'"),
    (dict(prompt=""), 400, "prompt is empty"),
    (dict(prompt="hello " * 9000), 400, "context is 8192 tokens"),
    (dict(prompt="hello " * 8100, max_tokens=500), 400, "left in the model's context"),
    (dict(prompt="Hi", model="gpt-4"), 404, "not served here"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
    (dict(messages=[]), 400, "messages"),
    (dict(messages=[{"role": "user", "content": "hi", "extra": 1}]), 400, "unknown field 'messages.0.extra'"),
]


def test_malformed_requests_get_a_4xx_that_names_the_problem(servers):
    url, headers = servers["main"], {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, status, words in BAD:
        route = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        data = body if isinstance(body, str) else json.dumps({"model": MODEL, **body})
        r = httpx.post(url + route, content=data, headers=headers, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["error"]["message"], (body, r.text)
    assert greedy(client(url), PROMPTS[0]) != ""  # still serving


def test_api_key_is_required_on_every_route_but_health(servers):
    for url, key in ((servers["main"], KEY), (servers["tight"], TIGHT_KEY)):
        assert httpx.get(url + "/health").status_code == 200
        for method, route in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                              ("POST", "/v1/chat/completions")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
                r = httpx.request(method, url + route, headers=headers, json={})
                assert r.status_code == 401 and "API key" in r.json()["error"]["message"], (route, headers)
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        assert client(url, key=key).models.list().data[0].id == MODEL


def wait_for(cond, timeout=10.0):
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "timed out waiting"
        time.sleep(0.05)


def test_full_queue_answers_429_and_disconnects_cancel(servers):
    """Batch 1, queue 1: one request runs, one waits, the third gets 429. Closing the streams
    stops both jobs (the engine goes idle long before 200 tokens each)."""
    url, c = servers["tight"], client(servers["tight"], TIGHT_KEY)
    m = lambda name: metric(url, name, TIGHT_KEY)
    before = m('dejavu_cancelled_requests_total{reason="disconnect"}')
    running = c.completions.create(model=MODEL, prompt="Tell me a long story.", max_tokens=200, stream=True,
                                   extra_body=LONG)
    next(iter(running))
    waiting = []
    threading.Thread(target=lambda: waiting.append(c.completions.create(
        model=MODEL, prompt="Another long story.", max_tokens=200, stream=True, extra_body=LONG)), daemon=True).start()
    wait_for(lambda: m("dejavu_queue_length") == 1)
    with pytest.raises(openai.RateLimitError, match="busy"):
        c.completions.create(model=MODEL, prompt="One more", max_tokens=4)
    running.close()
    wait_for(lambda: waiting)  # its headers come with its first token, once it runs
    waiting[0].close()
    wait_for(lambda: m("dejavu_running_requests") == 0 and m("dejavu_queue_length") == 0)
    assert m('dejavu_cancelled_requests_total{reason="disconnect"}') == before + 2
    assert m("dejavu_generated_tokens_total") < 200  # neither ran to its end

    # a non-streaming client that gives up is cancelled too
    with pytest.raises(openai.APITimeoutError):
        client(url, TIGHT_KEY, timeout=1.0).completions.create(model=MODEL, prompt="Go on and on", max_tokens=300,
                                                               extra_body=LONG)
    wait_for(lambda: m('dejavu_cancelled_requests_total{reason="disconnect"}') == before + 3)
    wait_for(lambda: m("dejavu_running_requests") == 0)
    assert m('dejavu_achieved_density{part="mlp"}') < 0.6  # this server decodes sparse
    assert m("dejavu_guard_checked_steps") > 0 and 0 <= m("dejavu_guard_agreement") <= 1


def test_request_timeout_is_a_504_and_the_server_goes_on(servers):
    url = servers["tight"]
    t = time.monotonic()
    with pytest.raises(openai.InternalServerError, match="timed out after 4 s") as e:
        client(url, TIGHT_KEY).completions.create(model=MODEL, prompt="Go on and on", max_tokens=500, extra_body=LONG)
    assert e.value.status_code == 504 and time.monotonic() - t < 10
    assert "Paris" in greedy(client(url, TIGHT_KEY), "The capital of France is")


def test_a_failing_request_fails_alone(servers, single):
    """In one batch: a request whose own KV cache holds a NaN (the real forward then yields non-finite
    logits), one whose handling raises, and normal ones, which must still get their own output."""
    url = servers["main"]
    c, batched_before = client(url), batched_steps(url)
    anchor = c.completions.create(model=MODEL, prompt=" ".join(PROMPTS), max_tokens=60, temperature=0, stream=True)
    next(iter(anchor))  # a batch is running at a slot past every short prompt: the others join it

    def call(i):
        user = {0: "dejavu-test-fault:nan-cache", 1: "dejavu-test-fault:raise"}.get(i)
        try:
            return greedy(c, PROMPTS[i]) if user is None else c.completions.create(
                model=MODEL, prompt=PROMPTS[i], max_tokens=12, temperature=0, user=user)
        except openai.APIStatusError as e:
            return e

    with ThreadPoolExecutor(5) as pool:
        out = list(pool.map(call, range(5)))
    assert out[0].status_code == 500 and "non-finite logits" in out[0].message
    assert out[1].status_code == 500 and "internal error" in out[1].message
    for i in (2, 3, 4):
        assert out[i] == single[PROMPTS[i]]
    assert len("".join(ch.choices[0].text for ch in anchor)) > 0  # the anchor finished too
    assert batched_steps(url) > batched_before  # the failing requests shared decode steps with the others
    with pytest.raises(openai.APIError, match="non-finite logits"):  # streaming: an error event
        for _ in c.completions.create(model=MODEL, prompt="Hello", max_tokens=12, stream=True,
                                      user="dejavu-test-fault:nan-cache"):
            pass
    assert metric(url, 'dejavu_failed_requests_total{reason="non_finite"}') == 2
    assert greedy(c, PROMPTS[0]) == single[PROMPTS[0]]


def test_bad_predictors_stop_the_server_at_start_up(tmp_path):
    from dejavu.errors import DejavuError  # noqa: F401  (the message comes through the CLI)
    from test_model import random_pair
    from test_sparse import quick_predictors
    other, _ = random_pair("llama-gqa")
    quick_predictors(other, tmp_path / "rec").save(tmp_path / "other")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "predictors.json").write_text((tmp_path / "other" / "predictors.json").read_text())
    (corrupt / "predictors.safetensors").write_bytes(b"not a safetensors file")
    procs = {name: subprocess.Popen([sys.executable, "-m", "dejavu", "serve", "--port", str(free_port()),
                                     "--predictors", str(tmp_path / name)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name in ("other", "corrupt")}
    for name, words in (("other", "made for another model"), ("corrupt", "corrupt")):
        out, err = procs[name].communicate(timeout=240)
        assert procs[name].returncode != 0 and words in err and "Traceback" not in err, err
