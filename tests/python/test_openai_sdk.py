"""The OpenAI Python SDK against a real `crisp up` federation, as a user would run it.

The crisp binary is started by the fixture on a free port range and stopped at the end.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai import OpenAI

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRISP = os.environ.get("CRISP_BIN", os.path.join(ROOT, "target", "debug", "crisp"))
NOVA = "amazon.nova-lite-v1:0"
EU = {"eu-central-1", "eu-west-1", "eu-west-3", "eu-north-1"}


def free_base_port(count=11):
    """A base port with `count` free client ports and their peer ports (+1000)."""
    for base in range(20080, 40000, 97):
        ports = [base + i for i in range(count)] + [base + 1000 + i for i in range(count)]
        try:
            socks = []
            for p in ports:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
                socks.append(s)
            for s in socks:
                s.close()
            return base
        except OSError:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


@pytest.fixture(scope="module")
def federation():
    base = free_base_port()
    proc = subprocess.Popen(
        [CRISP, "up", "--port", str(base)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    banner = []
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        banner.append(line)
        if "Ctrl-C stops every node" in line:
            break
    assert any("eu-west-2" in l and "London" in l for l in banner), "".join(banner)
    yield {"base": base, "banner": "".join(banner), "proc": proc}
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out
    assert "stopped" in out
    remove_audit_trails("".join(banner))


def remove_audit_trails(banner):
    """`crisp up` keeps its audit trails after it stops, for a person to inspect; a test
    that has checked them removes them."""
    m = re.search(r"audit trails: (\S+)/<region>", banner)
    if m and os.path.basename(m.group(1)).startswith("crisp-up-audit-"):
        shutil.rmtree(m.group(1), ignore_errors=True)


def region_port(fed, index):
    return fed["base"] + index


DEMO_KEY = "crisp-demo-key-loopback-only"
EU_KEY = "crisp-eu-search-key-loopback-only"


def client(fed, index=0, key=DEMO_KEY):
    return OpenAI(base_url=f"http://127.0.0.1:{region_port(fed, index)}/v1", api_key=key, max_retries=0)


# Region order of the embedded demo.
US_EAST_1, EU_CENTRAL_1, EU_WEST_2 = 0, 3, 7


def test_eu_profile_called_in_the_us_runs_in_the_eu(federation):
    raw = client(federation, US_EAST_1).chat.completions.with_raw_response.create(
        model="eu.amazon.nova-lite-v1:0", messages=[{"role": "user", "content": "Hello"}]
    )
    assert raw.headers["x-crisp-inference-region"] in EU
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens > 0
    assert completion.model == "eu.amazon.nova-lite-v1:0"


def test_streaming_with_usage(federation):
    stream = client(federation, EU_WEST_2).chat.completions.create(
        model="global.amazon.nova-lite-v1:0",
        messages=[{"role": "user", "content": "Tell me something"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert len(text.split()) == usage.completion_tokens <= 8
    assert finish in ("stop", "length")


def test_responses_api_whole_and_streamed(federation):
    """`client.responses`: the same profiles, boundary and audit, OpenAI's newer wire format."""
    c = client(federation, US_EAST_1)
    raw = c.responses.with_raw_response.create(
        model="eu.amazon.nova-lite-v1:0", instructions="Answer briefly.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
        max_output_tokens=4)
    assert raw.headers["x-crisp-inference-region"] in EU
    response = raw.parse()
    assert response.object == "response" and response.model == "eu.amazon.nova-lite-v1:0"
    assert response.output_text
    assert response.usage.output_tokens == len(response.output_text.split()) <= 4
    if response.usage.output_tokens == 4:
        assert response.status == "incomplete"
        assert response.incomplete_details.reason == "max_output_tokens"
    # Streamed, through the SDK's own event accumulator.
    deltas, kinds, last = "", [], None
    with c.responses.stream(model="global.amazon.nova-lite-v1:0", input="Tell me something",
                            max_output_tokens=16) as stream:
        for event in stream:
            kinds.append(event.type)
            last = event
            if event.type == "response.output_text.delta":
                deltas += event.delta
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    # Completed, or incomplete at the token limit (the SDK accumulates both).
    assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
    assert [e.sequence_number for e in [last]] == [len(kinds) - 1]
    final = last.response
    assert deltas and final.output_text == deltas
    assert final.usage.output_tokens == len(deltas.split()) <= 16
    assert (final.status == "incomplete") == (kinds[-1] == "response.incomplete")
    # What crisp cannot do is refused, and nothing runs.
    for extra, what in [({"previous_response_id": "resp_123"}, "keeps no responses"),
                        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "`tools`"),
                        ({"text": {"format": {"type": "json_object"}}}, "`text.format`")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="eu.amazon.nova-lite-v1:0", input="x", **extra)
        assert what in str(e.value) and "nothing was run" in str(e.value)
    # The EU team's guardrail holds here too.
    with pytest.raises(openai.PermissionDeniedError):
        client(federation, US_EAST_1, key=EU_KEY).responses.create(
            model="global.amazon.nova-lite-v1:0", input="x")


def test_models_list_shows_profiles(federation):
    ids = {m.id for m in client(federation).models.list()}
    assert {"global.amazon.nova-lite-v1:0", "eu.amazon.nova-lite-v1:0", "us.amazon.nova-lite-v1:0", NOVA} <= ids
    eu = client(federation).models.retrieve("eu.amazon.nova-lite-v1:0")
    assert eu.id == "eu.amazon.nova-lite-v1:0" and eu.owned_by == "crisp"
    with pytest.raises(openai.NotFoundError):
        client(federation).models.retrieve("eu.amazon.nova-lite")
    # An ARN, as chat completions take one, names the same entry.
    arn = "arn:aws:bedrock:us-east-1:000000000000:inference-profile/eu.amazon.nova-lite-v1:0"
    assert client(federation).models.retrieve(arn).id == "eu.amazon.nova-lite-v1:0"
    # Listing needs a key too, and shows each caller what it may use.
    with pytest.raises(openai.AuthenticationError):
        client(federation, key="crisp-wrong").models.list()
    eu_team = {m.id for m in client(federation, key=EU_KEY).models.list()}
    assert "eu.amazon.nova-lite-v1:0" in eu_team
    assert not any(i.startswith("global.") for i in eu_team), eu_team


def test_sdk_errors(federation):
    c = client(federation, EU_WEST_2)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="eu.amazon.nova-lite-v1", messages=[{"role": "user", "content": "x"}])
    assert "did you mean" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="anthropic.claude-sonnet-4-5-20250929-v1:0", messages=[{"role": "user", "content": "x"}]
        )
    assert "eu.anthropic.claude-sonnet-4-5-20250929-v1:0" in str(e.value)


def test_saturated_region_profile_keeps_answering_bare_model_gets_429(federation):
    """The README tour: fill Frankfurt, the EU profile still answers, the bare ID is throttled."""
    url = f"http://127.0.0.1:{region_port(federation, EU_CENTRAL_1)}/v1/chat/completions"
    c = client(federation, EU_CENTRAL_1)

    def hold():
        # Long streams hold engine slots (8 slots + 8 queued in the demo).
        body = json.dumps({"model": NOVA, "stream": True, "max_tokens": 48,
                           "messages": [{"role": "user", "content": "long answer please"}]}).encode()
        req = urllib.request.Request(url, body, {"content-type": "application/json",
                                                 "authorization": f"Bearer {DEMO_KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    with ThreadPoolExecutor(max_workers=24) as pool:
        held = [pool.submit(hold) for _ in range(24)]
        time.sleep(0.5)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=NOVA, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert "eu-central-1 (at capacity)" in str(e.value)
        raw = c.chat.completions.with_raw_response.create(
            model="eu.amazon.nova-lite-v1:0", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert raw.headers["x-crisp-inference-region"] in EU - {"eu-central-1"}
        statuses = [f.result()[0] for f in held]
    assert statuses.count(200) == 16 and statuses.count(429) == 8, statuses


def test_keys_and_policies(federation):
    """Access control in the demo: keys are required, and the EU team's guardrail holds."""
    with pytest.raises(openai.AuthenticationError) as e:
        client(federation, key="crisp-wrong").chat.completions.create(
            model="eu.amazon.nova-lite-v1:0", messages=[{"role": "user", "content": "x"}])
    assert "not known" in str(e.value)
    eu = client(federation, US_EAST_1, key=EU_KEY)
    raw = eu.chat.completions.with_raw_response.create(
        model="eu.amazon.nova-lite-v1:0", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert raw.headers["x-crisp-inference-region"] in EU
    with pytest.raises(openai.PermissionDeniedError) as e:
        eu.chat.completions.create(
            model="global.amazon.nova-lite-v1:0", messages=[{"role": "user", "content": "x"}])
    assert "guardrail" in str(e.value) and "global.amazon.nova-lite-v1:0" in str(e.value)
    # A bare model ID in the US is outside the EU too.
    with pytest.raises(openai.PermissionDeniedError):
        eu.chat.completions.create(model=NOVA, messages=[{"role": "user", "content": "x"}])
