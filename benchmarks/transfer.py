"""Transfer benchmark: artifact upload and download through the Consortium API, against raw TCP.

What is measured, on 127.0.0.1, with inputs built in code:

- **Throughput.** A directory holding one file of ``--size-mb`` MB (a random 16 MiB block
  repeated, each MiB stamped with its index, so no two chunks are alike) is packed into the
  artifact tar stream (timed: "pack"). The coordinator runs in a child process (this script
  with ``--server``): a real gRPC server with mutual TLS from a consortium CA made for the
  run, the :class:`~flexfed.server.artifacts.ArtifactServicer` over a fresh
  :class:`~flexfed.server.store.ArtifactStore` (1 MiB chunks, each fsynced). The parent, as
  an owner, uploads the tar with :func:`flexfed.common.api.transfer.upload_artifact` (client-side
  SHA-256, StartUpload, the chunk stream, FinishUpload with the server's whole-digest check)
  and downloads it with :func:`~flexfed.common.api.transfer.download_artifact` (per-chunk and
  whole SHA-256, written to a file and fsynced; then "extract" is timed separately).
  The baseline is a raw loopback TCP copy of the same tar: ``socket.sendfile`` in the parent
  into a child process that writes what it receives to a file and fsyncs it (no TLS, no
  hashing, no framing). Throughput is MB/s and its ratio to that copy, in the same run. Each
  round uses a new server and store; times are medians over ``--repeat`` rounds.

- **Peak memory.** The server child's peak resident set size (``VmHWM`` of
  ``/proc/PID/status``) after each round, beside its resident size when idle after start;
  and the client's (this process's) peak over the transfers, reset before them
  (``/proc/self/clear_refs``). Both should be independent of the artifact's size.

Run: ``.venv/bin/python benchmarks/transfer.py`` (default 2048 MB; ``--size-mb 256`` for a
quick check). Scratch use is about 6x the size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

MB = 10**6
_SERVER_FLAG = "--server"
_SINK_FLAG = "--sink"
_BLOCK = 16 << 20


def _status_kb(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


# --- children ------------------------------------------------------------------------------


def server_main(argv: Sequence[str]) -> None:
    """Child: serve ArtifactService with mTLS until stdin closes; print the port first."""
    import grpc

    from flexfed.common.api.tls import CHANNEL_OPTIONS, server_credentials
    from flexfed.proto.v1 import artifact_pb2_grpc
    from flexfed.server.artifacts import ArtifactServicer
    from flexfed.server.auth import Authorizer
    from flexfed.server.store import ArtifactStore

    store_dir, pki, limit = Path(argv[0]), Path(argv[1]), int(argv[2])
    store = ArtifactStore(store_dir, max_artifact_bytes=limit)
    store.recover()
    crl = pki / "ca" / "crl.pem"
    authorizer = Authorizer(pki / "ca" / "ca.pem", crl if crl.exists() else None)
    server = grpc.server(
        futures.ThreadPoolExecutor(8), options=CHANNEL_OPTIONS, maximum_concurrent_rpcs=8
    )
    artifact_pb2_grpc.add_ArtifactServiceServicer_to_server(
        ArtifactServicer(store, authorizer), server
    )
    creds = server_credentials(
        pki / "server" / "cert.pem", pki / "server" / "key.pem", pki / "ca" / "ca.pem"
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(grace=None)


def sink_main(argv: Sequence[str]) -> None:
    """Child: accept one TCP connection, write everything it sends to a file, fsync."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        print(srv.getsockname()[1], flush=True)
        conn, _ = srv.accept()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        total = 0
        with conn, open(argv[0], "wb") as f:
            while n := conn.recv_into(buf):
                f.write(view[:n])
                total += n
            f.flush()
            os.fsync(f.fileno())
    print(total, flush=True)


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


# --- the run -------------------------------------------------------------------------------


@dataclass
class Round:
    raw: float
    upload: float
    download: float
    extract: float
    server_idle: int  # bytes
    server_peak: int
    client_idle: int
    client_peak: int


def make_pki(root: Path) -> Path:
    from flexfed.common.trust.ca import init_ca, issue_certificate
    from flexfed.common.trust.keys import generate_key_and_csr

    init_ca(root / "ca", "Benchmark CA")
    for name, org, role, sans in [
        ("server", "consortium", "operator", True),
        ("acme", "acme", "owner", False),
    ]:
        req = generate_key_and_csr(org, root / name, role)
        issue_certificate(
            root / "ca",
            req.csr,
            role,
            out=root / name / "cert.pem",
            san_dns=["localhost"] if sans else (),
            san_ip=["127.0.0.1"] if sans else (),
        )
    return root


def make_artifact(root: Path, size: int) -> tuple[Path, Path]:
    """A directory with one ``size``-byte file, and the path its tar stream will have."""
    src = root / "bundle"
    src.mkdir()
    block = bytearray(os.urandom(_BLOCK))
    with open(src / "expert.safetensors", "wb") as f:
        written = 0
        while written < size:
            for mib in range(0, _BLOCK, 1 << 20):  # stamp each MiB: no two chunks alike
                block[mib : mib + 8] = (written + mib).to_bytes(8, "little")
            n = min(_BLOCK, size - written)
            f.write(memoryview(block)[:n])
            written += n
    return src, root / "bundle.tar"


def raw_copy(tar: Path, dst: Path) -> float:
    """Seconds to send ``tar`` over loopback TCP into a child that writes and fsyncs it."""
    sink = _child(_SINK_FLAG, str(dst))
    assert sink.stdout is not None
    port = int(sink.stdout.readline())
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn, open(tar, "rb") as f:
        conn.sendfile(f)
        conn.shutdown(socket.SHUT_WR)
        received = int(sink.stdout.readline())
    elapsed = time.perf_counter() - t0
    sink.wait()
    if received != tar.stat().st_size:
        raise SystemExit(f"raw copy received {received} bytes of {tar.stat().st_size}")
    dst.unlink()
    return elapsed


def one_round(root: Path, pki: Path, tar: Path, size: int) -> Round:
    from flexfed.common.api.tls import secure_channel
    from flexfed.common.api.transfer import download_artifact, upload_artifact
    from flexfed.common.formats.archive import ArtifactKind, extract_archive

    raw = raw_copy(tar, root / "raw.copy")
    server = _child(_SERVER_FLAG, str(root / "store"), str(pki), str(size * 2))
    assert server.stdout is not None and server.stdin is not None
    try:
        port = int(server.stdout.readline())
        idle = _status_kb(server.pid, "VmRSS") * 1024
        me = pki / "acme"
        channel = secure_channel(
            f"127.0.0.1:{port}", pki / "ca" / "ca.pem", me / "cert.pem", me / "key.pem"
        )
        Path("/proc/self/clear_refs").write_text("5")
        client_idle = _status_kb("self", "VmRSS") * 1024
        t0 = time.perf_counter()
        info = upload_artifact(channel, tar, ArtifactKind.EXPERT_BUNDLE, progress=False)
        t_up = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = download_artifact(
            channel, info.digest, root / "fetched.tar", extract=False, progress=False
        )
        t_down = time.perf_counter() - t0
        client_peak = _status_kb("self", "VmHWM") * 1024
        server_peak = _status_kb(server.pid, "VmHWM") * 1024
        channel.close()
    finally:
        server.stdin.close()
        server.wait()
    t0 = time.perf_counter()
    extract_archive(out, root / "extracted")
    t_extract = time.perf_counter() - t0
    for path in (root / "store", root / "extracted", out):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return Round(raw, t_up, t_down, t_extract, idle, server_peak, client_idle, client_peak)


def report(size: int, t_pack: float, rounds: list[Round], load: tuple[float, float]) -> str:
    med = statistics.median
    raw = med([r.raw for r in rounds])

    def row(label: str, seconds: float) -> str:
        rate = size / seconds
        return f"{label:<40}{seconds:>8.2f}{rate / MB:>8.0f}{rate / (size / raw):>8.2f}"

    def per_round(attr: str) -> str:
        return ", ".join(f"{r.raw / getattr(r, attr):.2f}" for r in rounds)

    server_idle = max(r.server_idle for r in rounds)
    server_peak = max(r.server_peak for r in rounds)
    client_idle = max(r.client_idle for r in rounds)
    client_peak = max(r.client_peak for r in rounds)
    return "\n".join(
        [
            f"transfer benchmark: artifact tar of {size / MB:,.0f} MB, 1 MiB chunks, mTLS on "
            f"127.0.0.1; {os.cpu_count()} CPUs; median of {len(rounds)} round(s)",
            f"1-minute load average at start {load[0]:.2f}, at end {load[1]:.2f}",
            "",
            f"{'throughput (medians)':<40}{'wall s':>8}{'MB/s':>8}{'x raw':>8}",
            row("raw TCP copy (sendfile -> write+fsync)", raw),
            row("upload (SHA-256, stream, finish)", med([r.upload for r in rounds])),
            row("download (chunks+whole SHA-256, fsync)", med([r.download for r in rounds])),
            row("pack directory (tar + SHA-256)", t_pack),
            row("extract (checked, fsynced, renamed)", med([r.extract for r in rounds])),
            f"upload / raw, each round: {per_round('upload')}",
            f"download / raw, each round: {per_round('download')}",
            "",
            f"{'peak memory':<40}{'MB':>8}{'x size':>8}",
            f"{'server idle after start (VmRSS)':<40}{server_idle / MB:>8.0f}",
            f"{'server peak (VmHWM)':<40}{server_peak / MB:>8.0f}{server_peak / size:>8.3f}",
            f"{'server peak - idle':<40}{(server_peak - server_idle) / MB:>8.0f}"
            f"{(server_peak - server_idle) / size:>8.3f}",
            f"{'client before transfers (VmRSS)':<40}{client_idle / MB:>8.0f}",
            f"{'client peak during transfers (VmHWM)':<40}{client_peak / MB:>8.0f}"
            f"{client_peak / size:>8.3f}",
            f"{'client peak - before':<40}{(client_peak - client_idle) / MB:>8.0f}"
            f"{(client_peak - client_idle) / size:>8.3f}",
        ]
    )


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--size-mb", type=int, default=2048, help="artifact size in MB (default 2048)")
    p.add_argument("--repeat", type=int, default=3, help="rounds (medians shown; default 3)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: temp)")
    a = p.parse_args(argv)
    size = a.size_mb * MB
    root = Path(tempfile.mkdtemp(prefix="flexfed-bench-transfer-", dir=a.workdir))
    load_start = os.getloadavg()[0]
    try:
        from flexfed.common.formats.archive import pack_directory

        pki = make_pki(root / "pki")
        src, tar = make_artifact(root, size)
        t0 = time.perf_counter()
        packed = pack_directory(src, tar)
        t_pack = time.perf_counter() - t0
        shutil.rmtree(src)
        rounds = []
        for k in range(a.repeat):
            print(f"round {k + 1}/{a.repeat}", file=sys.stderr)
            rounds.append(one_round(root, pki, tar, packed.size))
        print(report(packed.size, t_pack, rounds, (load_start, os.getloadavg()[0])))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == _SERVER_FLAG:
        server_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == _SINK_FLAG:
        sink_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
