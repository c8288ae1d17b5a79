"""The whole consortium flow through the real coordinator, with the commands people type.

Protects the issue's first promise: an operator initialises and serves a coordinator (a real
``flexfed coordinator serve`` process, mutual TLS on 127.0.0.1); two owners fetch the anchor,
train a tiny expert on their own data and sign it (``flexfed client train --sign``), submit
it (upload + verification + log); the operator releases a model; an auditor downloads it and
``flexfed audit verify`` passes against the log served by the coordinator. Then one owner opts
out: the next release leaves its expert out, and the earlier release now fails the audit
(its expert was withdrawn after it was released).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from consortium import Consortium, Member

from flexfed.common.moe.optout import AssembledModel
from flexfed.common.public.tiny import build_anchor
from flexfed.server.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FLEXFED = str(Path(sys.executable).parent / "flexfed")


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLEXFED, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def ok(*args: str | Path, env: dict[str, str] | None = None) -> str:
    done = run(*args, env=env)
    assert done.returncode == 0, f"flexfed {' '.join(map(str, args))}:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def coordinator(
    consortium: Consortium, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """``flexfed coordinator init`` + ``serve``; yields (address, directory)."""
    root = tmp_path_factory.mktemp("operator")
    anchor = build_anchor("olmo2", root / "anchor", hidden_size=32, num_hidden_layers=2)
    directory = root / "coordinator"
    ok(*consortium.coordinator_init_args(directory, anchor.path, "flow.example/log"))
    server = subprocess.Popen(
        [FLEXFED, "coordinator", "serve", str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert server.stdout is not None
    match = re.search(r"serving on (127\.0\.0\.1:\d+)", server.stdout.readline())
    assert match, server.stderr.read() if server.stderr else ""
    yield match.group(1), directory
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0


def as_member(address: str, consortium: Consortium, member: Member) -> dict[str, str]:
    """The connection, as the environment variables a member would export."""
    return {
        "FLEXFED_COORDINATOR": address,
        "FLEXFED_CA": str(consortium.pki.ca_pem),
        "FLEXFED_CERT": str(member.cert),
        "FLEXFED_KEY": str(member.key),
    }


def owner_trains_and_submits(
    consortium: Consortium, address: str, member: Member, home: Path, text: str
) -> str:
    """An owner's whole side, in its own directory; returns the accepted expert's id."""
    env = as_member(address, consortium, member)
    ok("client", "fetch-anchor", "--out", home / "anchor", "--quiet", env=env)
    data = home / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{text} {i}. " * 12}) + "\n" for i in range(60)))
    ok(
        "client", "train", "--public", home / "anchor", "--data", data, "--org", member.org,
        "--out", home / "expert", "--max-steps", "2", "--seq-len", "32", "--batch-size", "2",
        "--sign", "--key", member.key, "--cert", member.cert, "--chain", consortium.pki.ca_pem,
        "--quiet",
    )  # fmt: skip
    out = ok("client", "submit", home / "expert", "--quiet", env=env)
    match = re.search(r"accepted: \S+ as (sha256:[0-9a-f]{64}), log entry (\d+)", out)
    assert match, out
    return match.group(1)


def audit(
    consortium: Consortium, address: str, directory: Path, model: Path
) -> subprocess.CompletedProcess[str]:
    return run(
        "audit", "verify", model, "--trust", consortium.pki.ca_pem,
        "--crl", consortium.pki.crl_pem, "--log", f"grpcs://{address}",
        "--log-key", load_config(directory).log_public_key,
        "--cert", consortium.auditor.cert, "--key", consortium.auditor.key,
        "--log-origin", "flow.example/log",
    )  # fmt: skip


def test_fetch_train_sign_submit_release_download_audit_then_opt_out(
    consortium: Consortium, coordinator: tuple[str, Path], tmp_path: Path
) -> None:
    address, directory = coordinator
    acme = owner_trains_and_submits(
        consortium, address, consortium.acme, tmp_path / "acme", "one plus one is two"
    )
    globex = owner_trains_and_submits(
        consortium, address, consortium.globex, tmp_path / "globex", "the quick brown fox"
    )

    status = ok("client", "status", env=as_member(address, consortium, consortium.auditor))
    assert f"{acme}  acme/expert  accepted" in status
    assert f"{globex}  globex/expert  accepted" in status

    operator = as_member(address, consortium, consortium.operator)
    released = ok("coordinator", "release", env=operator)
    assert re.match(r"release 1: 2 experts, top-\d+", released), released

    auditor = as_member(address, consortium, consortium.auditor)
    ok("client", "fetch-model", "--out", tmp_path / "v1", "--quiet", env=auditor)
    slots = [s.get("org") for s in AssembledModel(tmp_path / "v1").slots]
    assert sorted(o for o in slots if o) == ["acme", "globex"]
    verdict = audit(consortium, address, directory, tmp_path / "v1")
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert "FAIL" not in verdict.stdout

    # An owner changes its mind: opt-out, signed with its own key.
    out = ok(
        "client", "optout", globex, "--org", "globex",
        env=as_member(address, consortium, consortium.globex),
    )  # fmt: skip
    assert f"opt-out: {globex} is now opted_out" in out
    other = run("client", "optout", acme, "--org", "acme", env=as_member(
        address, consortium, consortium.globex))  # fmt: skip
    assert other.returncode != 0 and "PERMISSION_DENIED" in other.stderr

    assert re.match(r"release 2: 1 experts", ok("coordinator", "release", env=operator))
    ok("client", "fetch-model", "--out", tmp_path / "v2", "--quiet", env=auditor)
    assert [s.get("org") for s in AssembledModel(tmp_path / "v2").slots][1:] == ["acme"]
    assert audit(consortium, address, directory, tmp_path / "v2").returncode == 0
    stale = audit(consortium, address, directory, tmp_path / "v1")
    assert stale.returncode == 4, stale.stdout + stale.stderr  # globex withdrew after v1
    assert "opt" in stale.stdout.lower()

    check = run("coordinator", "check", directory)
    assert check.returncode == 0, check.stdout + check.stderr
