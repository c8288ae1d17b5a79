"""Crash safety: a real ``flexfed coordinator serve`` killed with SIGKILL in its crash windows.

Each test inits a coordinator directory (tiny anchor, the consortium PKI), serves it as a
subprocess on a fixed free port (armed with a failpoint, :mod:`flexfed.server.failpoints`,
where one is needed), drives a client until the server is in the window, kills it with
SIGKILL, shows on disk that the window was really hit, restarts it on the same directory and
port without the failpoint, and then requires: ``flexfed coordinator check`` passes (registry,
store and log agree), nothing half-written is visible, and the client's resume or retry
completes.

Protects:

- an upload killed after some chunks were durable resumes (the client's own retry, across the
  restart) from the durable offset, sending only the rest; the artifact is stored with the
  right digest and is never visible (``GetArtifact`` NOT_FOUND, no blob) before it is whole;
  the same when the kill lands after a chunk was fsynced but before it was acknowledged;
- a kill between an acceptance's log append and its registry write (``submit-after-log``):
  the restart restores the row from the log; resubmitting answers the same log index and
  logs nothing; the expert is accepted exactly once;
- a kill in a release after assembly (``release-after-assembly``) or after its log entry
  (``release-after-log``): no release row points at a missing model, staging is cleared,
  a logged release is finished by recovery, and releasing again gives a model that passes
  the auditor's ``audit_model`` against the coordinator's log.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from conftest import build_small_anchor, make_expert_bundle
from consortium import Consortium, Member

from flexfed.client.sign import sign_bundle
from flexfed.common.api.consortium import Connection, ConsortiumClient
from flexfed.common.api.transfer import download_artifact, upload_artifact
from flexfed.common.cli import cli
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.archive import ArtifactKind, pack_directory, parse_digest
from flexfed.common.formats.checkpoint import read_json
from flexfed.common.translog.filelog import FileLog
from flexfed.common.trust.audit import audit_model
from flexfed.common.trust.log_events import parse_entry
from flexfed.proto.v1 import (
    artifact_pb2,
    artifact_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from flexfed.server.config import load_config
from flexfed.server.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FLEXFED = Path(sys.executable).parent / "flexfed"
ORIGIN = "faults.example/log"
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def small_anchor(tmp_path_factory: pytest.TempPathFactory) -> Anchor:
    return build_small_anchor("llama", tmp_path_factory)


# --- a real coordinator process ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_coordinator_dir(consortium: Consortium, anchor: Anchor, root: Path) -> Path:
    result = CliRunner().invoke(cli, consortium.coordinator_init_args(root, anchor.path, ORIGIN))
    assert result.exit_code == 0, result.output
    return root


class Server:
    """``flexfed coordinator serve DIR --listen 127.0.0.1:PORT``, optionally with failpoints."""

    def __init__(self, directory: Path, port: int, markers: Path, failpoints: str = "") -> None:
        self.directory = directory
        self.address = f"127.0.0.1:{port}"
        self.markers = markers
        markers.mkdir(exist_ok=True)
        self.log_path = markers / f"serve-{time.monotonic_ns()}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FLEXFED_FAILPOINT_DIR": str(markers)}
        env["FLEXFED_FAILPOINTS"] = failpoints
        with open(self.log_path, "w") as stderr:
            self.process = subprocess.Popen(
                [str(FLEXFED), "coordinator", "serve", str(directory), "--listen", self.address],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline() if ready else ""
        if f"serving on {self.address}" not in line:
            self.kill()
            pytest.fail(f"no start line: {line!r}\n{self.stderr()}")

    def stderr(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, failpoint: str, timeout: float = 60) -> None:
        """Until the server reached ``failpoint`` (its marker file appeared)."""
        deadline = time.monotonic() + timeout
        while not (self.markers / failpoint).exists():
            if self.process.poll() is not None:
                pytest.fail(f"the server exited before {failpoint}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server never reached {failpoint}:\n{self.stderr()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=30) == 0, self.stderr()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Every server a test started (killed at teardown if still running)."""
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


@pytest.fixture
def start(servers: list[Server], tmp_path: Path) -> Callable[..., Server]:
    def run(directory: Path, port: int, failpoints: str = "") -> Server:
        server = Server(directory, port, tmp_path / "markers", failpoints)
        servers.append(server)
        return server

    return run


@pytest.fixture
def coordinator_dir(consortium: Consortium, small_anchor: Anchor, tmp_path: Path) -> Path:
    return init_coordinator_dir(consortium, small_anchor, tmp_path / "coordinator")


def check(directory: Path) -> tuple[int, str]:
    """``flexfed coordinator check DIR`` through the real console script: exit code, output.

    (Not CliRunner: it runs click in standalone mode, which hid that ``main()`` once dropped
    the command's exit code and exited 0 on problems.)
    """
    done = subprocess.run(
        [str(FLEXFED), "coordinator", "check", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def in_thread(fn: Callable[[], Any]) -> Future[Any]:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def blobs(directory: Path) -> set[str]:
    """The digests of the artifacts in the store (as files on disk)."""
    folder = directory / "store" / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in folder.iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name)}


def connection(consortium: Consortium, address: str, member: Member) -> Connection:
    return Connection(address, consortium.pki.ca_pem, member.cert, member.key)


# --- uploads -------------------------------------------------------------------------------


class UploadStreams(grpc.StreamUnaryClientInterceptor):  # type: ignore[misc]
    """Records every Upload stream's chunks (offset, length) as the client sends them.

    ``hold_first_after``: the first stream sends that many chunks and then waits (a client
    mid-upload) until :attr:`release_first`; ``gate_second``: the second stream sends nothing
    until :attr:`go` (so the test can look at the server before the resumed upload ends).
    """

    def __init__(self, hold_first_after: int | None = None, gate_second: bool = False) -> None:
        self.streams: list[list[tuple[int, int]]] = []
        self.hold_first_after = hold_first_after
        self.held = threading.Event()
        self.release_first = threading.Event()
        self.gate_second = gate_second
        self.go = threading.Event()

    def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        number = len(self.streams)
        sent: list[tuple[int, int]] = []
        self.streams.append(sent)

        def chunks() -> Iterator[artifact_pb2.UploadChunk]:
            for i, chunk in enumerate(request_iterator):
                if number == 0 and i == self.hold_first_after:
                    self.held.set()
                    self.release_first.wait(120)
                    return
                if number == 1 and i == 0 and self.gate_second:
                    self.go.wait(120)
                sent.append((chunk.offset, len(chunk.data)))
                yield chunk

        return continuation(details, chunks())


def artifact_dir(where: Path, size: int) -> Path:
    """A directory of ``size`` random bytes (seeded): a few-MB artifact, many chunks."""
    where.mkdir(parents=True)
    (where / "weights.bin").write_bytes(random.Random(7).randbytes(size))
    return where


def part_files(directory: Path) -> list[Path]:
    return sorted((directory / "store" / "uploads").glob("*.part"))


def test_an_upload_killed_midway_resumes_from_the_durable_offset(
    consortium: Consortium, coordinator_dir: Path, start: Callable[..., Server], tmp_path: Path
) -> None:
    port = free_port()
    server = start(coordinator_dir, port)
    source = artifact_dir(tmp_path / "artifact", 3 << 20)
    packed = pack_directory(source, tmp_path / "artifact.tar")
    held = 5  # chunks the client gets through before the kill
    streams = UploadStreams(hold_first_after=held, gate_second=True)
    channel = grpc.intercept_channel(consortium.channel(server.address, consortium.acme), streams)
    uploading = in_thread(
        lambda: upload_artifact(
            channel, source, ArtifactKind.EXPERT_BUNDLE, chunk_bytes=CHUNK, progress=False,
            timeout=60, retries=10, backoff=0.25,
        )
    )  # fmt: skip
    observer = consortium.channel(server.address, consortium.acme)
    artifacts = artifact_pb2_grpc.ArtifactServiceStub(observer)
    get = artifact_pb2.GetArtifactRequest(digest=packed.digest)

    assert streams.held.wait(60), "the client never got going"
    deadline = time.monotonic() + 30
    while not (parts := part_files(coordinator_dir)) or parts[0].stat().st_size < held * CHUNK:
        assert time.monotonic() < deadline, "the held chunks never became durable"
        time.sleep(0.01)
    upload_id = parts[0].stem
    assert code_of(lambda: artifacts.GetArtifact(get, timeout=10)) == grpc.StatusCode.NOT_FOUND
    server.kill()
    streams.release_first.set()  # the first stream's sender may end now; the call is dead

    assert parts[0].stat().st_size == held * CHUNK  # what was counted survived the kill
    assert packed.digest not in blobs(coordinator_dir)
    server = start(coordinator_dir, port)  # the client retries meanwhile, then resumes
    assert code_of(lambda: artifacts.GetArtifact(get, timeout=10)) == grpc.StatusCode.NOT_FOUND
    state = artifacts.GetUpload(artifact_pb2.GetUploadRequest(upload_id=upload_id), timeout=10)
    assert (state.offset, state.complete) == (held * CHUNK, False)
    streams.go.set()

    info = uploading.result(timeout=120)
    assert (info.digest, info.size) == (packed.digest, packed.size)
    assert len(streams.streams) == 2, streams.streams
    resumed = streams.streams[1]
    assert resumed[0][0] == held * CHUNK  # from the durable offset ...
    assert sum(n for _, n in resumed) == packed.size - held * CHUNK  # ... and only the rest
    blob = coordinator_dir / "store" / "blobs" / "sha256" / parse_digest(packed.digest)
    assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == packed.digest
    assert artifacts.GetArtifact(get, timeout=10).size == packed.size
    assert part_files(coordinator_dir) == []
    code, output = check(coordinator_dir)
    assert code == 0, output
    server.stop()


def test_a_kill_after_a_durable_unacknowledged_chunk_loses_and_repeats_nothing(
    consortium: Consortium, coordinator_dir: Path, start: Callable[..., Server], tmp_path: Path
) -> None:
    port = free_port()
    server = start(coordinator_dir, port, "upload-after-chunk")
    source = artifact_dir(tmp_path / "artifact", 1 << 20)
    streams = UploadStreams()
    channel = grpc.intercept_channel(consortium.channel(server.address, consortium.acme), streams)
    uploading = in_thread(
        lambda: upload_artifact(
            channel, source, ArtifactKind.EXPERT_BUNDLE, chunk_bytes=CHUNK, progress=False,
            timeout=60, retries=10, backoff=0.25,
        )
    )  # fmt: skip
    server.wait_for("upload-after-chunk")
    server.kill()
    (part,) = part_files(coordinator_dir)
    assert part.stat().st_size == CHUNK  # fsynced, never acknowledged
    start(coordinator_dir, port)

    info = uploading.result(timeout=120)
    assert len(streams.streams) == 2 and streams.streams[1][0][0] == CHUNK
    assert sum(n for _, n in streams.streams[1]) == info.size - CHUNK
    assert info.digest in blobs(coordinator_dir)
    code, output = check(coordinator_dir)
    assert code == 0, output


# --- submissions ---------------------------------------------------------------------------


def signed_bundle(consortium: Consortium, anchor: Anchor, where: Path, member: Member, seed: int):
    bundle = make_expert_bundle(anchor, where / f"{member.org}-{seed}", member.org, seed)
    sign_bundle(bundle, member.key, member.cert, [consortium.pki.ca_pem])
    return bundle


def test_a_kill_between_log_and_registry_accepts_the_expert_exactly_once(
    consortium: Consortium,
    coordinator_dir: Path,
    small_anchor: Anchor,
    start: Callable[..., Server],
    tmp_path: Path,
) -> None:
    port = free_port()
    server = start(coordinator_dir, port, "submit-after-log")
    bundle = signed_bundle(consortium, small_anchor, tmp_path, consortium.acme, 1)
    channel = consortium.channel(server.address, consortium.acme)
    digest = upload_artifact(channel, bundle, ArtifactKind.EXPERT_BUNDLE, progress=False).digest
    registry = registry_pb2_grpc.RegistryServiceStub(channel)
    request = registry_pb2.SubmitExpertRequest(artifact_digest=digest)
    submitting = in_thread(lambda: registry.SubmitExpert(request, timeout=60))
    server.wait_for("submit-after-log")
    server.kill()
    with pytest.raises(grpc.RpcError) as err:
        submitting.result(timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    config = load_config(coordinator_dir)  # the window: logged, no row
    with FileLog(config.log_file) as log:
        assert log.size == 1
        assert parse_entry(log.entry(0))["expert_id"] == digest
    rows = Registry(config.database_url)
    try:
        assert rows.expert(digest) is None
    finally:
        rows.close()
    code, output = check(coordinator_dir)
    assert code == 1 and "accepted at log entry 0, not in the registry" in output, output

    server = start(coordinator_dir, port)
    assert "registry row restored from log entry 0" in server.stderr()
    code, output = check(coordinator_dir)
    assert code == 0 and "(1 experts, 1 entries)" in output, output
    with ConsortiumClient(connection(consortium, server.address, consortium.acme)) as client:
        again = client.submit(bundle, progress=False)  # upload is a no-op, then idempotent
        assert (again.log_index, again.tree_size) == (0, 1)
        assert again.expert.expert_id == digest
        assert client.submit(bundle, progress=False).log_index == 0
        assert [e.expert_id for e in client.experts()] == [digest]
    code, output = check(coordinator_dir)
    assert code == 0 and "(1 experts, 1 entries)" in output, output
    server.stop()


# --- releases ------------------------------------------------------------------------------


@pytest.mark.parametrize("failpoint", ["release-after-assembly", "release-after-log"])
def test_a_kill_during_a_release_leaves_nothing_half_made(
    failpoint: str,
    consortium: Consortium,
    coordinator_dir: Path,
    small_anchor: Anchor,
    start: Callable[..., Server],
    tmp_path: Path,
) -> None:
    port = free_port()
    server = start(coordinator_dir, port, failpoint)
    experts = []
    for seed, member in enumerate((consortium.acme, consortium.globex), start=1):
        bundle = signed_bundle(consortium, small_anchor, tmp_path, member, seed)
        with ConsortiumClient(connection(consortium, server.address, member)) as client:
            experts.append(client.submit(bundle, progress=False).expert.expert_id)
    stored = blobs(coordinator_dir)
    operator = registry_pb2_grpc.RegistryServiceStub(
        consortium.channel(server.address, consortium.operator)
    )
    releasing = in_thread(
        lambda: operator.ReleaseModel(registry_pb2.ReleaseRequest(top_k=2), timeout=60)
    )
    server.wait_for(failpoint)
    server.kill()
    with pytest.raises(grpc.RpcError):
        releasing.result(timeout=30)

    config = load_config(coordinator_dir)  # the window
    staged = config.staging_dir / "release-v1"
    assert (staged / "assembly.json").is_file()
    assert blobs(coordinator_dir) == stored  # no model in the store
    with FileLog(config.log_file) as log:
        events = [parse_entry(log.entry(i)) for i in range(log.size)]
    if failpoint == "release-after-log":
        assert [e["type"] for e in events][-1] == "assembly-released"
        assert read_json(staged / "assembly.json", "assembly.json")["release_log_index"] == 2
        code, output = check(coordinator_dir)
        assert code == 1 and "log entry 2: a release the registry does not know" in output
    else:
        assert [e["type"] for e in events] == ["expert-accepted"] * 2
        assert check(coordinator_dir)[0] == 0

    server = start(coordinator_dir, port)
    assert list(config.staging_dir.iterdir()) == []
    code, output = check(coordinator_dir)
    assert code == 0, output
    channel = consortium.channel(server.address, consortium.operator)
    operator = registry_pb2_grpc.RegistryServiceStub(channel)
    artifacts = artifact_pb2_grpc.ArtifactServiceStub(channel)
    listed = operator.ListReleases(registry_pb2.ListReleasesRequest(), timeout=10).releases
    for row in listed:  # no row points at a model that is not there
        get = artifact_pb2.GetArtifactRequest(digest=row.model_artifact_digest)
        assert artifacts.GetArtifact(get, timeout=10).kind == artifact_pb2.ARTIFACT_KIND_MODEL
    if failpoint == "release-after-log":
        assert [(r.version, r.log_index) for r in listed] == [(1, 2)]  # finished by recovery
        assert "release v1 (log entry 2) finished" in server.stderr()
    else:
        assert list(listed) == []

    again = operator.ReleaseModel(registry_pb2.ReleaseRequest(top_k=2), timeout=60)
    assert again.version == len(listed) + 1 and list(again.expert_ids) == experts
    auditor = consortium.channel(server.address, consortium.auditor)
    for row in (*listed, again):
        model = download_artifact(
            auditor, row.model_artifact_digest, tmp_path / f"model-v{row.version}",
            progress=False,
        )  # fmt: skip
        report = audit_model(
            model,
            consortium.pki.ca_pem,
            consortium.pki.crl_pem,
            config.log_file,
            config.log_public_key,
            anchor=small_anchor,
            log_origin=ORIGIN,
        )
        assert report.ok, report.summary()
    audit = audit_pb2_grpc.AuditServiceStub(auditor)
    size = audit.GetEntries(audit_pb2.GetEntriesRequest(start=0, end=100), timeout=10)
    assert len(size.entries) == 2 + len(listed) + 1  # two acceptances, the releases
    code, output = check(coordinator_dir)
    assert code == 0, output
    server.stop()
