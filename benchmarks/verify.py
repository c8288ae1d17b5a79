"""Verification throughput of a large signed expert bundle, against ``sha256sum``, same run.

Builds one synthetic OLMo-2-shaped anchor and ONE expert bundle of ``--layers`` x FFN size
(the defaults give ~1.2 GB in F32, with --layers 24 about 2.4 GB), signs it with a consortium
owner certificate (``flexfed.common.trust.ca`` + ``BundleSigner``), then alternates, ``--repeat``
times:

- the baseline: ``sha256sum`` (coreutils) of the same files (expert.safetensors, expert.json);
- for reference, Python's ``hashlib`` SHA-256 of the same files (OpenSSL; uses the CPU's SHA
  instructions where coreutils may not);
- ``BundleVerifier.verify``: model-signing signature over the per-file digests, certificate
  chain and CRL, org binding, DSSE provenance;
- ``BundleVerifier.verify`` with ``anchor=``: plus the strict structural validation (header,
  keys, shapes, finite values), i.e. what the coordinator runs at upload.

Prints MB/s of each and the ratios to the baseline (medians). Files are in the page cache for
every method (they were just written and are read in turn).

    .venv/bin/python benchmarks/verify.py [--layers 12] [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from assemble import BenchConfig, build_inputs

from flexfed.client.sign import sign_bundle
from flexfed.common.trust.ca import init_ca, issue_certificate
from flexfed.common.trust.keys import generate_key_and_csr
from flexfed.common.trust.signing import BundleVerifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    cfg = BenchConfig(
        experts=1, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate
    )
    root = Path(args.workdir or tempfile.mkdtemp(prefix="flexfed-verify-"))
    root.mkdir(parents=True, exist_ok=True)
    need = 3 * cfg.expert_bytes() + 2**30
    if shutil.disk_usage(root).free < need:
        raise SystemExit(f"need about {need / 1e9:.1f} GB free in {root}")
    try:
        (root / "inputs").mkdir()
        anchor, (bundle,) = build_inputs(cfg, root / "inputs")
        ca = init_ca(root / "ca", "Benchmark CA")
        req = generate_key_and_csr("org1", root / "owner")
        cert = issue_certificate(root / "ca", req.csr, "owner", out=root / "owner.pem")
        sign_bundle(bundle, req.key, cert.path, [ca.cert])
        files = [bundle / "expert.safetensors", bundle / "expert.json"]
        nbytes = sum(f.stat().st_size for f in files)

        def sha256sum() -> None:
            subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)

        def hashlib_sha256() -> None:
            for f in files:
                with open(f, "rb") as fh:
                    hashlib.file_digest(fh, "sha256")

        def verify() -> None:
            BundleVerifier(ca.cert, crl=ca.crl).verify(bundle)

        def verify_full() -> None:
            BundleVerifier(ca.cert, crl=ca.crl, anchor=anchor).verify(bundle)

        methods = {
            "sha256sum": sha256sum,
            "python hashlib": hashlib_sha256,
            "verify": verify,
            "verify+validate": verify_full,
        }
        times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(args.repeat):
            k = r % len(methods)
            order = list(methods)[k:] + list(methods)[:k]
            for m in order:
                t0 = time.perf_counter()
                methods[m]()
                times[m].append(time.perf_counter() - t0)
        base = statistics.median(times["sha256sum"])
        print(f"bundle: {nbytes / 1e6:,.0f} MB ({args.layers} layers, F32), {args.repeat} rounds")
        print(f"{'method':<18}{'median s':>10}{'MB/s':>10}{'vs sha256sum':>14}")
        for m, ts in times.items():
            t = statistics.median(ts)
            print(f"{m:<18}{t:>10.2f}{nbytes / 1e6 / t:>10.0f}{base / t:>13.2f}x")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
