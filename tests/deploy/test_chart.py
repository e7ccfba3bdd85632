"""The Helm chart, rendered by Helm's engine and validated against the Kubernetes schemas,
and the properties a crisp node needs from it (ports from the configuration, bindable
addresses, certificates that can rotate, draining, a locked-down pod)."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))
import validate  # noqa: E402

EXAMPLES = ROOT / "deploy" / "examples"
CONFIG_TEXT = (EXAMPLES / "crisp.toml").read_text()
LOCK_TEXT = (EXAMPLES / "crisp.lock").read_text()
CONFIG = tomllib.loads(CONFIG_TEXT)
REGIONS = [r["code"] for r in CONFIG["region"]]
CRISP = os.environ.get("CRISP_BIN", str(ROOT / "target" / "debug" / "crisp"))


def example_values(region):
    values = yaml.safe_load((EXAMPLES / f"values-{region}.yaml").read_text())
    values["config"] = CONFIG_TEXT
    values["lock"] = LOCK_TEXT
    return values


def minimal_values(region="eu-central-1", config=CONFIG_TEXT, lock=LOCK_TEXT):
    return {"region": region, "config": config, "lock": lock}


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind, name=None):
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def render_error(values):
    with pytest.raises(helm.HelmError) as e:
        validate.render(values)
    return str(e.value)


def host_port(address):
    host, port = address.rsplit(":", 1)
    return host, int(port)


def test_example_config_is_valid_and_its_lock_is_current():
    check = subprocess.run(
        [CRISP, "check", "--config", str(EXAMPLES / "crisp.toml")],
        capture_output=True, text=True, timeout=60,
    )
    assert check.returncode == 0, check.stderr
    plan = subprocess.run(
        [CRISP, "profiles", "plan", "--config", str(EXAMPLES / "crisp.toml")],
        capture_output=True, text=True, timeout=60,
    )
    assert plan.returncode == 0, plan.stderr
    assert "is up to date with the fleet" in plan.stdout, plan.stdout


@pytest.mark.parametrize("region", REGIONS)
def test_example_values_render_to_valid_kubernetes(region):
    values = example_values(region)
    assert validate.lint(values) == []
    objects = validate.render(values, release=f"crisp-{region}")
    validate.validate(objects)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["ConfigMap", "Service", "Service", "Service", "ServiceAccount", "ServiceMonitor", "StatefulSet"]
    )


@pytest.mark.parametrize("region", REGIONS)
def test_the_pod_serves_the_region_from_the_configuration(region):
    objects = validate.render(example_values(region), release=f"crisp-{region}")
    entry = next(r for r in CONFIG["region"] if r["code"] == region)
    sts = one(objects, "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[0] == "serve"
    assert f"--region={region}" in args
    assert "--log-format=json" in args

    # Every path given to crisp is inside a mounted volume.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for flag in ("--config=", "--lock=", "--certs=", "--data-dir="):
        (path,) = [a[len(flag):] for a in args if a.startswith(flag)]
        assert any(path == m or path.startswith(m + "/") for m in mounts), (flag, path, mounts)

    # The ports are the configuration's, and the probes use the admin listener.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {w: host_port(entry[w])[1] for w in ("client", "peer", "admin")}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["admin"])
    assert annotations["prometheus.io/path"] == "/metrics"

    # The node listens on every interface of its pod; every name is left to DNS. What it
    # writes goes to the data volume, never to the read-only configuration.
    assert "--listen=0.0.0.0" in args
    assert "hostAliases" not in pod
    (data_dir,) = [a[len("--data-dir="):] for a in args if a.startswith("--data-dir=")]
    assert mounts[data_dir]["name"] == "data" and not mounts[data_dir].get("readOnly")
    assert mounts["/etc/crisp/config"]["readOnly"]

    # Services expose the configured ports and select this pod.
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for name, listener in [(f"crisp-{region}", "client"), (f"crisp-{region}-peer", "peer"),
                           (f"crisp-{region}-admin", "admin")]:
        svc = one(objects, "Service", name)
        assert svc["spec"]["selector"].items() <= labels.items()
        (port,) = svc["spec"]["ports"]
        assert port["port"] == ports[listener] and port["targetPort"] == listener
    assert one(objects, "Service", f"crisp-{region}-peer")["spec"]["type"] == "LoadBalancer"
    assert sts["spec"]["serviceName"] == f"crisp-{region}-admin"

    # The configuration and lock are shipped verbatim.
    cm = one(objects, "ConfigMap")
    assert cm["data"]["crisp.toml"].strip() == CONFIG_TEXT.strip()
    assert cm["data"]["crisp.lock"].strip() == LOCK_TEXT.strip()


@pytest.mark.parametrize("region", REGIONS)
def test_certificates_are_mounted_so_that_rotation_reaches_the_node(region):
    objects = validate.render(example_values(region), release=f"crisp-{region}")
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    certs = next(v for v in pod["volumes"] if v["name"] == "certs")["secret"]
    assert certs["secretName"] == f"crisp-{region}-certs"
    assert sorted(i["key"] for i in certs["items"]) == sorted(
        ["ca.pem", f"{region}.pem", f"{region}.key"]
    )
    # A subPath mount would pin the first version of the files forever.
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "certs"]
    assert "subPath" not in mount and mount["readOnly"]
    certs_flag = next(a for a in container["args"] if a.startswith("--certs="))
    assert certs_flag == "--certs=" + mount["mountPath"]


def test_the_pod_is_locked_down():
    objects = validate.render(example_values("eu-central-1"), release="crisp-eu-central-1")
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "requests" in container["resources"]
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]


def test_the_pod_outlives_its_drain():
    """terminationGracePeriodSeconds covers the preStop pause plus crisp serve's drain
    grace, which is read from the node's source so that the two cannot drift apart."""
    source = (ROOT / "crates" / "node" / "src" / "lib.rs").read_text()
    m = re.search(r"grace: Duration::from_secs\((\d+)\)", source)
    assert m, "the default drain grace moved; update this test and the chart's lifecycle values"
    grace = int(m.group(1))
    chart_values = yaml.safe_load((validate.CHART / "values.yaml").read_text())
    assert chart_values["lifecycle"]["drainSeconds"] == grace

    objects = validate.render(minimal_values())
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause > 0
    assert pod["terminationGracePeriodSeconds"] > pause + grace


def test_local_data_has_a_volume_at_var_lib_crisp():
    objects = validate.render(minimal_values())
    sts = one(objects, "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert mount["mountPath"] == "/var/lib/crisp"

    values = minimal_values()
    values["persistence"] = {"enabled": False}
    objects = validate.render(values)
    validate.validate(objects)
    sts = one(objects, "StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    data = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    assert "emptyDir" in data


def test_variants_render_to_valid_kubernetes():
    values = minimal_values()
    values["clientTls"] = {"enabled": True, "secretName": "crisp-api-tls"}
    values["metrics"] = {"podAnnotations": False, "serviceMonitor": {"enabled": False}}
    values["service"] = {"client": {"type": "NodePort", "externalTrafficPolicy": "Local"}}
    objects = validate.render(values)
    validate.validate(objects)
    assert not by_kind(objects, "ServiceMonitor")
    sts = one(objects, "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert "--client-cert=/etc/crisp/client-tls/tls.crt" in container["args"]
    assert "--client-key=/etc/crisp/client-tls/tls.key" in container["args"]
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.io/scrape" not in annotations


def test_config_changes_roll_the_pod():
    def checksum(config):
        objects = validate.render(minimal_values(config=config))
        return one(objects, "StatefulSet")["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]

    assert checksum(CONFIG_TEXT) == checksum(CONFIG_TEXT)
    assert checksum(CONFIG_TEXT) != checksum(CONFIG_TEXT.replace("deadline_ms = 60000", "deadline_ms = 30000"))


def test_every_region_of_one_cluster_gets_its_own_names():
    """All regions installed in one namespace (a staging cluster) do not collide."""
    names = {}
    for region in REGIONS:
        for o in validate.render(minimal_values(region), release="crisp"):
            key = (o["kind"], o["metadata"]["name"])
            assert key not in names, f"{key} rendered for both {names[key]} and {region}"
            names[key] = region


def test_single_cluster_addresses_are_the_services_names():
    config = CONFIG_TEXT
    for region in REGIONS:
        for what, svc in (("api", ""), ("peer", "-peer"), ("admin", "-admin")):
            config = config.replace(
                f"{what}.{region}.crisp.example.net",
                f"crisp-{region}{svc}.crisp.svc.cluster.local",
            )
    values = minimal_values("eu-west-1", config=config)
    values["listen"] = "::"
    objects = validate.render(values, release="crisp")
    validate.validate(objects)
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert "--listen=::" in pod["containers"][0]["args"]
    assert {s["metadata"]["name"] for s in by_kind(objects, "Service")} == {
        "crisp-eu-west-1", "crisp-eu-west-1-peer", "crisp-eu-west-1-admin"
    }


def test_access_files_are_projected_next_to_the_configuration_from_a_secret():
    objects = validate.render(minimal_values(), release="crisp")
    validate.validate(objects)
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    (config,) = [v for v in pod["volumes"] if v["name"] == "config"]
    configmap, secret = config["projected"]["sources"]
    assert configmap["configMap"]["name"] == "crisp-eu-central-1-config"
    assert secret["secret"]["name"] == "crisp-eu-central-1-access"
    assert secret["secret"]["items"] == [
        {"key": "principals.toml", "path": "principals.toml"},
        {"key": "keys.toml", "path": "keys.toml"},
        {"key": "teams.cedar", "path": "policies/teams.cedar"},
        {"key": "guardrails.cedar", "path": "policies/guardrails.cedar"},
    ]
    # Readable by the node's group (fsGroup) only: keys.toml holds SigV4 secrets.
    assert config["projected"]["defaultMode"] == 0o440

    # Without [access] the configuration is mounted alone.
    open_config = re.sub(r"(?ms)^\[access\]\n.*?\n\n", "", CONFIG_TEXT)
    assert "[access]" not in open_config
    objects = validate.render(minimal_values(config=open_config))
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    (config,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert "configMap" in config and "projected" not in config

    # A Secret the node would never read, or files that cannot be projected, are refused.
    values = minimal_values(config=open_config)
    values["access"] = {"secretName": "crisp-access"}
    assert "no [access] section" in render_error(values)
    absolute = CONFIG_TEXT.replace('keys = "keys.toml"', 'keys = "/etc/crisp/keys.toml"')
    assert "relative" in render_error(minimal_values(config=absolute))
    twice = CONFIG_TEXT.replace('"policies/guardrails.cedar"', '"guardrails/teams.cedar"')
    assert "two files called teams.cedar" in render_error(minimal_values(config=twice))


# Bad input: each mistake is refused at render time with a message saying what to do.


def test_missing_region_config_or_lock_are_refused_with_what_to_set():
    assert "--set region=" in render_error({"config": CONFIG_TEXT, "lock": LOCK_TEXT})
    assert "--set-file config=crisp.toml" in render_error({"region": "eu-west-1", "lock": LOCK_TEXT})
    message = render_error({"region": "eu-west-1", "config": CONFIG_TEXT})
    assert "--set-file lock=crisp.lock" in message and "crisp profiles lock" in message


def test_a_region_not_in_the_configuration_is_refused_with_the_known_ones():
    message = render_error(minimal_values("eu-south-1"))
    assert 'region "eu-south-1" is not in the configuration' in message
    assert "eu-central-1, eu-west-1, us-east-1" in message


def test_an_unparseable_configuration_is_refused():
    message = render_error(minimal_values(config="version = 1\n[[region]\n"))
    assert "not valid TOML" in message and "crisp check" in message


def test_a_region_without_admin_address_is_refused():
    config = CONFIG_TEXT.replace('admin = "admin.eu-west-1.crisp.example.net:10080"\n', "")
    assert "region eu-west-1 has no admin address" in render_error(minimal_values("eu-west-1", config=config))
    # Other regions' releases do not need it.
    validate.validate(validate.render(minimal_values("eu-central-1", config=config)))


def test_loopback_and_wildcard_peer_addresses_are_refused():
    config = CONFIG_TEXT.replace("admin.eu-west-1.crisp.example.net:10080", "127.0.0.1:10080")
    assert "loopback address" in render_error(minimal_values("eu-west-1", config=config))
    config = CONFIG_TEXT.replace("peer.eu-west-1.crisp.example.net:9080", "0.0.0.0:9080")
    assert "not a wildcard" in render_error(minimal_values("eu-west-1", config=config))


def test_values_with_typos_or_an_empty_listen_host_are_refused():
    values = minimal_values()
    values["persistance"] = {"enabled": False}
    assert "persistance" in render_error(values)
    values = minimal_values()
    values["listen"] = ""
    assert "listen" in render_error(values)


def test_the_validator_rejects_invalid_objects():
    """The schema check can fail: a field Kubernetes does not know, a wrong type."""
    objects = validate.render(minimal_values())
    broken = copy.deepcopy(objects)
    one(broken, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"][
        "httpGet"]["paht"] = "/readyz"
    with pytest.raises(validate.InvalidManifest, match="paht"):
        validate.validate(broken)
    broken = copy.deepcopy(objects)
    one(broken, "Service", "crisp-eu-central-1")["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(validate.InvalidManifest, match="Service/crisp-eu-central-1"):
        validate.validate(broken)
    with pytest.raises(validate.InvalidManifest, match="no Kubernetes"):
        validate.validate(objects + [{"apiVersion": "example.com/v1", "kind": "Widget",
                                      "metadata": {"name": "w"}}])


def test_the_validator_cli_reports_valid_and_invalid_values(tmp_path):
    args = ["--config", str(EXAMPLES / "crisp.toml"), "--lock", str(EXAMPLES / "crisp.lock")]
    ok = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "validate.py"), "-f",
         str(EXAMPLES / "values-us-east-1.yaml"), *args],
        capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("valid: 7 objects")
    bad = tmp_path / "bad.yaml"
    bad.write_text("region: us-east-1\nservice:\n  peer:\n    type: Ingress\n")
    failed = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "validate.py"), "-f", str(bad), *args],
        capture_output=True, text=True, timeout=120,
    )
    assert failed.returncode == 1
    assert "invalid:" in failed.stderr and "type" in failed.stderr
