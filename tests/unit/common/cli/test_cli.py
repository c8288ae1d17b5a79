"""The ``flexfed`` console script as a user meets it: real processes, real exit codes.

A bad input gives exactly one line on stderr, ``flexfed: error: ...``, and the exit code of
its error family; ``--verbose`` adds the traceback. Good input assembles, inspects and opts
out. Nothing is written where it should not be. One family suffices here (the library tests
cover both), and each process costs a Python start-up, so the flows are few and whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from subprocess import PIPE

import pytest

from flexfed.common.errors import AssemblyError, NonFiniteTensorError, OutputExistsError
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.bundle import EXPERT_WEIGHTS
from flexfed.common.formats.safetensors_io import load_tensors, save_tensors

FLEXFED = str(Path(sys.executable).parent / "flexfed")

pytestmark = pytest.mark.parametrize("anchor", ["olmo2"], indirect=True)


def flexfed_all(*argvs: list[str | Path]) -> list[subprocess.CompletedProcess[str]]:
    """Run the installed console script once per argv, concurrently, as users would.

    Independent commands run side by side: each process spends most of its life importing
    torch, so this halves the wall-clock time of the file on two cores.
    """
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    procs = [
        (argv, subprocess.Popen([FLEXFED, *map(str, argv)], stdout=PIPE, stderr=PIPE, env=env))
        for argv in argvs
    ]
    done = []
    for argv, proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(
            subprocess.CompletedProcess(
                [FLEXFED, *argv], proc.returncode, out.decode(), err.decode()
            )
        )
    return done


def flexfed(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the installed console script once."""
    return flexfed_all(list(args))[0]


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single ``flexfed: error:`` line of a clean failure (asserts there is no more)."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("flexfed: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def listing(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``path`` with its bytes and modification time."""
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def nan_bundle(expert_factory: Callable[..., Path]) -> Path:
    """A well-formed bundle whose training diverged: one NaN in an up projection."""
    bundle = expert_factory("initech", seed=7)
    tensors = load_tensors(bundle / EXPERT_WEIGHTS)
    tensors["layers.1.up_proj.weight"][0, 0] = float("nan")
    save_tensors(bundle / EXPERT_WEIGHTS, tensors, {"format": "pt"})
    return bundle


def test_bad_bundle_fails_with_one_line(
    anchor: Anchor, expert_factory: Callable[..., Path], nan_bundle: Path, tmp_path: Path
) -> None:
    """No traceback, one line naming the problem, the family's exit code, no output left."""
    good = expert_factory("acme", seed=1)
    out = tmp_path / "models" / "moe"
    args: list[str | Path] = ["assemble", "--public", anchor.path, "--expert", good]
    args += ["--expert", nan_bundle, "--out", out, "--quiet"]
    proc, verbose = flexfed_all(args, ["--verbose", *args])
    assert proc.returncode == NonFiniteTensorError.exit_code
    line = one_error_line(proc)
    assert "layers.1.up_proj.weight holds 1 NaN" in line
    assert proc.stdout == ""
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []

    assert verbose.returncode == NonFiniteTensorError.exit_code
    assert "Traceback (most recent call last)" in verbose.stderr
    assert "NonFiniteTensorError" in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == line
    assert not out.exists()


def test_assemble_inspect_optout(
    anchor: Anchor, expert_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """The operator's flow on good bundles; inspect --json tells who is in which slot."""
    acme, globex = expert_factory("acme", seed=1), expert_factory("globex", seed=2)
    model, smaller = tmp_path / "moe", tmp_path / "moe-without-acme"

    proc = flexfed(
        "assemble", "--public", anchor.path, "--expert", acme, "--expert", globex,
        "--out", model, "--top-k", "2", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "3 experts (public + acme, globex), top-2" in proc.stdout

    before = listing(model)
    nowhere = tmp_path / "moe-without-initech"
    proc, dropped, unknown = flexfed_all(
        ["inspect", model, "--json"],
        ["optout", model, "--drop", "acme", "--out", smaller, "--quiet"],
        # An organisation that has no expert in the model: a clean refusal, nothing written.
        ["optout", model, "--drop", "initech", "--out", nowhere, "--quiet"],
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["kind"] == "assembled model"
    assert info["num_experts"] == 3 and info["top_k"] == 2
    assert info["anchor_digest"] == anchor.digest
    assert [(s["slot"], s["org"]) for s in info["slots"]] == [(0, None), (1, "acme"), (2, "globex")]

    assert dropped.returncode == 0, dropped.stderr
    assert "2 experts left (public + globex)" in dropped.stdout

    assert unknown.returncode == AssemblyError.exit_code
    assert "no expert of initech" in one_error_line(unknown)
    assert not nowhere.exists()
    assert listing(model) == before

    proc = flexfed("inspect", smaller, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert [s["org"] for s in info["slots"]] == [None, "globex"]
    assert [s["org"] for s in info["removed"]] == ["acme"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["experts", "moe", "moe-without-acme"]
    )


def test_assemble_into_an_existing_directory_touches_nothing(
    anchor: Anchor, expert_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """An existing --out is never overwritten, merged into or removed."""
    good = expert_factory("acme", seed=1)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "results.txt").write_text("months of work\n")
    (out / "model.safetensors").write_bytes(b"not ours to replace")
    before = listing(out)

    proc = flexfed("assemble", "--public", anchor.path, "--expert", good, "--out", out, "--quiet")
    assert proc.returncode == OutputExistsError.exit_code
    assert "already exists" in one_error_line(proc)
    assert listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experts", "precious"]


def test_inspect_never_sends_an_artifacts_control_characters_to_the_terminal(
    anchor: Anchor, tmp_path: Path
) -> None:
    """An owner's expert.json may carry ESC sequences (set the title, clear the screen)."""
    from dataclasses import replace

    from conftest import make_meta

    from flexfed.common.formats.bundle import write_bundle
    from flexfed.common.moe.training_model import build_training_model, extract_expert

    meta = replace(make_meta(anchor, "acme"), license="MIT\x1b]0;pwned\x07\x1b[2J\u202eevil")
    bundle = write_bundle(
        tmp_path / "bundle", extract_expert(build_training_model(anchor)), meta, anchor
    )
    shown = flexfed("inspect", bundle)
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "\u202e" not in shown.stdout
    assert "license            MIT\\x1b]0;pwned\\x07\\x1b[2J\\u202eevil" in shown.stdout
    as_json = flexfed("inspect", bundle, "--json")
    assert json.loads(as_json.stdout)["license"] == "MIT\x1b]0;pwned\x07\x1b[2J\u202eevil"
