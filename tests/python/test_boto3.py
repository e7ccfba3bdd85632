"""boto3, as Bedrock users already call it, pointed at a real `crisp up` with SigV4."""

import json
import re

import botocore
import boto3
import pytest
from botocore.config import Config

from test_openai_sdk import client as openai_client
from test_openai_sdk import CRISP, EU, EU_CENTRAL_1, EU_KEY, EU_WEST_2, US_EAST_1, federation, region_port  # noqa: F401

AKID = "AKIACRISPDEMO0000001"
SECRET = "crisp-demo-secret-loopback-only"
REGIONS = ["us-east-1", "us-east-2", "us-west-2", "eu-central-1", "eu-west-1", "eu-west-3",
           "eu-north-1", "eu-west-2", "ap-northeast-1", "ap-southeast-1", "ap-southeast-2"]
NO_RETRY = Config(retries={"max_attempts": 1, "mode": "standard"})


def trail_events(fed, region):
    """The events of `region`'s audit trail that are not sealed yet."""
    trail = re.search(r"audit trails: (\S+)/<region>", fed["banner"]).group(1)
    with open(f"{trail}/{region}/open.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def client(fed, service, index=US_EAST_1, secret=SECRET, akid=AKID, region=None):
    return boto3.client(
        service,
        endpoint_url=f"http://127.0.0.1:{region_port(fed, index)}",
        region_name=region or REGIONS[index],
        aws_access_key_id=akid,
        aws_secret_access_key=secret,
        config=NO_RETRY,
    )


def test_converse_eu_profile_from_the_us(federation):
    rt = client(federation, "bedrock-runtime")
    r = rt.converse(
        modelId="eu.amazon.nova-lite-v1:0",
        messages=[{"role": "user", "content": [{"text": "Hello"}]}],
        inferenceConfig={"maxTokens": 6, "temperature": 0.7, "topP": 0.9},
    )
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-crisp-inference-region"] in EU
    assert r["output"]["message"]["content"][0]["text"]
    assert r["usage"]["outputTokens"] <= 6
    assert r["stopReason"] in ("end_turn", "max_tokens")


def test_converse_with_a_profile_arn(federation):
    rt = client(federation, "bedrock-runtime")
    arn = "arn:aws:bedrock:us-east-1:000000000000:inference-profile/us.amazon.nova-lite-v1:0"
    r = rt.converse(modelId=arn, messages=[{"role": "user", "content": [{"text": "Hi"}]}])
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-crisp-inference-region"].startswith("us-")


def test_stop_sequences_end_the_answer_with_their_own_reason(federation):
    rt = client(federation, "bedrock-runtime", US_EAST_1)
    msgs = [{"role": "user", "content": [{"text": "Say something long"}]}]
    whole = rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs,
                        inferenceConfig={"maxTokens": 40})["output"]["message"]["content"][0]["text"]
    stop = whole.split()[3]
    r = rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs,
                    inferenceConfig={"maxTokens": 40, "stopSequences": [stop]})
    assert r["stopReason"] == "stop_sequence", r
    assert stop not in r["output"]["message"]["content"][0]["text"]


def test_converse_stream(federation):
    rt = client(federation, "bedrock-runtime", EU_WEST_2)
    r = rt.converse_stream(
        modelId="global.amazon.nova-lite-v1:0",
        messages=[{"role": "user", "content": [{"text": "Tell me"}]}],
        inferenceConfig={"maxTokens": 8},
    )
    kinds, text, usage = [], "", None
    for event in r["stream"]:
        (kind, body), = event.items()
        kinds.append(kind)
        if kind == "contentBlockDelta":
            text += body["delta"]["text"]
        if kind == "metadata":
            usage = body["usage"]
    assert kinds[0] == "messageStart" and kinds[-1] == "metadata"
    assert "messageStop" in kinds and "contentBlockStop" in kinds
    assert usage["outputTokens"] == len(text.split())


def test_invoke_model_nova_native_body(federation):
    rt = client(federation, "bedrock-runtime")
    body = {"messages": [{"role": "user", "content": [{"text": "Hello"}]}], "inferenceConfig": {"maxTokens": 5}}
    r = rt.invoke_model(modelId="us.amazon.nova-lite-v1:0", body=json.dumps(body))
    out = json.loads(r["body"].read())
    assert out["output"]["message"]["content"][0]["text"]
    assert out["usage"]["outputTokens"] <= 5
    s = rt.invoke_model_with_response_stream(modelId="us.amazon.nova-lite-v1:0", body=json.dumps(body))
    chunks = [json.loads(e["chunk"]["bytes"]) for e in s["body"]]
    assert "messageStart" in chunks[0] and any("messageStop" in c for c in chunks)
    # An Anthropic Messages body is refused with what to send instead, not misread.
    claude = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5,
              "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]}
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.invoke_model(modelId="us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                        body=json.dumps(claude))
    assert "anthropic_version" in str(e.value) and "converse" in str(e.value)
    # Also in its shorter form, string content and a system string, which the Converse
    # shape cannot even parse.
    claude = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "system": "Be brief.",
              "messages": [{"role": "user", "content": "Hello"}]}
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.invoke_model(modelId="us.amazon.nova-lite-v1:0", body=json.dumps(claude))
    assert "anthropic_version" in str(e.value) and "converse" in str(e.value), str(e.value)


def test_sdk_exceptions(federation):
    rt = client(federation, "bedrock-runtime", EU_WEST_2)
    msgs = [{"role": "user", "content": [{"text": "x"}]}]
    with pytest.raises(rt.exceptions.ResourceNotFoundException):
        rt.converse(modelId="eu.amazon.nova-lite-v1", messages=msgs)
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.converse(modelId="anthropic.claude-sonnet-4-5-20250929-v1:0", messages=msgs)
    assert "on-demand throughput isn't supported" in str(e.value)
    assert "eu.anthropic.claude-sonnet-4-5-20250929-v1:0" in str(e.value)
    rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs, inferenceConfig={"maxTokens": 2})
    bad = client(federation, "bedrock-runtime", EU_WEST_2, secret="wrong-secret")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        bad.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs)
    assert e.value.response["Error"]["Code"] == "InvalidSignatureException"
    # The refused sign-in is in the region's audit trail, like an accepted call.
    events = trail_events(federation, "eu-west-2")
    # It names the access key the signature claims: the secret was wrong, not the key.
    assert any(ev.get("errorCode") == "InvalidSignatureException"
               and ev["additionalEventData"].get("errorKind") == "invalid_api_key"
               and ev["userIdentity"].get("accessKeyId") == AKID
               and ev["userIdentity"]["type"] == "Anonymous"
               and ev["requestParameters"]["modelId"] == "eu.amazon.nova-lite-v1:0" for ev in events), events[-3:]
    # An accepted call names the principal and the access key it signed in with.
    signed = [ev for ev in events if ev["eventName"] == "Converse" and "errorCode" not in ev]
    assert signed and signed[-1]["userIdentity"]["accessKeyId"] == AKID, events[-3:]
    assert signed[-1]["userIdentity"]["principalId"] == "demo"
    unknown = client(federation, "bedrock-runtime", EU_WEST_2, akid="AKIAUNKNOWN000000000")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        unknown.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs)
    assert e.value.response["Error"]["Code"] == "UnrecognizedClientException"
    events = trail_events(federation, "eu-west-2")
    assert events[-1].get("errorCode") == "UnrecognizedClientException", events[-1]
    assert events[-1]["userIdentity"].get("accessKeyId") == "AKIAUNKNOWN000000000", events[-1]
    # Tools are refused, never dropped: the model would answer as if it had none.
    tools = {"tools": [{"toolSpec": {"name": "lookup", "inputSchema": {"json": {"type": "object"}}}}]}
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs, toolConfig=tools)
    assert "toolConfig is not supported" in str(e.value)
    # Conversations are checked as the managed service checks them.
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.converse(modelId="eu.amazon.nova-lite-v1:0",
                    messages=[{"role": "assistant", "content": [{"text": "x"}]}])
    assert "must start with a user message" in str(e.value)
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=[{"role": "user", "content": []}])
    assert "messages[0].content is empty" in str(e.value)
    # So are guardrails (an unguarded answer to a guarded request) and model-specific fields.
    guardrail = {"guardrailIdentifier": "pii-filter", "guardrailVersion": "1"}
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs, guardrailConfig=guardrail)
    assert "guardrailConfig is not supported" in str(e.value)
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.invoke_model(modelId="eu.amazon.nova-lite-v1:0", body=b'{"messages": []}',
                        guardrailIdentifier="pii-filter", guardrailVersion="1")
    assert "guardrails are not supported" in str(e.value)
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs,
                    additionalModelRequestFields={"top_k": 20})
    assert "additionalModelRequestFields is not supported" in str(e.value)
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs,
                    inferenceConfig={"temperature": 1.5})
    assert "temperature must be between 0 and 1" in str(e.value)
    for extra, refused in [({"additionalModelResponseFieldPaths": ["/stop_sequence"]},
                            "additionalModelResponseFieldPaths is not supported"),
                           ({"performanceConfig": {"latency": "optimized"}},
                            "performanceConfig is not supported")]:
        with pytest.raises(rt.exceptions.ValidationException) as e:
            rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs, **extra)
        assert refused in str(e.value)
    answer = rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs,
                         additionalModelRequestFields={}, requestMetadata={"team": "search"},
                         additionalModelResponseFieldPaths=[],
                         performanceConfig={"latency": "standard"},
                         inferenceConfig={"maxTokens": 2})
    assert answer["usage"]["outputTokens"] <= 2
    # A prompt-caching checkpoint changes no answer: accepted; an image is refused.
    cached = rt.converse(modelId="eu.amazon.nova-lite-v1:0",
                         system=[{"text": "Be brief."}, {"cachePoint": {"type": "default"}}],
                         messages=[{"role": "user", "content": [{"text": "Hi"}, {"cachePoint": {"type": "default"}}]}],
                         inferenceConfig={"maxTokens": 2})
    assert cached["usage"]["outputTokens"] <= 2
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=[{"role": "user", "content": [
            {"text": "What is this?"}, {"image": {"format": "png", "source": {"bytes": b"x"}}}]}])
    assert "messages[0].content[1] is not a text block" in str(e.value)
    # Amazon Nova's native body, as its documentation spells it, is read whole; a field
    # crisp does not know is named, never dropped.
    nova = {"schemaVersion": "messages-v1", "messages": msgs,
            "inferenceConfig": {"max_new_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 20}}
    body = json.loads(rt.invoke_model(modelId="eu.amazon.nova-lite-v1:0", body=json.dumps(nova))["body"].read())
    assert body["usage"]["outputTokens"] <= 2
    for config, refused in [({"top_k": -1}, "inferenceConfig.top_k"),
                            ({"max_new_token": 2}, "did you mean `max_new_tokens`?")]:
        with pytest.raises(rt.exceptions.ValidationException) as e:
            rt.invoke_model(modelId="eu.amazon.nova-lite-v1:0",
                            body=json.dumps({"messages": msgs, "inferenceConfig": config}))
        assert refused in str(e.value), e.value
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.invoke_model(modelId="eu.amazon.nova-lite-v1:0",
                        body=json.dumps({"prompt": "Hi", "max_gen_len": 5}))
    assert "other providers' native InvokeModel bodies are not supported" in str(e.value)
    # An operation this node does not serve is named in an error the SDK can show.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        rt.apply_guardrail(guardrailIdentifier="g", guardrailVersion="1", source="INPUT",
                           content=[{"text": {"text": "x"}}])
    assert e.value.response["Error"]["Code"] == "UnknownOperationException"
    assert "/guardrail/g/version/1/apply" in e.value.response["Error"]["Message"]
    assert "CountTokens" in e.value.response["Error"]["Message"]
    wrong_region = client(federation, "bedrock-runtime", EU_WEST_2, region="us-east-1")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        wrong_region.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs)
    assert e.value.response["Error"]["Code"] == "InvalidSignatureException"


def test_bedrock_api_keys_are_crisp_api_keys(federation, monkeypatch):
    """boto3 with a Bedrock API key (AWS_BEARER_TOKEN_BEDROCK) sends it as a bearer token:
    crisp's own API keys work there, with the same principal and policies."""
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", EU_KEY)
    rt = boto3.client("bedrock-runtime", endpoint_url=f"http://127.0.0.1:{region_port(federation, US_EAST_1)}",
                      region_name="us-east-1", config=NO_RETRY)
    msgs = [{"role": "user", "content": [{"text": "Hi"}]}]
    r = rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs, inferenceConfig={"maxTokens": 2})
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-crisp-inference-region"] in EU
    # The EU team's guardrail applies to its key here too.
    with pytest.raises(rt.exceptions.AccessDeniedException):
        rt.converse(modelId="global.amazon.nova-lite-v1:0", messages=msgs)
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "crisp-not-a-key")
    bad = boto3.client("bedrock-runtime", endpoint_url=f"http://127.0.0.1:{region_port(federation, US_EAST_1)}",
                       region_name="us-east-1", config=NO_RETRY)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        bad.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs)
    assert e.value.response["Error"]["Code"] == "UnrecognizedClientException"
    assert "crisp keys create" in e.value.response["Error"]["Message"]


def test_control_plane_lists_and_gets_profiles(federation):
    bedrock = client(federation, "bedrock", EU_CENTRAL_1)
    ids, token, pages = [], None, 0
    while True:
        kwargs = {"maxResults": 3}
        if token:
            kwargs["nextToken"] = token
        page = bedrock.list_inference_profiles(**kwargs)
        pages += 1
        ids += [p["inferenceProfileId"] for p in page["inferenceProfileSummaries"]]
        token = page.get("nextToken")
        if not token:
            break
    assert pages >= 3
    assert "eu.amazon.nova-lite-v1:0" in ids and "global.amazon.nova-lite-v1:0" in ids
    eu = bedrock.get_inference_profile(inferenceProfileIdentifier="eu.amazon.nova-lite-v1:0")
    regions = sorted(m["modelArn"].split(":")[3] for m in eu["models"])
    assert regions == ["eu-central-1", "eu-north-1", "eu-west-1", "eu-west-3"]
    assert eu["type"] == "SYSTEM_DEFINED" and eu["status"] == "ACTIVE"
    with pytest.raises(bedrock.exceptions.ResourceNotFoundException):
        bedrock.get_inference_profile(inferenceProfileIdentifier="eu.nope")
    models = bedrock.list_foundation_models()["modelSummaries"]
    assert any(m["modelId"] == "amazon.nova-lite-v1:0" for m in models)
    # The filters: every model takes and gives text, none is customized or provisioned.
    ids_of = lambda **f: {m["modelId"] for m in bedrock.list_foundation_models(**f)["modelSummaries"]}
    assert "amazon.nova-lite-v1:0" in ids_of(byProvider="Amazon", byOutputModality="TEXT")
    assert all(i.startswith("amazon.") for i in ids_of(byProvider="amazon"))
    assert "amazon.nova-lite-v1:0" not in ids_of(byProvider="anthropic")
    assert ids_of(byOutputModality="IMAGE") == set()
    assert ids_of(byCustomizationType="FINE_TUNING") == set()
    assert ids_of(byInferenceType="PROVISIONED") == set()
    on_demand = ids_of(byInferenceType="ON_DEMAND")
    assert on_demand <= {m["modelId"] for m in models}
    assert all("ON_DEMAND" in m["inferenceTypesSupported"] for m in models if m["modelId"] in on_demand)
    with pytest.raises(bedrock.exceptions.ValidationException) as e:
        bedrock.list_foundation_models(byInferenceType="SOMETIMES")
    assert "ON_DEMAND, PROVISIONED" in str(e.value)
    for identifier in ["amazon.nova-lite-v1:0",
                       "arn:aws:bedrock:eu-central-1::foundation-model/amazon.nova-lite-v1:0"]:
        details = bedrock.get_foundation_model(modelIdentifier=identifier)["modelDetails"]
        assert details["modelId"] == "amazon.nova-lite-v1:0"
        assert details["responseStreamingSupported"] is True
    with pytest.raises(bedrock.exceptions.ResourceNotFoundException) as e:
        bedrock.get_foundation_model(modelIdentifier="amazon.nova-lite")
    assert "ListFoundationModels" in str(e.value)


def test_application_profiles_route_like_their_source_and_are_shared(federation):
    us = client(federation, "bedrock", US_EAST_1)
    source = "arn:aws:bedrock:us-east-1:000000000000:inference-profile/eu.amazon.nova-lite-v1:0"
    created = us.create_inference_profile(
        inferenceProfileName="search-team-eu",
        description="EU traffic of the search team",
        clientRequestToken="token-1",
        modelSource={"copyFrom": source},
        tags=[{"key": "team", "value": "search"}],
    )
    arn = created["inferenceProfileArn"]
    assert ":application-inference-profile/" in arn
    # A retry with the same token is the same profile; another request for the name conflicts.
    again = us.create_inference_profile(
        inferenceProfileName="search-team-eu", clientRequestToken="token-1", modelSource={"copyFrom": source}
    )
    assert again["inferenceProfileArn"].split("/")[-1] == arn.split("/")[-1]
    with pytest.raises(us.exceptions.ConflictException):
        us.create_inference_profile(
            inferenceProfileName="search-team-eu", clientRequestToken="token-2", modelSource={"copyFrom": source}
        )
    with pytest.raises(us.exceptions.ValidationException):
        us.create_inference_profile(inferenceProfileName="bad  name", modelSource={"copyFrom": source})
    with pytest.raises(us.exceptions.ValidationException):
        us.create_inference_profile(inferenceProfileName="x" * 65, modelSource={"copyFrom": source})
    got = us.get_inference_profile(inferenceProfileIdentifier=arn)
    assert got["type"] == "APPLICATION"
    assert sorted(m["modelArn"].split(":")[3] for m in got["models"]) == sorted(EU)

    # Another node sees it (it re-reads the shared store) and routes it inside the EU.
    import time
    rt = client(federation, "bedrock-runtime", EU_WEST_2)
    deadline = time.time() + 10
    while True:
        try:
            r = rt.converse(modelId=arn, messages=[{"role": "user", "content": [{"text": "Hi"}]}])
            break
        except rt.exceptions.ResourceNotFoundException:
            assert time.time() < deadline, "the profile never became visible on eu-west-2"
            time.sleep(0.3)
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-crisp-inference-region"] in EU
    # The OpenAI API takes the ARN as a model too, and describes it.
    model = openai_client(federation, EU_WEST_2).models.retrieve(arn)
    assert model.id == arn
    assert model.crisp["kind"] == "application_profile" and model.crisp["name"] == "search-team-eu"
    assert sorted(model.crisp["destinations"]) == sorted(EU)
    # The ARN must name this deployment's account, like a system profile's.
    foreign = arn.replace(":000000000000:", ":999999999999:")
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.converse(modelId=foreign, messages=[{"role": "user", "content": [{"text": "Hi"}]}])
    assert "belongs to account 999999999999" in str(e.value)
    apps = client(federation, "bedrock", EU_WEST_2).list_inference_profiles(typeEquals="APPLICATION")
    assert [p["inferenceProfileName"] for p in apps["inferenceProfileSummaries"]] == ["search-team-eu"]

    us.delete_inference_profile(inferenceProfileIdentifier=arn)
    with pytest.raises(us.exceptions.ResourceNotFoundException):
        us.get_inference_profile(inferenceProfileIdentifier=arn)
    with pytest.raises(us.exceptions.ValidationException):
        us.delete_inference_profile(inferenceProfileIdentifier="eu.amazon.nova-lite-v1:0")

    # Creating and deleting are management events in the trail of the region called:
    # who, with which key, the profile and its tags, or why it was refused.
    app_id = arn.split("/")[-1]
    managed = [(ev["eventName"], ev.get("errorCode"), ev["additionalEventData"].get("applicationProfile"))
               for ev in trail_events(federation, "us-east-1")
               if ev.get("managementEvent") and ev["requestParameters"]["modelId"] in (source, arn)]
    assert managed == [
        ("CreateInferenceProfile", None, app_id),
        ("CreateInferenceProfile", None, app_id),
        ("CreateInferenceProfile", "ConflictException", None),
        ("CreateInferenceProfile", "ValidationException", None),
        ("CreateInferenceProfile", "ValidationException", None),
        ("DeleteInferenceProfile", None, app_id),
    ], managed
    created = next(ev for ev in trail_events(federation, "us-east-1")
                   if ev["eventName"] == "CreateInferenceProfile" and "errorCode" not in ev)
    assert created["userIdentity"]["accessKeyId"] == AKID
    assert created["additionalEventData"]["tags"] == [["team", "search"]]
    assert created["additionalEventData"]["profileId"] == "eu.amazon.nova-lite-v1:0"
    assert "inferenceRegion" not in created["additionalEventData"]
    # `crisp audit lookup` names the call and shows no tokens for a management event.
    import re, subprocess
    trail = re.search(r"audit trails: (\S+)/<region>", federation["banner"]).group(1)
    rows = subprocess.run(
        [CRISP, "audit", "lookup", "--dir", f"{trail}/us-east-1", "--event-name", "DeleteInferenceProfile"],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()
    assert rows[0].split()[:3] == ["TIME", "REQUEST", "CALL"], rows
    assert [r.split()[2:4] for r in rows[1:]] == [["DeleteInferenceProfile", "demo"]] * 2, rows
    assert [r.split()[-2:] for r in rows[1:]] == [["-", "ok"], ["-", "ValidationException"]], rows
    # Columns line up under their headings, however long an ID or ARN is.
    for heading in ["PROFILE", "RAN IN", "RESULT"]:
        at = rows[0].index(heading)
        assert all(r[at - 1] == " " and r[at] != " " for r in rows[1:]), rows


def test_an_application_profile_of_a_model_runs_in_its_region_only(federation):
    import time
    us = client(federation, "bedrock", US_EAST_1)
    source = "arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-lite-v1:0"
    arn = us.create_inference_profile(
        inferenceProfileName="nova-us-east-1", modelSource={"copyFrom": source},
    )["inferenceProfileArn"]
    got = us.get_inference_profile(inferenceProfileIdentifier=arn)
    assert [m["modelArn"] for m in got["models"]] == [source]
    msgs = [{"role": "user", "content": [{"text": "Hi"}]}]
    here = client(federation, "bedrock-runtime", US_EAST_1).converse(modelId=arn, messages=msgs)
    assert here["ResponseMetadata"]["HTTPHeaders"]["x-crisp-inference-region"] == "us-east-1"
    # Called in another region it is refused, never run there.
    rt = client(federation, "bedrock-runtime", EU_WEST_2)
    deadline = time.time() + 10
    while True:
        try:
            rt.converse(modelId=arn, messages=msgs)
            raise AssertionError("ran outside us-east-1")
        except rt.exceptions.ResourceNotFoundException:
            assert time.time() < deadline, "the profile never became visible on eu-west-2"
            time.sleep(0.3)
        except rt.exceptions.ValidationException as e:
            assert "runs only there" in str(e) and "us-east-1" in str(e)
            break
    us.delete_inference_profile(inferenceProfileIdentifier=arn)


def test_bedrock_calls_are_authorized_per_principal(federation):
    eu_akid, eu_secret = "AKIACRISPEUSEARCH001", "crisp-eu-search-secret-loopback-only"
    rt = client(federation, "bedrock-runtime", US_EAST_1, akid=eu_akid, secret=eu_secret)
    msgs = [{"role": "user", "content": [{"text": "x"}]}]
    r = rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs, inferenceConfig={"maxTokens": 2})
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-crisp-inference-region"] in EU
    with pytest.raises(rt.exceptions.AccessDeniedException) as e:
        rt.converse(modelId="global.amazon.nova-lite-v1:0", messages=msgs)
    assert "guardrail" in str(e.value)
    bedrock = client(federation, "bedrock", US_EAST_1, akid=eu_akid, secret=eu_secret)
    assert bedrock.get_inference_profile(inferenceProfileIdentifier="eu.amazon.nova-lite-v1:0")["status"] == "ACTIVE"
    with pytest.raises(bedrock.exceptions.AccessDeniedException):
        bedrock.create_inference_profile(
            inferenceProfileName="not-allowed",
            modelSource={"copyFrom": "eu.amazon.nova-lite-v1:0"},
        )


def test_count_tokens_says_what_a_prompt_is_billed(federation):
    rt = client(federation, "bedrock-runtime", EU_WEST_2)
    msgs = [{"role": "user", "content": [{"text": "How many tokens is this?"}]}]
    system = [{"text": "Be brief."}]
    counted = rt.count_tokens(modelId="eu.amazon.nova-lite-v1:0",
                              input={"converse": {"messages": msgs, "system": system}})["inputTokens"]
    # The same conversation as an InvokeModel body counts the same.
    body = json.dumps({"messages": msgs, "system": system}).encode()
    assert rt.count_tokens(modelId="eu.amazon.nova-lite-v1:0",
                           input={"invokeModel": {"body": body}})["inputTokens"] == counted
    # What the model then bills for that prompt.
    used = rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=msgs, system=system,
                       inferenceConfig={"maxTokens": 2})["usage"]["inputTokens"]
    assert counted == used > 0
    with pytest.raises(rt.exceptions.ResourceNotFoundException):
        rt.count_tokens(modelId="eu.amazon.nova-lite", input={"converse": {"messages": msgs}})
    with pytest.raises(rt.exceptions.ValidationException) as e:
        rt.count_tokens(modelId="eu.amazon.nova-lite-v1:0", input={"converse": {"messages": []}})
    assert "at least one message" in str(e.value)
    # Counting is invoking's business: a principal kept out of a profile may not count with it.
    eu = client(federation, "bedrock-runtime", US_EAST_1,
                akid="AKIACRISPEUSEARCH001", secret="crisp-eu-search-secret-loopback-only")
    with pytest.raises(eu.exceptions.AccessDeniedException):
        eu.count_tokens(modelId="global.amazon.nova-lite-v1:0", input={"converse": {"messages": msgs}})
