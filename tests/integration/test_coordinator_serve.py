"""``flexfed coordinator init|serve|check`` as an operator runs them.

Protects: ``init`` makes a coordinator and refuses to overwrite it with one clear line and the
configuration exit code; ``serve`` (a real subprocess) prints its address, answers gRPC health
checks and API calls over mTLS, accepts an uploaded expert, and on SIGTERM stops cleanly
(exit 0); ``check`` passes on a consistent coordinator, also while it is serving, and lists
a problem (exit 1) when an accepted expert's bundle is gone from the store; a crash between a
log append and its registry write is repaired by the next start.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from conftest import build_small_anchor, make_expert_bundle
from consortium import Consortium
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flexfed.client.sign import sign_bundle
from flexfed.common.api.transfer import upload_artifact
from flexfed.common.cli import cli
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.archive import ArtifactKind, parse_digest
from flexfed.common.translog.filelog import FileLog
from flexfed.common.trust.log_events import parse_entry
from flexfed.proto.v1 import registry_pb2, registry_pb2_grpc
from flexfed.server.config import load_config

pytestmark = pytest.mark.integration
FLEXFED = Path(sys.executable).parent / "flexfed"


@pytest.fixture(scope="module")
def small_anchor(tmp_path_factory: pytest.TempPathFactory) -> Anchor:
    return build_small_anchor("llama", tmp_path_factory)


def init_args(consortium: Consortium, directory: Path, anchor: Anchor) -> list[str]:
    return consortium.coordinator_init_args(directory, anchor.path, "serve.example/log")


@pytest.fixture(scope="module")
def directory(
    consortium: Consortium, small_anchor: Anchor, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("op") / "coordinator"
    result = CliRunner().invoke(cli, init_args(consortium, root, small_anchor))
    assert result.exit_code == 0, result.output
    assert "created coordinator" in result.output
    return root


class Running:
    def __init__(self, directory: Path) -> None:
        self.process = subprocess.Popen(
            [str(FLEXFED), "coordinator", "serve", str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"serving on (127\.0\.0\.1:\d+)", line)
        if match is None:
            self.process.kill()
            pytest.fail(f"no start line: {line!r} {self.process.stderr.read()}")
        self.address = match.group(1)

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return code, self.process.stderr.read() if self.process.stderr else ""


@pytest.fixture
def running(directory: Path) -> Iterator[Running]:
    server = Running(directory)
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()


def check(directory: Path) -> tuple[int, str]:
    """``flexfed coordinator check`` through the real console script (its real exit code)."""
    done = subprocess.run(
        [str(FLEXFED), "coordinator", "check", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def test_init_writes_its_secrets_for_the_operator_alone(directory: Path) -> None:
    """coordinator.toml may hold a database password, log-key.pem signs the log: 0600."""
    assert (directory / "coordinator.toml").stat().st_mode & 0o777 == 0o600
    assert (directory / "log" / "log-key.pem").stat().st_mode & 0o777 == 0o600


def test_init_refuses_an_existing_coordinator(
    consortium: Consortium, directory: Path, small_anchor: Anchor
) -> None:
    done = subprocess.run(
        [str(FLEXFED), *init_args(consortium, directory, small_anchor)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists and is not empty" in lines[0], done.stderr
    assert load_config(directory).log_origin == "serve.example/log"


def test_serve_answers_health_and_api_calls_and_stops_on_sigterm(
    consortium: Consortium, directory: Path, running: Running, small_anchor: Anchor, tmp_path
) -> None:
    channel = consortium.channel(running.address, consortium.acme)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "flexfed.proto.v1.RegistryService", "flexfed.proto.v1.AuditService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    registry = registry_pb2_grpc.RegistryServiceStub(channel)
    anchor = registry.GetAnchor(registry_pb2.GetAnchorRequest(), timeout=10)
    assert anchor.digest == small_anchor.digest and anchor.family == "llama"

    bundle = make_expert_bundle(small_anchor, tmp_path / "expert", "acme", 1)
    sign_bundle(bundle, consortium.acme.key, consortium.acme.cert, [consortium.pki.ca_pem])
    info = upload_artifact(channel, bundle, ArtifactKind.EXPERT_BUNDLE, progress=False)
    submitted = registry.SubmitExpert(
        registry_pb2.SubmitExpertRequest(artifact_digest=info.digest), timeout=30
    )
    assert submitted.accepted, submitted.reason

    code, output = check(directory)  # while serving: reads a copy of the locked log
    assert code == 0 and "agree (1 experts, 1 entries)" in output, output

    code, stderr = running.stop()
    assert code == 0, stderr
    assert "stopped" in stderr
    with pytest.raises(grpc.RpcError):
        registry.GetAnchor(registry_pb2.GetAnchorRequest(), timeout=2)


def test_check_reports_a_missing_bundle_and_a_restart_repairs_the_log_gap(
    directory: Path,
) -> None:
    config = load_config(directory)
    with FileLog(config.log_file) as log:
        accepted = parse_entry(log.entry(0))
        # A crash after the log append, before the registry write: the same expert again,
        # under another id, logged only.
        gap = {**accepted, "expert_id": "sha256:" + "9" * 64, "name": "second"}
        log.append(gap)
    code, output = check(directory)
    assert code == 1
    assert "accepted at log entry 1, not in the registry" in output

    server = Running(directory)  # recovery at startup
    try:
        code, output = check(directory)
    finally:
        stopped, stderr = server.stop()
    assert stopped == 0, stderr
    assert "registry row restored from log entry 1" in stderr
    assert code == 1  # the row is back; its bundle was never uploaded
    problems = [line for line in output.splitlines() if line.startswith("expert ")]
    assert problems == [f"expert {gap['expert_id']}: its bundle is missing from the store"]

    blob = config.store_dir / "blobs" / "sha256" / parse_digest(accepted["expert_id"])
    blob.unlink()
    code, output = check(directory)
    assert code == 1 and f"expert {accepted['expert_id']}: its bundle is missing" in output
