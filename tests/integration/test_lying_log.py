"""An auditor reading a served log from a coordinator that lies (issue 12: the remote log's
checks never met a lying server).

A real mTLS gRPC server on 127.0.0.1 serves an ``AuditService`` over a real log of four
entries, honestly or with one lie. Protects: ``fetch_log`` (what ``flexfed audit verify --log
grpcs://...`` uses) accepts the honest log and refuses each lie with its own error: an entry
changed after the checkpoint was signed, a checkpoint signed by another key, a checkpoint of
another log (origin), entries served from the wrong index, a page left empty, and entries
reordered (each entry genuine, the tree not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from consortium import Consortium
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.api.remote_log import fetch_log
from flexfed.common.translog.checkpoint import CheckpointSignatureError
from flexfed.common.translog.filelog import FileLog, LogIntegrityError
from flexfed.proto.v1 import audit_pb2, audit_pb2_grpc

pytestmark = pytest.mark.integration
ORIGIN = "lying.example/log"


class LyingAudit(audit_pb2_grpc.AuditServiceServicer):  # type: ignore[misc]
    """The coordinator's AuditService read calls over a real log, with one lie (or none)."""

    def __init__(self, log: FileLog, key: ec.EllipticCurvePrivateKey, lie: str) -> None:
        self.log, self.key, self.lie = log, key, lie

    def GetCheckpoint(self, request, context):  # type: ignore[no-untyped-def]
        key = ec.generate_private_key(ec.SECP256R1()) if self.lie == "other key" else self.key
        origin = "other.example/log" if self.lie == "other origin" else ORIGIN
        text = self.log.checkpoint(origin, key).to_text()
        return audit_pb2.SignedCheckpoint(text=text.encode())

    def GetEntries(self, request, context):  # type: ignore[no-untyped-def]
        start, end = request.start, min(request.end, self.log.size)
        entries = list(self.log.entries(start, end))
        if self.lie == "entry changed":
            entries[0] = entries[0].replace(b"acme", b"evil")
        elif self.lie == "wrong start":
            start += 1
        elif self.lie == "empty page":
            entries = []
        elif self.lie == "reordered":
            entries[0], entries[1] = entries[1], entries[0]
        return audit_pb2.GetEntriesResponse(start=start, entries=entries)


@pytest.fixture
def real_log(tmp_path: Path) -> Iterator[tuple[FileLog, ec.EllipticCurvePrivateKey]]:
    with FileLog(tmp_path / "tlog") as log:
        for org in ("acme", "globex", "initech", "umbrella"):
            event = {"type": "expert-accepted", "org": org, "time": "2026-12-05T00:00:00+00:00"}
            log.append(event)
        yield log, ec.generate_private_key(ec.SECP256R1())


def served(serve: Callable[..., str], consortium: Consortium, servicer: LyingAudit) -> grpc.Channel:
    address = serve(lambda s: audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, s))
    return consortium.channel(address, consortium.auditor)


def test_the_honest_log_verifies(
    serve: Callable[..., str],
    consortium: Consortium,
    real_log: tuple[FileLog, ec.EllipticCurvePrivateKey],
) -> None:
    log, key = real_log
    channel = served(serve, consortium, LyingAudit(log, key, "none"))
    verified = fetch_log(channel, key.public_key(), origin=ORIGIN)
    assert verified.size == 4 and verified.entry(2) == log.entry(2)
    assert verified.root() == log.root()


@pytest.mark.parametrize(
    ("lie", "error", "message"),
    [
        ("entry changed", LogIntegrityError, "do not hash to the root its signed checkpoint"),
        ("reordered", LogIntegrityError, "do not hash to the root its signed checkpoint"),
        ("wrong start", LogIntegrityError, "answered entries from 1 (4 of them) when asked from 0"),
        ("empty page", LogIntegrityError, "answered entries from 0 (0 of them) when asked from 0"),
        ("other key", CheckpointSignatureError, "checkpoint is signed by key "),
        ("other origin", CheckpointSignatureError, "checkpoint is for log 'other.example/log'"),
    ],
)
def test_each_lie_is_refused(
    lie: str,
    error: type[Exception],
    message: str,
    serve: Callable[..., str],
    consortium: Consortium,
    real_log: tuple[FileLog, ec.EllipticCurvePrivateKey],
) -> None:
    log, key = real_log
    channel = served(serve, consortium, LyingAudit(log, key, lie))
    with pytest.raises(error) as raised:
        fetch_log(channel, key.public_key(), origin=ORIGIN)
    assert message in str(raised.value)
