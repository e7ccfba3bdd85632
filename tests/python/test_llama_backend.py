"""crisp in front of a real llama.cpp server: a two-region deployment where us-east-1 runs
the model on llama-cpp-python (a tiny random-weight model written here) and eu-west-1 on
the simulated engine, driven with the OpenAI SDK like any client would."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from openai import OpenAI

from test_openai_sdk import CRISP, ROOT

LLAMA_PY = os.environ.get("CRISP_LLAMA_PYTHON")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


@contextlib.contextmanager
def llama_server(d, *extra):
    """A real llama.cpp server (llama-cpp-python) on a tiny random-weight model written in
    `d`, with `extra` server arguments; yields its port once it listens."""
    if not LLAMA_PY:
        if os.environ.get("CI"):
            pytest.fail("CRISP_LLAMA_PYTHON is not set: scripts/test.sh installs llama-cpp-python")
        pytest.skip("set CRISP_LLAMA_PYTHON to run against a real llama.cpp server")
    model = d / "tiny.gguf"
    subprocess.run([LLAMA_PY, os.path.join(ROOT, "tests/llama/make_model.py"), str(model)],
                   check=True)
    port = free_port()
    llama = subprocess.Popen(
        [LLAMA_PY, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "512", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, llama)
        yield port
    finally:
        llama.kill()
        llama.wait()


@contextlib.contextmanager
def crisp_up(config, client_port, **popen):
    """`crisp up --config config`, once its client port listens; stopped with Ctrl-C. Its
    temporary files, and the audit trails it keeps, go next to the configuration."""
    env = {**os.environ, "TMPDIR": str(config.parent)}
    crisp = subprocess.Popen([CRISP, "up", "--config", str(config)], env=env, **popen)
    try:
        wait_port(client_port, crisp)
        time.sleep(0.5)
        yield crisp
    finally:
        crisp.send_signal(signal.SIGINT)
        try:
            crisp.wait(timeout=15)
        except subprocess.TimeoutExpired:
            crisp.kill()


def client(port):
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    with llama_server(d) as lport:
        ports = [free_port() for _ in range(4)]
        config = d / "crisp.toml"
        config.write_text(f"""
version = 1
[deployment]
name = "llamatest"
[routing]
telemetry_interval_ms = 50
[[geography]]
name = "us"
countries = ["US"]
[[geography]]
name = "eu"
tags = ["eu"]
[[region]]
code = "us-east-1"
country = "US"
lat = 38.9
lon = -77.4
client = "127.0.0.1:{ports[0]}"
peer = "127.0.0.1:{ports[1]}"
[[region]]
code = "eu-west-1"
country = "IE"
lat = 53.3
lon = -6.3
tags = ["eu"]
client = "127.0.0.1:{ports[2]}"
peer = "127.0.0.1:{ports[3]}"
[[model]]
id = "tiny-llama"
input_price_per_1k = 0.0001
output_price_per_1k = 0.0002
[[model.backend]]
region = "us-east-1"
kind = "openai"
base_url = "http://127.0.0.1:{lport}/v1"
upstream_model = "tiny"
max_concurrency = 2
[[model.backend]]
region = "eu-west-1"
kind = "simulated"
time_scale = 0.01
""")
        with crisp_up(config, ports[0], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
            yield {"us": ports[0], "eu": ports[2]}


def test_a_request_runs_on_the_real_engine(deployment):
    raw = client(deployment["us"]).chat.completions.with_raw_response.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )
    assert raw.headers["x-crisp-inference-region"] == "us-east-1"
    c = raw.parse()
    assert c.usage.completion_tokens >= 1 and c.usage.prompt_tokens > 0
    assert c.choices[0].finish_reason in ("length", "stop")
    # Sampling settings reach the engine, llama.cpp's extensions included (top_k, min_p,
    # and repeat_penalty, which crisp also reads and sends as vLLM's repetition_penalty).
    sampled = client(deployment["us"]).chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hello"}], max_tokens=3,
        temperature=0.7, top_p=0.9, seed=7,
        extra_body={"top_k": 5, "min_p": 0.05, "repeat_penalty": 1.1},
    )
    assert sampled.usage.completion_tokens >= 1


def test_streaming_through_crisp_from_the_real_engine(deployment):
    stream = client(deployment["us"]).chat.completions.create(
        model="us.tiny-llama", messages=[{"role": "user", "content": "hello"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True},
    )
    deltas, usage = 0, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas += 1
        if chunk.usage:
            usage = chunk.usage
    assert deltas >= 1 and usage.completion_tokens >= 1


def test_the_eu_profile_called_next_to_the_real_engine_stays_in_the_eu(deployment):
    raw = client(deployment["us"]).chat.completions.with_raw_response.create(
        model="eu.tiny-llama", messages=[{"role": "user", "content": "hello"}], max_tokens=3
    )
    assert raw.headers["x-crisp-inference-region"] == "eu-west-1"


def test_the_seed_reaches_the_real_engine_across_the_backbone(deployment):
    """Called in eu-west-1, the US profile runs on llama.cpp in us-east-1: the same seed
    gives the same sampled text, other seeds other text."""
    def sample(seed):
        raw = client(deployment["eu"]).chat.completions.with_raw_response.create(
            model="us.tiny-llama", messages=[{"role": "user", "content": "hello"}],
            max_tokens=12, temperature=1.5, top_p=1.0, seed=seed,
        )
        assert raw.headers["x-crisp-inference-region"] == "us-east-1"
        return raw.parse().choices[0].message.content

    first = sample(11)
    assert sample(11) == first
    assert any(sample(seed) != first for seed in (12, 13, 14)), first
