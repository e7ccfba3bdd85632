"""Render the crisp Helm chart offline and validate what it produces.

Rendering uses Helm's own engine (Helm v4's Go SDK, through the `helm-python-sdk` package:
no cluster, no `helm` binary). Every rendered object is validated against the Kubernetes
OpenAPI JSON schemas shipped by `kubernetes-validate`, in strict mode (unknown fields are
errors), for the oldest and the newest Kubernetes version the chart supports.
Nothing is downloaded.

Validate your own values before installing:

    .venv/bin/python deploy/validate.py -f values-eu-central-1.yaml \
        --config crisp.toml --lock crisp.lock

Requirements: tests/deploy/requirements.txt (scripts/test.sh installs them into .venv).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parent / "helm" / "crisp"

# The chart's kubeVersion floor, and the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())

# Custom resources have no schema in the Kubernetes OpenAPI documents. The chart may
# render only these, and each is checked by hand in check_custom_resource.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


class InvalidManifest(Exception):
    """A rendered object is not valid Kubernetes."""


def render(
    values: dict[str, Any], release: str = "crisp", namespace: str = "crisp"
) -> list[dict[str, Any]]:
    """Renders the chart with `values` (over its defaults), like `helm template`, and returns
    the objects. Raises helm_python.HelmError when values or templates are rejected."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc:
                raise InvalidManifest(f"{path}: a document that is not a Kubernetes object")
            objects.append(doc)
    return objects


def lint(values: dict[str, Any]) -> list[str]:
    """Helm's chart linter; returns its errors (warnings and infos are not errors)."""
    report = helm.lint(CHART, values)
    problems = [str(e) for e in report.get("errors") or []]
    problems += [
        f"{m['path']}: {m['error']}"
        for m in report.get("messages") or []
        if m.get("severity", 0) >= 3  # ERROR
    ]
    return problems


def check_custom_resource(obj: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    if obj["kind"] == "ServiceMonitor":
        spec = obj.get("spec", {})
        selector = spec.get("selector", {}).get("matchLabels", {})
        services = [
            s
            for s in objects
            if s["kind"] == "Service"
            and selector.items() <= s["metadata"].get("labels", {}).items()
        ]
        if len(services) != 1:
            raise InvalidManifest(
                f"ServiceMonitor {obj['metadata']['name']} selects {len(services)} Services, not one"
            )
        port_names = {p.get("name") for p in services[0]["spec"]["ports"]}
        for endpoint in spec.get("endpoints", []):
            if endpoint.get("port") not in port_names:
                raise InvalidManifest(
                    f"ServiceMonitor {obj['metadata']['name']} scrapes port "
                    f"{endpoint.get('port')!r}, which Service {services[0]['metadata']['name']} "
                    f"does not have ({sorted(port_names)})"
                )


def validate(objects: list[dict[str, Any]]) -> None:
    """Validates every object against the Kubernetes schemas; raises InvalidManifest."""
    if not objects:
        raise InvalidManifest("the chart rendered nothing")
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_KINDS:
            check_custom_resource(obj, objects)
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.absolute_path)
                raise InvalidManifest(
                    f"{name} is not valid for Kubernetes {version}: {path}: {e.message}"
                ) from None
            except kubernetes_validate.SchemaNotFoundError:
                raise InvalidManifest(
                    f"{name}: no Kubernetes {version} schema for {obj.get('apiVersion')} "
                    f"{obj.get('kind')}; the chart must render only built-in kinds "
                    f"(or ones listed in CUSTOM_KINDS with a check of their own)"
                ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-f", "--values", action="append", default=[], type=Path)
    parser.add_argument("--config", type=Path, required=True, help="the crisp configuration")
    parser.add_argument("--lock", type=Path, required=True, help="the crisp lock file")
    parser.add_argument("--release", default="crisp")
    parser.add_argument("--namespace", default="crisp")
    args = parser.parse_args(argv)

    values: dict[str, Any] = {}
    for path in args.values:
        values = deep_merge(values, yaml.safe_load(path.read_text()) or {})
    values["config"] = args.config.read_text()
    values["lock"] = args.lock.read_text()
    try:
        problems = lint(values)
        if problems:
            raise InvalidManifest("helm lint: " + "; ".join(problems))
        objects = render(values, args.release, args.namespace)
        validate(objects)
    except (helm.HelmError, InvalidManifest) as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1
    kinds = ", ".join(sorted({o["kind"] for o in objects}))
    print(
        f"valid: {len(objects)} objects ({kinds}) for Kubernetes "
        f"{' and '.join(KUBERNETES_VERSIONS)}"
    )
    return 0


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


if __name__ == "__main__":
    sys.exit(main())
