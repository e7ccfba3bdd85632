"""The client API over HTTPS: `crisp serve --client-cert/--client-key`, called with the
OpenAI SDK trusting only the given CA."""

import os
import socket
import subprocess
import time

import json
import ssl

from test_openai_sdk import CRISP


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_client_api_serves_https(tmp_path):
    d = tmp_path
    client, peer = free_port(), free_port()
    (d / "crisp.toml").write_text(f"""
version = 1
[deployment]
name = "tls"
[[region]]
code = "eu-west-1"
country = "IE"
lat = 53.3
lon = -6.3
tags = ["eu"]
client = "127.0.0.1:{client}"
peer = "127.0.0.1:{peer}"
[[model]]
id = "m"
input_price_per_1k = 0.001
output_price_per_1k = 0.002
[[model.backend]]
region = "eu-west-1"
kind = "simulated"
time_scale = 0.01
""")
    run = lambda *a: subprocess.run([CRISP, *a], cwd=d, check=True, capture_output=True)
    run("certs", "init", "--deployment", "tls", "--dir", "certs")
    run("certs", "issue", "--deployment", "tls", "--region", "eu-west-1", "--dir", "certs")
    # The same CA issues the API's certificate here; any PEM certificate and key will do.
    node = subprocess.Popen(
        [CRISP, "serve", "--config", "crisp.toml", "--region", "eu-west-1",
         "--client-cert", "certs/eu-west-1.pem", "--client-key", "certs/eu-west-1.key"],
        cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 20
        while socket.socket().connect_ex(("127.0.0.1", client)) != 0:
            assert time.time() < deadline, "node did not start"
            time.sleep(0.1)
        # The certificate names eu-west-1.tls.crisp; connect to the node by address and
        # verify that name against the CA.
        ctx = ssl.create_default_context(cafile=str(d / "certs" / "ca.pem"))
        body = json.dumps({"model": "m", "max_tokens": 2,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        with socket.create_connection(("127.0.0.1", client)) as raw:
            with ctx.wrap_socket(raw, server_hostname="eu-west-1.tls.crisp") as tls:
                assert tls.version() in ("TLSv1.3", "TLSv1.2")
                tls.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                            b"content-type: application/json\r\nconnection: close\r\n"
                            + f"content-length: {len(body)}\r\n\r\n".encode() + body)
                out = b""
                while chunk := tls.recv(65536):
                    out += chunk
        head = out.decode(errors="replace")
        assert head.startswith("HTTP/1.1 200"), head[:200]
        assert "x-crisp-inference-region: eu-west-1" in head
        # A client that does not trust the CA is refused.
        with socket.create_connection(("127.0.0.1", client)) as raw:
            try:
                ssl.create_default_context().wrap_socket(raw, server_hostname="eu-west-1.tls.crisp")
                raise AssertionError("an untrusted certificate was accepted")
            except ssl.SSLCertVerificationError:
                pass
    finally:
        node.kill()
        node.wait()
