"""Every failure a precise status, and no server detail in what a caller reads.

The services turn the errors they expect into statuses themselves. What escapes them (a full
disk, a database outage, a bug) used to reach the caller as gRPC's ``UNKNOWN`` "Exception
calling application: ..." with the exception's text: ``[Errno 28] ... /srv/coordinator/
store/uploads/...``, or the SQLAlchemy error with the database's host and port.
:class:`StatusInterceptor` wraps every method of the server:

- an exception a handler did not turn into a status becomes one by its kind (:func:`status_for`):
  no space left ``RESOURCE_EXHAUSTED``, the database unreachable ``UNAVAILABLE``, anything else
  ``INTERNAL``; the message says what the caller can do and carries a reference that the
  operator finds in the coordinator's log, next to the full traceback;
- every status message, also one a handler chose, has the coordinator's own paths replaced by
  ``<coordinator>`` (an error about a staged file names the file, not where it lives).
"""

from __future__ import annotations

import errno
import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def status_for(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and the caller's message for an exception no handler turned into one."""
    if isinstance(err, OSError) and err.errno in _NO_SPACE:
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the coordinator is out of disk space; nothing of this call was kept; retry "
            "after its operator frees space",
        )
    if _is_database_error(err):
        return (
            grpc.StatusCode.UNAVAILABLE,
            "the coordinator's registry database is unavailable; nothing of this call was "
            "kept; retry later",
        )
    return grpc.StatusCode.INTERNAL, "the coordinator failed on this call"


def _is_database_error(err: BaseException) -> bool:
    try:
        from sqlalchemy.exc import DBAPIError, OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy is a dependency
        return False
    return isinstance(err, OperationalError | DBAPIError)


# A handler's behaviour attribute, the factory that rebuilds it, whether it streams responses.
_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
)


class StatusInterceptor(grpc.ServerInterceptor):  # type: ignore[misc,unused-ignore]
    """Wraps every handler: unexpected errors become statuses, messages lose private paths."""

    def __init__(self, private: Sequence[Path]) -> None:
        # Longest first, so that a path inside another is replaced whole.
        self._private = sorted(
            {str(p) for path in private for p in (Path(path), Path(path).resolve())},
            key=len,
            reverse=True,
        )

    def scrub(self, text: str) -> str:
        """``text`` without the coordinator's own paths."""
        for path in self._private:
            text = text.replace(path, "<coordinator>")
        return text

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = str(details.method)
        for kind, make, streaming in _KINDS:
            behavior = getattr(handler, kind)
            if behavior:
                wrap = self._streaming if streaming else self._unary
                return make(
                    wrap(behavior, method),
                    handler.request_deserializer,
                    handler.response_serializer,
                )
        return handler  # pragma: no cover - every handler has one of the four

    def _unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(request, context)
            except Exception as err:
                self._fail(err, context, method)

        return wrapped

    def _streaming(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except Exception as err:
                self._fail(err, context, method)

        return wrapped

    def _fail(self, err: Exception, context: grpc.ServicerContext, method: str) -> None:
        if context.code() is not None:
            # The handler chose the status (context.abort raises a bare Exception after
            # setting it): keep it, but not the paths in its message.
            chosen = context.details()
            text = chosen.decode("utf-8", "replace") if isinstance(chosen, bytes) else chosen
            if text:
                context.set_details(self.scrub(text))
            raise err
        code, message = status_for(err)
        reference = secrets.token_hex(4)
        log.error("%s failed (%s, reference %s)", method, code.name, reference, exc_info=err)
        context.abort(code, f"{message} (reference {reference} in the coordinator's log)")
