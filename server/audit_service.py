"""``AuditService``: the transparency log as auditors read it (any member may).

Everything here is checkable offline with :mod:`flexfed.common.translog.log` and the log's public
key: signed checkpoints of the current tree, inclusion and consistency proofs (RFC 9162), and
the raw entries in pages, from which :mod:`flexfed.common.api.remote_log` rebuilds the tree.
Reads take the coordinator's lock only long enough to see one consistent log size.
"""

from __future__ import annotations

import grpc

from flexfed.common.errors import InvalidInputError
from flexfed.proto.v1 import audit_pb2, audit_pb2_grpc
from flexfed.server.auth import Authorizer, abort
from flexfed.server.coordinator import Coordinator

#: The most entries one GetEntries answer holds.
PAGE_SIZE = 1000


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """The log half of the Consortium API."""

    def __init__(self, coordinator: Coordinator, authorizer: Authorizer) -> None:
        self.coordinator = coordinator
        self.auth = authorizer

    def _reader(self, context: grpc.ServicerContext) -> None:
        self.auth.require(context, "owner", "auditor")

    def GetLogKey(
        self, request: audit_pb2.GetLogKeyRequest, context: grpc.ServicerContext
    ) -> audit_pb2.LogKey:
        self._reader(context)
        c = self.coordinator
        return audit_pb2.LogKey(public_key_pem=c.log_public_pem, origin=c.config.log_origin)

    def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: grpc.ServicerContext
    ) -> audit_pb2.SignedCheckpoint:
        self._reader(context)
        return audit_pb2.SignedCheckpoint(text=self.coordinator.checkpoint().to_text().encode())

    def GetInclusionProof(
        self, request: audit_pb2.GetInclusionProofRequest, context: grpc.ServicerContext
    ) -> audit_pb2.InclusionProof:
        self._reader(context)
        c = self.coordinator
        with c.lock:
            size = request.tree_size or c.log.size
            try:
                hashes = c.log.inclusion_proof(request.leaf_index, size)
            except InvalidInputError as err:
                abort(context, grpc.StatusCode.OUT_OF_RANGE, str(err))
        return audit_pb2.InclusionProof(
            leaf_index=request.leaf_index, tree_size=size, hashes=hashes
        )

    def GetConsistencyProof(
        self, request: audit_pb2.GetConsistencyProofRequest, context: grpc.ServicerContext
    ) -> audit_pb2.ConsistencyProof:
        self._reader(context)
        c = self.coordinator
        with c.lock:
            new = request.new_size or c.log.size
            try:
                hashes = c.log.consistency_proof(request.old_size, new)
            except InvalidInputError as err:
                abort(context, grpc.StatusCode.OUT_OF_RANGE, str(err))
        return audit_pb2.ConsistencyProof(old_size=request.old_size, new_size=new, hashes=hashes)

    def GetEntries(
        self, request: audit_pb2.GetEntriesRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetEntriesResponse:
        self._reader(context)
        c = self.coordinator
        start, end = request.start, request.end
        if end <= start:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"empty range [{start}, {end})")
        with c.lock:
            size = c.log.size
            if start >= size:
                abort(
                    context,
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"entry {start} is past the end of the log ({size} entries)",
                )
            entries = c.log.entries(start, min(end, size, start + PAGE_SIZE))
        return audit_pb2.GetEntriesResponse(start=start, entries=entries)
