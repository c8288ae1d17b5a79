"""Failures a caller can act on, naming nothing of the server: a full disk, a lost CRL, a tar
with a 300-character member name, a database that is down.

Against a real ``flexfed coordinator serve`` subprocess (issue 12: these answered ``UNKNOWN``
with "[Errno 28]", "[Errno 2] <CRL path>", the server's staging path, and SQLAlchemy's text
with the database host). Protects: each is its own status with a message that names no path
of the coordinator; nothing of the failed call is kept (an upload's offset stays where it
was); the coordinator goes on serving.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import make_expert_bundle
from consortium import FLEXFED, Consortium, served_coordinator
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from flexfed.client.sign import sign_bundle
from flexfed.common.api.consortium import Connection, ConsortiumClient
from flexfed.common.api.transfer import upload_artifact
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.archive import ArtifactKind
from flexfed.proto.v1 import artifact_pb2, artifact_pb2_grpc, registry_pb2, registry_pb2_grpc
from flexfed.server.statuses import StatusInterceptor, status_for

pytestmark = [pytest.mark.integration]
ORIGIN = "statuses.example/log"


def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), str(caught.value.details())


def serving(consortium: Consortium, address: str) -> bool:
    health = health_pb2_grpc.HealthStub(consortium.channel(address, consortium.globex))
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def test_a_full_disk_is_resource_exhausted_and_keeps_no_part_of_the_chunk(
    consortium: Consortium, small_anchor: Anchor, tmp_path: Path
) -> None:
    env = {"FLEXFED_FAILPOINTS": "upload-write=enospc"}
    with served_coordinator(consortium, small_anchor.path, tmp_path, ORIGIN, env=env) as served:
        root, address = served
        acme = artifact_pb2_grpc.ArtifactServiceStub(consortium.channel(address, consortium.acme))
        data = os.urandom(4096)
        state = acme.StartUpload(
            artifact_pb2.StartUploadRequest(
                kind=artifact_pb2.ARTIFACT_KIND_EXPERT_BUNDLE,
                size=len(data),
                digest="sha256:" + hashlib.sha256(data).hexdigest(),
            ),
            timeout=10,
        )
        chunk = artifact_pb2.UploadChunk(
            upload_id=state.upload_id,
            offset=0,
            data=data,
            chunk_sha256=hashlib.sha256(data).hexdigest(),
        )
        code, details = refusal(lambda: acme.Upload(iter([chunk]), timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert details.startswith("the coordinator is out of disk space; nothing of this call"), (
            details
        )
        assert "reference " in details and "/" not in details and "Errno" not in details
        request = artifact_pb2.GetUploadRequest(upload_id=state.upload_id)
        assert acme.GetUpload(request, timeout=10).offset == 0
        assert (root / "store" / "uploads" / f"{state.upload_id}.part").stat().st_size == 0
        assert serving(consortium, address)
        reference = details.split("reference ")[1].split()[0]
        assert f"reference {reference}" in (tmp_path / "serve.log").read_text()


def test_a_lost_crl_refuses_every_call_as_unavailable_naming_no_path(
    consortium: Consortium, small_anchor: Anchor, tmp_path: Path
) -> None:
    crl = consortium.pki.crl_pem
    with served_coordinator(consortium, small_anchor.path, tmp_path, ORIGIN) as (_, address):
        registry = registry_pb2_grpc.RegistryServiceStub(
            consortium.channel(address, consortium.globex)
        )
        assert registry.GetAnchor(registry_pb2.GetAnchorRequest(), timeout=10).digest
        kept = crl.read_bytes()
        crl.unlink()
        try:
            code, details = refusal(
                lambda: registry.GetAnchor(registry_pb2.GetAnchorRequest(), timeout=10)
            )
            assert code == grpc.StatusCode.UNAVAILABLE, details
            assert details == (
                "the coordinator cannot read its certificate revocation list; it refuses every "
                "call until its operator restores it"
            )
            crl.write_bytes(b"-----BEGIN X509 CRL-----\nbroken\n-----END X509 CRL-----\n")
            code, details = refusal(
                lambda: registry.GetAnchor(registry_pb2.GetAnchorRequest(), timeout=10)
            )
            assert code == grpc.StatusCode.UNAVAILABLE and "/" not in details, details
        finally:
            crl.write_bytes(kept)
        assert registry.GetAnchor(registry_pb2.GetAnchorRequest(), timeout=10).digest


def test_a_long_tar_member_name_is_refused_naming_no_server_path(
    consortium: Consortium, small_anchor: Anchor, tmp_path: Path
) -> None:
    tar = tmp_path / "long.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as out:
        member = tarfile.TarInfo("x" * 300)
        member.size = 5
        out.addfile(member, io.BytesIO(b"hello"))
    with served_coordinator(consortium, small_anchor.path, tmp_path, ORIGIN) as served:
        root, address = served
        channel = consortium.channel(address, consortium.acme)
        info = upload_artifact(channel, tar, ArtifactKind.EXPERT_BUNDLE, progress=False)
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        request = registry_pb2.SubmitExpertRequest(artifact_digest=info.digest)
        try:
            answer = registry.SubmitExpert(request, timeout=30)
        except grpc.RpcError as err:
            raise AssertionError(f"{err.code()}: {err.details()}") from err
        assert not answer.accepted
        assert answer.reason_code == "bundle-invalid", answer
        assert answer.reason == (
            f"archive member {'x' * 40!r}... has a path component of more than 255 bytes"
        )
        assert str(root) not in answer.reason and str(tmp_path) not in answer.reason
        assert serving(consortium, address)


def test_a_refused_bundle_is_described_without_the_servers_staging_path(
    consortium: Consortium, small_anchor: Anchor, tmp_path: Path
) -> None:
    bundle = make_expert_bundle(small_anchor, tmp_path / "bundle", "acme", 1)
    (bundle / "notes.txt").write_text("not part of a bundle\n")
    with served_coordinator(consortium, small_anchor.path, tmp_path, ORIGIN) as served:
        _, address = served
        channel = consortium.channel(address, consortium.acme)
        info = upload_artifact(channel, bundle, ArtifactKind.EXPERT_BUNDLE, progress=False)
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        request = registry_pb2.SubmitExpertRequest(artifact_digest=info.digest)
        answer = registry.SubmitExpert(request, timeout=30)
        assert not answer.accepted and answer.reason_code == "bundle-invalid", answer
        assert answer.reason.startswith("the bundle: unexpected files in an expert bundle: "), (
            answer.reason
        )
        assert "notes.txt" in answer.reason and "/" not in answer.reason, answer.reason


def test_a_database_outage_is_unavailable_and_names_no_host() -> None:
    """A real SQLAlchemy error (PostgreSQL on a port where nothing listens) as the server
    maps it."""
    url = "postgresql+psycopg://flexfed:secret@127.0.0.1:9/flexfed"
    with pytest.raises(OperationalError) as caught:
        create_engine(url, connect_args={"connect_timeout": 5}).connect()
    assert '"127.0.0.1", port 9' in str(caught.value)  # what callers used to read
    code, message = status_for(caught.value)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert message == (
        "the coordinator's registry database is unavailable; nothing of this call was kept; "
        "retry later"
    )
    assert status_for(OSError(28, "No space left on device"))[0] == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert status_for(KeyError("x")) == (
        grpc.StatusCode.INTERNAL,
        "the coordinator failed on this call",
    )


def test_status_messages_lose_the_coordinators_paths(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    scrub = StatusInterceptor([tmp_path / "link", Path("/srv/pki")]).scrub
    assert scrub(f"cannot read {tmp_path}/real/store/x and /srv/pki/crl.pem") == (
        "cannot read <coordinator>/store/x and <coordinator>/crl.pem"
    )


def test_a_registry_write_that_fails_after_its_log_entry_is_completed(
    consortium: Consortium, small_anchor: Anchor, tmp_path: Path
) -> None:
    """Issue 12: an opt-out answered UNKNOWN after its log entry was written, and registry
    and log disagreed until a restart. With every first registry write after a log entry
    failing, submissions and opt-outs still complete, and `coordinator check` agrees."""
    bundle = make_expert_bundle(small_anchor, tmp_path / "bundle", "acme", 1)
    sign_bundle(bundle, consortium.acme.key, consortium.acme.cert, [consortium.pki.ca_pem])
    env = {"FLEXFED_FAILPOINTS": "registry-after-log=error"}
    with served_coordinator(consortium, small_anchor.path, tmp_path, ORIGIN, env=env) as served:
        root, address = served
        connection = Connection(
            address, consortium.pki.ca_pem, consortium.acme.cert, consortium.acme.key
        )
        with ConsortiumClient(connection, timeout=30) as client:
            expert = client.submit(bundle, progress=False).expert
            assert expert.state == registry_pb2.EXPERT_STATE_ACCEPTED
            client.owner_request("opt-out", expert.expert_id, "acme")
            (listed,) = client.experts("acme")
            assert listed.state == registry_pb2.EXPERT_STATE_OPTED_OUT
        result = subprocess.run(
            [str(FLEXFED), "coordinator", "check", str(root)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "serve.log").read_text()
    assert log.count("the registry write after its log entry failed; retrying") == 2
