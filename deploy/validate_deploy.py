"""Checks of the deployment files beyond their schemas (run by deploy/validate.sh).

    python deploy/validate_deploy.py compose deploy/docker-compose.yml [--secrets DIR]
    python deploy/validate_deploy.py helm deploy/helm/flexfed-coordinator --out DIR
        [--kube-version 1.32.0] [--flexfed-python PYTHON]

``compose``: the layout the design asks for (services, one read-only data volume per owner
mounted into that owner's node only, owners publish no ports, non-root, never the CA key
mounted, the Flower scripts called as their usage lines say) and, with --secrets (a folder
deploy/certs.sh filled), that every file a service reads from a mounted secrets folder is
there. ``helm``: ``helm lint`` and ``helm template`` through the Helm v4 Go SDK (PyPI
helm-python-sdk, libhelm_c), every rendered object validated against the Kubernetes OpenAPI
schemas (kubernetes-validate, strict), the chart's own rules, and the rendered coordinator.toml
loaded by flexfed's own config loader. Exit 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

HERE = Path(__file__).resolve().parent
OWNERS = ("acme", "globex")
# What each service reads from its mounted folders (paths inside the container).
SECRET_FILES = {
    "/etc/flexfed/public": ["ca.pem", "crl.pem"],
    "/etc/flexfed/operator": ["cert.pem", "key.pem"],
    "/etc/flexfed/owner": ["cert.pem", "key.pem", "node-key"],
}
# Flower scripts: (min, max) positional arguments, from their usage lines.
SCRIPT_ARGS = {"superlink.sh": (4, 6), "supernode.sh": (7, 8)}

problems: list[str] = []


def problem(text: str) -> None:
    problems.append(text)


def _volumes(service: Obj) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a service's short- or long-syntax volumes."""
    out = []
    for item in service.get("volumes", []):
        if isinstance(item, str):
            parts = item.split(":")
            source, target = parts[0], parts[1]
            out.append((source, target, len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            out.append((item.get("source", ""), item["target"], bool(item.get("read_only"))))
    return out


def check_compose(path: Path, secrets: Path | None) -> None:
    doc = yaml.safe_load(path.read_text())
    services: Obj = doc.get("services", {})
    expected = {
        "coordinator",
        "coordinator-init",
        "superlink",
        "fleet-proxy",
        *(f"owner-{o}" for o in OWNERS),
    }
    if set(services) != expected:
        problem(f"compose: services are {sorted(services)}, expected {sorted(expected)}")
        return
    declared = set(doc.get("volumes", {}))
    coordinator = services["coordinator"]
    if coordinator.get("command") != ["flexfed", "coordinator", "serve", "/srv/coordinator"]:
        problem("compose: coordinator must run `flexfed coordinator serve /srv/coordinator`")
    if not any(p.endswith(":50051") for p in coordinator.get("ports", [])):
        problem("compose: coordinator must publish port 50051")
    for port in services["superlink"].get("ports", []):
        if not str(port).startswith("127.0.0.1:"):
            problem(f"compose: superlink publishes {port} beyond 127.0.0.1 (Control API: no auth)")
    mounts = {name: _volumes(svc) for name, svc in services.items()}
    for name, svc in services.items():
        user = str(svc.get("user", ""))
        if not user or user.split(":")[0] in ("0", "root"):
            problem(f"compose: {name} must run as a non-root user (has {user!r})")
        if not svc.get("read_only"):
            problem(f"compose: {name} should have a read-only root filesystem")
        for source, target, _ro in mounts[name]:
            if source.startswith("./secrets/ca") or source.rstrip("/") == "./secrets":
                problem(f"compose: {name} mounts {source}: the CA directory holds ca.key")
            if not source.startswith((".", "/", "$")) and source not in declared:
                problem(f"compose: {name} mounts undeclared volume {source}")
            if source.startswith("./secrets/") and not target.startswith("/etc/flexfed/"):
                problem(f"compose: {name} mounts {source} at {target}, not under /etc/flexfed")
            if source.startswith("./secrets/") and not _ro:
                problem(f"compose: {name} mounts {source} writable")
        command = svc.get("command") or []
        if command and command[0].startswith("/opt/flexfed/deploy/flower/"):
            script = Path(command[0]).name
            if not (HERE / "flower" / script).is_file():
                problem(f"compose: {name} runs {script}, which deploy/flower does not have")
            low, high = SCRIPT_ARGS.get(script, (0, 99))
            if not low <= len(command) - 1 <= high:
                problem(f"compose: {name}: {script} takes {low}-{high} arguments")
    superlink_cmd = services["superlink"]["command"]
    if superlink_cmd[1] != "/srv/superlink" or not any(
        t == "/srv/superlink" and s == "superlink" for s, t, _ in mounts["superlink"]
    ):
        problem("compose: the SuperLink's state (its database) must be on the superlink volume")
    for org in OWNERS:
        name, data = f"owner-{org}", f"{org}-data"
        svc = services[name]
        if svc.get("ports") or svc.get("expose"):
            problem(f"compose: {name} must publish nothing (owners only dial out)")
        if data not in declared:
            problem(f"compose: volume {data} is not declared")
        if (data, "/data", True) not in mounts[name]:
            problem(f"compose: {name} must mount {data} read-only at /data")
        for other, vols in mounts.items():
            if other != name and any(s == data for s, _, _ in vols):
                problem(f"compose: {other} mounts {data}, which belongs to {name}")
        if (f"./secrets/{org}", "/etc/flexfed/owner", True) not in mounts[name]:
            problem(f"compose: {name} must mount ./secrets/{org} (its own keys only)")
        if svc.get("environment", {}).get("FLEXFED_COORDINATOR") != "coordinator:50051":
            problem(f"compose: {name} should pin FLEXFED_COORDINATOR=coordinator:50051")
        if svc["command"][1] != "fleet-proxy:9443":
            problem(f"compose: {name} must dial fleet-proxy:9443 (the Fleet API only)")
        if set(svc.get("networks", [])) & set(services["superlink"].get("networks", [])):
            problem(f"compose: {name} shares a network with the SuperLink (its Control API)")
    proxy = services["fleet-proxy"].get("command", [])
    if proxy[:3] != ["flexfed", "coordinator", "fleet-proxy"] or (
        "--superlink=superlink:8000" not in proxy
    ):
        problem("compose: fleet-proxy must run `flexfed coordinator fleet-proxy` to superlink:8000")
    if secrets is not None:
        for name in services:
            for source, target, _ in mounts[name]:
                if not source.startswith("./secrets/"):
                    continue
                folder = secrets / source.removeprefix("./secrets/")
                for file in SECRET_FILES.get(target, []):
                    if not (folder / file).is_file():
                        problem(
                            f"compose: {name} reads {target}/{file}; {folder / file} is missing"
                        )


def _lint(chart: Path, values: Obj | None, helm: Any) -> list[str]:
    report = helm.lint(str(chart), values)
    out = [f"helm lint: {e}" for e in report.get("errors") or []]
    for message in report.get("messages") or []:
        # severities: 1 info, 2 warning, 3 error
        if message.get("severity", 0) >= 2:
            out.append(f"helm lint: {message.get('path')}: {message.get('error')}")
    return out


def _objects(rendered: dict[str, str]) -> list[tuple[str, Obj]]:
    objects = []
    for template, text in sorted(rendered.items()):
        if not template.endswith(".yaml"):
            continue
        for obj in yaml.safe_load_all(text):
            if obj:
                objects.append((template, obj))
    return objects


def _containers(obj: Obj) -> list[Obj]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def check_helm(chart: Path, out: Path, kube_version: str, flexfed_python: str | None) -> None:
    import helm_python as helm
    import kubernetes_validate

    ci_values = helm.values_from_yaml((chart / "ci" / "test-values.yaml").read_text())
    problems.extend(_lint(chart, ci_values, helm))
    with helm.Chart.load(str(chart)) as loaded:
        try:
            loaded.render(None, name="flexfed-coordinator", namespace="consortium")
            problem("helm: rendering without the anchor and log origin should fail (required)")
        except helm.HelmError as err:
            if "coordinator.anchor.digest" not in str(err) and "logOrigin" not in str(err):
                problem(f"helm: default values fail for another reason: {err}")
        rendered = loaded.render(ci_values, name="flexfed-coordinator", namespace="consortium")
        no_link = loaded.render(
            {**ci_values, "superlink": {"enabled": False}},
            name="flexfed-coordinator",
            namespace="consortium",
        )
    objects = _objects(rendered)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flexfed-coordinator.yaml").write_text(
        "".join(f"---\n# {t}\n{yaml.safe_dump(o, sort_keys=False)}" for t, o in objects)
    )
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for _, o in objects)
    for template, obj in objects:
        where = f"{template} {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            problem(f"kubernetes {kube_version}: {where}: {err.message} at {list(err.path)}")
        if obj["kind"] == "Secret":
            problem(f"helm: {where}: the chart must reference Secrets, not create them")
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        if pod is None:
            continue
        context = pod.get("securityContext", {})
        if not context.get("runAsNonRoot") or not context.get("runAsUser"):
            problem(f"helm: {where}: pod must run as a non-root uid")
        for container in _containers(obj):
            name = f"{where} container {container['name']}"
            sc = container.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False or not sc.get(
                "readOnlyRootFilesystem"
            ):
                problem(f"helm: {name}: needs allowPrivilegeEscalation false, read-only root")
            if not container.get("resources", {}).get("requests"):
                problem(f"helm: {name}: no resource requests")
        for container in pod.get("containers", []):
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in container:
                    problem(f"helm: {where} container {container['name']}: no {probe}")
    expected = {"ConfigMap", "Service", "StatefulSet", "Deployment", "PersistentVolumeClaim"}
    if {o["kind"] for _, o in objects} != expected:
        problem(f"helm: rendered {kinds}, expected the kinds {sorted(expected)}")
    if any("superlink" in o["metadata"]["name"] for _, o in _objects(no_link)):
        problem("helm: superlink.enabled=false still renders SuperLink objects")
    statefulset = next(o for _, o in objects if o["kind"] == "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    main = pod["containers"][0]
    if main.get("command") != ["flexfed", "coordinator", "serve", "/srv/coordinator"]:
        problem("helm: the coordinator must run `flexfed coordinator serve /srv/coordinator`")
    if "healthcheck.py" not in " ".join(main["readinessProbe"].get("exec", {}).get("command", [])):
        problem("helm: the coordinator's readiness must be its gRPC health service")
    if not statefulset["spec"].get("volumeClaimTemplates"):
        problem("helm: the coordinator directory needs a PersistentVolumeClaim")
    config = next(o for _, o in objects if o["kind"] == "ConfigMap")["data"]["coordinator.toml"]
    _check_coordinator_toml(config, flexfed_python)
    print(f"helm: rendered {len(objects)} objects: {', '.join(kinds)}")


def _check_coordinator_toml(text: str, flexfed_python: str | None) -> None:
    """Load the rendered coordinator.toml with flexfed's own loader (flexfed.server.config)."""
    if flexfed_python is None:
        print("helm: coordinator.toml not loaded (no Python with flexfed given)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "coordinator.toml").write_text(text)
        code = (
            "import sys; from flexfed.server.config import load_config; "
            "c = load_config(sys.argv[1]); print(c.listen, c.tls.cert, c.anchor.family)"
        )
        result = subprocess.run(
            [flexfed_python, "-c", code, tmp], capture_output=True, text=True, check=False
        )
    if result.returncode != 0:
        problem(f"helm: flexfed rejects the rendered coordinator.toml: {result.stderr.strip()}")
    else:
        print(f"helm: coordinator.toml loads in flexfed: {result.stdout.strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    compose = sub.add_parser("compose")
    compose.add_argument("file", type=Path)
    compose.add_argument("--secrets", type=Path, help="a folder deploy/certs.sh filled")
    chart = sub.add_parser("helm")
    chart.add_argument("chart", type=Path)
    chart.add_argument("--out", type=Path, required=True, help="where to write the manifests")
    chart.add_argument("--kube-version", default="1.32.0")
    chart.add_argument("--flexfed-python", help="a Python that imports flexfed")
    args = parser.parse_args(argv)
    if args.what == "compose":
        check_compose(args.file, args.secrets)
    else:
        check_helm(args.chart, args.out, args.kube_version, args.flexfed_python)
    for text in problems:
        print(f"FAIL {text}", file=sys.stderr)
    if not problems:
        print(f"{args.what}: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
