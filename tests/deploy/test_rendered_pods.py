"""The chart's pods, run for real: two regions' rendered StatefulSets are started as the
real `crisp` binary, each in a network namespace of its own standing in for a pod (its own
address, the same ports), as the pod's user (runAsUser, runAsGroup, fsGroup), with its
volumes laid out as the kubelet would (the configuration and certificates not writable by
it, the data volume writable through fsGroup), and with the regions' names resolving to
their pods' addresses, as DNS would to their Services.

This shows that what the chart renders works with crisp: the arguments and mounts, the
access files projected next to the configuration from their Secret (a request without the
API key is refused, one with it served), a node that writes only to its data volume, listening on the pod's interfaces while the other
region dials the configured names, the backbone between the pods over mutual TLS, the
probes and the scrape port.

Needs root (network namespaces), as CI has. Only addresses inside the namespaces this test
creates are used.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))
import validate  # noqa: E402

CRISP = os.environ.get("CRISP_BIN", str(ROOT / "target" / "debug" / "crisp"))
NOVA = "amazon.nova-lite-v1:0"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 for network namespaces",
)

CONFIG = """
version = 1

[deployment]
name = "rehearsal"

[access]
principals = "principals.toml"
keys = "keys.toml"
policies = ["policies/ops.cedar"]

[routing]
stale_after_ms = 1500
telemetry_interval_ms = 100

[[geography]]
name = "eu"
tags = ["eu"]

[[region]]
code = "eu-central-1"
country = "DE"
lat = 50.1
lon = 8.7
tags = ["eu"]
client = "api.eu-central-1.crisp.test:8080"
peer = "peer.eu-central-1.crisp.test:9080"
admin = "admin.eu-central-1.crisp.test:10080"

[[region]]
code = "eu-west-1"
country = "IE"
lat = 53.3
lon = -6.3
tags = ["eu"]
client = "api.eu-west-1.crisp.test:8080"
peer = "peer.eu-west-1.crisp.test:9080"
admin = "admin.eu-west-1.crisp.test:10080"

[[model]]
id = "amazon.nova-lite-v1:0"
input_price_per_1k = 0.00006
output_price_per_1k = 0.00024

# Only Dublin runs the model: a request to Frankfurt must cross the backbone.
[[model.backend]]
region = "eu-west-1"
kind = "simulated"
slots = 4
queue_limit = 4
max_tokens = 8
"""


def run(*args, **kw):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, **kw)


def sh(*args):
    r = run(*args)
    assert r.returncode == 0, f"{' '.join(args)}: {r.stderr}"
    return r.stdout


class Pod:
    """One rendered pod in a network namespace."""

    def __init__(self, region, ns, ip, rendered, secret_files, volumes_dir):
        """`secret_files` maps each Secret key the pod may name to the file holding it."""
        self.region, self.ns, self.ip = region, ns, ip
        sts = next(o for o in rendered if o["kind"] == "StatefulSet")
        self.configmap = next(o for o in rendered if o["kind"] == "ConfigMap")
        self.secret_files = secret_files
        spec = sts["spec"]["template"]["spec"]
        (self.container,) = spec["containers"]
        assert "hostAliases" not in spec, "every name is left to DNS"
        self.ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.annotations = sts["spec"]["template"]["metadata"]["annotations"]
        security = spec["securityContext"]
        self.uid, self.gid = security["runAsUser"], security["runAsGroup"]
        self.fs_group = security["fsGroup"]

        # Lay out each mounted volume in a directory, as the kubelet would: ConfigMap and
        # Secret files owned by root, readable through fsGroup with the volume's mode, in
        # directories the pod's user cannot write; emptyDirs and the data volume writable
        # through fsGroup.
        volumes = {v["name"]: v for v in spec["volumes"]}
        self.paths = {}
        for mount in self.container["volumeMounts"]:
            volume = volumes.get(mount["name"], {"emptyDir": {}})
            local = volumes_dir / region / mount["name"]
            local.mkdir(parents=True)
            os.chmod(local.parent, 0o711)
            if "configMap" in volume:
                self.project(local, [volume], 0o644)
            elif "secret" in volume:
                self.project(local, [volume], volume["secret"]["defaultMode"])
            elif "projected" in volume:
                projected = volume["projected"]
                self.project(local, projected["sources"], projected["defaultMode"])
            else:
                os.chown(local, 0, self.fs_group)
                os.chmod(local, 0o2775)
            self.paths[mount["mountPath"]] = str(local)

    def project(self, local, sources, mode):
        for source in sources:
            if "configMap" in source:
                assert source["configMap"]["name"] == self.configmap["metadata"]["name"]
                files = {key: text.encode() for key, text in self.configmap["data"].items()}
                items = [{"key": key, "path": key} for key in files]
            else:
                items = source["secret"]["items"]
                files = {i["key"]: self.secret_files[i["key"]].read_bytes() for i in items}
            for item in items:
                target = local / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(target.parent, 0o755)
                target.write_bytes(files[item["key"]])
                os.chown(target, 0, self.fs_group)
                os.chmod(target, mode)
        os.chmod(local, 0o755)

    def argv(self, binary):
        out = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
               f"--groups={self.fs_group}", "--", str(binary)]
        for arg in self.container["args"]:
            flag, eq, path = arg.partition("=")
            if eq and path.startswith("/"):
                mount_path = max((m for m in self.paths if path == m or path.startswith(m + "/")),
                                 key=len)
                arg = f"{flag}={self.paths[mount_path]}{path[len(mount_path):]}"
            out.append(arg)
        return out

    def env(self):
        env = dict(os.environ)
        env.update({e["name"]: e["value"] for e in self.container.get("env", [])})
        return env


def hosts(pods):
    """/etc/hosts as the kubelet writes it, plus what DNS would answer for every region's
    names: its pod's address, standing in for its Services."""
    lines = ["127.0.0.1 localhost"]
    ips = {pod.region: pod.ip for pod in pods}
    for region in tomllib.loads(CONFIG)["region"]:
        names = sorted({region[w].rsplit(":", 1)[0] for w in ("client", "peer", "admin")})
        lines.append(f"{ips[region['code']]} {' '.join(names)}")
    return "\n".join(lines) + "\n"


def http(ns, url, *extra):
    """curl from inside namespace `ns`: returns (status, headers, body)."""
    r = run("ip", "netns", "exec", ns, "curl", "-s", "-m", "10", "-D", "-", *extra, url)
    if r.returncode != 0:
        return None, "", ""
    # text mode has turned the header block's CRLFs into LFs
    head, _, body = r.stdout.partition("\n\n")
    status = int(head.split()[1])
    return status, head.lower(), body


def wait_for(predicate, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def metric(text, name, **labels):
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def pods(tmp_path):
    tag = f"{os.getpid() % 100000}"
    regions = [("eu-central-1", f"crt-{tag}-a", "10.213.0.1"),
               ("eu-west-1", f"crt-{tag}-b", "10.213.0.2")]
    (tmp_path / "crisp.toml").write_text(CONFIG)
    sh(CRISP, "profiles", "lock", "--config", str(tmp_path / "crisp.toml"))
    certs = tmp_path / "certs"
    sh(CRISP, "certs", "init", "--deployment", "rehearsal", "--dir", str(certs))
    for region, _, _ in regions:
        sh(CRISP, "certs", "issue", "--deployment", "rehearsal", "--region", region,
           "--dir", str(certs))
    lock = (tmp_path / "crisp.lock").read_text()
    # Access control: one principal, its key, a policy; the chart projects them from the
    # access Secret.
    (tmp_path / "principals.toml").write_text('[[principal]]\nid = "ops"\nteam = "ops"\n')
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "ops.cedar").write_text(
        'permit (principal in Crisp::Team::"ops", action in [Crisp::Action::"InvokeModel",'
        ' Crisp::Action::"InvokeModelWithResponseStream"], resource);\n')
    api_key = sh(CRISP, "keys", "create", "--config", str(tmp_path / "crisp.toml"),
                 "--principal", "ops").strip()
    secret_files = {p.name: p for p in [*(tmp_path / "certs").iterdir(),
                                        tmp_path / "principals.toml", tmp_path / "keys.toml",
                                        tmp_path / "policies" / "ops.cedar"]}

    made_ns, made_hosts, procs = [], [], []
    veth = (f"crta{tag}", f"crtb{tag}")
    # The pods' user reaches only this directory: the volumes and a copy of the binary.
    volumes_dir = Path(tempfile.mkdtemp(prefix="crisp-pods-"))
    os.chmod(volumes_dir, 0o711)
    binary = volumes_dir / "crisp"
    shutil.copy(CRISP, binary)
    os.chmod(binary, 0o755)
    try:
        pods = []
        for (region, ns, ip) in regions:
            rendered = validate.render({"region": region, "config": CONFIG, "lock": lock})
            validate.validate(rendered)
            pods.append(Pod(region, ns, ip, rendered, secret_files, volumes_dir))
            sh("ip", "netns", "add", ns)
            made_ns.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", veth[0], "netns", regions[0][1], "type", "veth",
           "peer", "name", veth[1], "netns", regions[1][1])
        for (_, ns, ip), dev in zip(regions, veth):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for pod in pods:
            etc = Path("/etc/netns") / pod.ns
            etc.mkdir(parents=True)
            made_hosts.append(etc)
            (etc / "hosts").write_text(hosts(pods))
        for pod in pods:
            log = open(tmp_path / f"{pod.region}.log", "w")
            procs.append(subprocess.Popen(["ip", "netns", "exec", pod.ns, *pod.argv(binary)],
                                          env=pod.env(), stdout=log, stderr=log))
        yield pods, procs, tmp_path, api_key
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        for ns in made_ns:
            run("ip", "netns", "del", ns)
        for etc in made_hosts:
            shutil.rmtree(etc, ignore_errors=True)
        shutil.rmtree(volumes_dir, ignore_errors=True)
        try:
            os.rmdir("/etc/netns")
        except OSError:
            pass


def test_rendered_pods_serve_and_forward_over_the_backbone(pods):
    (frankfurt, dublin), procs, tmp, api_key = pods

    def logs():
        return "\n".join((tmp / f"{p.region}.log").read_text() for p in (frankfurt, dublin))

    # The kubelet probes each pod's address on the ports the probes name.
    for pod, prober in ((frankfurt, dublin), (dublin, frankfurt)):
        probe = pod.container["readinessProbe"]["httpGet"]
        url = f"http://{pod.ip}:{pod.ports[probe['port']]}{probe['path']}"

        def ready():
            assert all(p.poll() is None for p in procs), f"a node exited; logs:\n{logs()}"
            return http(prober.ns, url)[0] == 200

        wait_for(ready, lambda: f"{pod.region} ready; logs:\n{logs()}")
        live = pod.container["livenessProbe"]["httpGet"]
        assert http(prober.ns, f"http://{pod.ip}:{pod.ports[live['port']]}{live['path']}")[0] == 200

    # Prometheus scrapes the annotated port; Frankfurt sees Dublin over the backbone.
    scrape = (f"http://{frankfurt.ip}:{frankfurt.annotations['prometheus.io/port']}"
              f"{frankfurt.annotations['prometheus.io/path']}")

    last = {}

    def dublin_reachable():
        status, _, body = http(dublin.ns, scrape)
        last["scrape"] = f"{status} {body}"
        return status == 200 and metric(body, "crisp_region_reachable",
                                         observer="eu-central-1", region="eu-west-1") == 1.0

    wait_for(dublin_reachable, lambda: f"Frankfurt to reach Dublin's peer name; logs:\n{logs()}\nscrape: {last}")

    # A client of Frankfurt calls the EU profile; only Dublin runs the model.
    body = json.dumps({"model": f"eu.{NOVA}", "max_tokens": 4,
                       "messages": [{"role": "user", "content": "hello"}]})
    url = f"http://{frankfurt.ip}:{frankfurt.ports['client']}/v1/chat/completions"
    status, _, answer = http(dublin.ns, url, "-H", "content-type: application/json", "-d", body)
    assert status == 401, answer
    status, headers, answer = http(dublin.ns, url, "-H", "content-type: application/json",
                                   "-H", f"authorization: Bearer {api_key}", "-d", body)
    assert status == 200, answer
    assert "x-crisp-inference-region: eu-west-1" in headers
    assert json.loads(answer)["choices"][0]["message"]["content"]

    _, _, metrics = http(dublin.ns, scrape)
    assert metric(metrics, "crisp_cross_region_requests_total",
                  source="eu-central-1", inference_region="eu-west-1") == 1.0

    # The source region audited the request on its data volume, as the pod's user.
    audit = Path(frankfurt.paths["/var/lib/crisp"]) / "audit" / "eu-central-1"
    assert any(f.stat().st_uid == frankfurt.uid for f in audit.iterdir()), list(audit.iterdir())

    # SIGTERM (after preStop): the node stops cleanly within the pod's grace period.
    grace = validate.render({"region": "eu-central-1", "config": CONFIG, "lock": "version = 1\n"})
    sts = next(o for o in grace if o["kind"] == "StatefulSet")
    procs[0].terminate()
    assert procs[0].wait(timeout=sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]) == 0
