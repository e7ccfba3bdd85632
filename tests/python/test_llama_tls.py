"""crisp in front of a real llama.cpp server that speaks HTTPS with a certificate from a
private CA, as self-hosted fleets often do: trusted through the backend's `ca_file`, and
refused, with a message saying what to set, without it."""

import subprocess
import time

import openai
import pytest
import trustme

from test_llama_backend import client, crisp_up, free_port, llama_server


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama-tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.private_key_pem.write_to_path(str(d / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    ca.cert_pem.write_to_path(str(d / "internal-ca.pem"))
    with llama_server(d, "--ssl_keyfile", str(d / "server.key"),
                      "--ssl_certfile", str(d / "server.pem")) as lport:
        client_port, peer_port = free_port(), free_port()
        backend = f"""region = "us-east-1"
kind = "openai"
base_url = "https://127.0.0.1:{lport}/v1"
upstream_model = "tiny"
max_concurrency = 2
"""
        (d / "crisp.toml").write_text(f"""
version = 1
[deployment]
name = "llamatls"
[[region]]
code = "us-east-1"
country = "US"
lat = 38.9
lon = -77.4
client = "127.0.0.1:{client_port}"
peer = "127.0.0.1:{peer_port}"
[[model]]
id = "tiny-internal"
input_price_per_1k = 0.0001
output_price_per_1k = 0.0002
[[model.backend]]
{backend}ca_file = "internal-ca.pem"
[[model]]
id = "tiny-untrusted"
input_price_per_1k = 0.0001
output_price_per_1k = 0.0002
[[model.backend]]
{backend}""")
        with open(d / "crisp.log", "w") as log:
            # Started from another directory: ca_file is relative to the configuration.
            with crisp_up(d / "crisp.toml", client_port, cwd="/", stdout=log,
                          stderr=subprocess.STDOUT):
                yield {"port": client_port, "log": d / "crisp.log"}


def test_a_server_with_a_private_ca_is_trusted_through_ca_file(deployment):
    raw = client(deployment["port"]).chat.completions.with_raw_response.create(
        model="tiny-internal", messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )
    assert raw.headers["x-crisp-inference-region"] == "us-east-1"
    c = raw.parse()
    assert c.usage.completion_tokens >= 1
    stream = client(deployment["port"]).chat.completions.create(
        model="tiny-internal", messages=[{"role": "user", "content": "hello"}], max_tokens=4,
        stream=True,
    )
    assert any(ch.choices and ch.choices[0].delta.content for ch in stream)


def test_without_ca_file_the_certificate_is_refused_and_the_log_says_what_to_set(deployment):
    with pytest.raises(openai.APIStatusError) as e:
        client(deployment["port"]).chat.completions.create(
            model="tiny-untrusted", messages=[{"role": "user", "content": "hello"}],
            max_tokens=5,
        )
    # Like any region that cannot be reached: no region could take it.
    assert e.value.status_code == 429 and "unreachable" in e.value.message, e.value
    # The log is written by a thread of its own: give it a moment.
    deadline = time.monotonic() + 10
    log = deployment["log"].read_text()
    while not ("UnknownIssuer" in log and "ca_file" in log) and time.monotonic() < deadline:
        time.sleep(0.1)
        log = deployment["log"].read_text()
    assert "UnknownIssuer" in log and "ca_file" in log, log[-3000:]
