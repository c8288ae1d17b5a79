"""Assembly benchmark: throughput against a plain file copy, peak memory against the largest shard.

What is measured, on CPU, with inputs built in code (nothing is downloaded):

- **Throughput.** A synthetic OLMo-2-shaped dense public model is written directly as safetensors
(random weights, generated tensor by tensor from a seeded generator), made an anchor with
:func:`flexfed.common.formats.anchor.create_anchor` (r_pub = random vectors), and N expert bundles
are written with :func:`flexfed.common.formats.bundle.write_bundle`. The baseline is copying the
very files assembly reads (the anchor's weight files and every ``expert.safetensors``) into a fresh
directory on the same filesystem, each file fsynced as assembly fsyncs each shard: once with
``shutil.copyfile`` (``sendfile`` on Linux), once with a plain ``os.copy_file_range`` loop (the
system call assembly itself uses, so that ratio is assembly's own overhead). Assembly is then timed
in phases, the way ``flexfed assemble`` runs it: open the anchor (headers only), the anchor digest
(SHA-256 of every anchor file), validation of every bundle (strict header, keys, shapes, dtype,
every value read once for finiteness, SHA-256 of each file), and the write (byte ranges streamed
into shards). Throughput is output weight bytes per second, for the write alone and end to end, each
as a ratio to the copyfile baseline's bytes per second; CPU seconds (user + system) are shown beside
wall seconds, as a hint of which parts are CPU-bound. ``os.sync()`` runs before each timed part so
none pays for another's dirty pages; the sources are in the page cache for all of them (they were
just written), so this compares CPU and write costs, not cold reads. The copies and the assembly
alternate, in a rotating order, for ``--repeat`` rounds; times are medians, and the per-round ratios
are printed too, because on a shared 2-core machine one round can be far off.

- **Peak memory.** The assembly runs in a child process (this script with ``--child``); the
  child reads its own peak resident set size (``VmHWM`` in ``/proc/self/status``) after
  validation, resets it (``/proc/self/clear_refs``), and reads it again after the write, so
  the write's peak is known separately. A second child only imports torch and flexfed (the
  same imports) and reports its peak: the baseline. Printed: the peak, the increase over the
  baseline, and both as ratios to the largest shard written.

Memory of the parent is not part of the measurement: each bundle's tensors are generated in
memory at once (write_bundle takes a dict, and save_tensors serialises every tensor to bytes
before writing), so the parent holds about two copies of one bundle (~0.6 GB at the
defaults) while writing it.

Run: ``.venv/bin/python benchmarks/assemble.py`` (defaults: 4 experts of 6 layers, hidden
1024, intermediate 4096, F32 = 4 x 302 MB of expert weights, 5 rounds; about 5 GB of
scratch disk and 1 minute on 2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexfed.common.cli.options import parse_size
from flexfed.common.errors import FlexfedError
from flexfed.common.formats.anchor import Anchor, create_anchor, open_anchor
from flexfed.common.formats.bundle import (
    EXPERT_WEIGHTS,
    ExpertBundle,
    ExpertMeta,
    expected_tensors,
    validate_bundle,
    write_bundle,
)
from flexfed.common.formats.checkpoint import CONFIG_FILE, Checkpoint
from flexfed.common.formats.safetensors_io import (
    DTYPE_SIZES,
    TORCH_DTYPES,
    OutTensor,
    build_header,
    tensor_bytes,
)
from flexfed.common.moe.assembly import assemble

MB = 10**6  # throughput and sizes are reported in decimal megabytes
_CHILD_FLAG = "--child"


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the synthetic models and where to put them."""

    experts: int = 4
    layers: int = 6
    hidden: int = 1024
    intermediate: int = 4096
    dtype: str = "F32"
    max_shard_bytes: int = 500 * MB
    workdir: Path | None = None
    keep: bool = False
    seed: int = 0
    repeat: int = 5

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise SystemExit(f"--dtype must be one of {sorted(TORCH_DTYPES)}, got {self.dtype!r}")
        for name in ("experts", "layers", "hidden", "intermediate", "repeat"):
            if getattr(self, name) < 1:
                raise SystemExit(f"--{name} must be at least 1")
        if self.hidden % 64:
            raise SystemExit("--hidden must be a multiple of 64 (attention heads of 64)")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    def expert_bytes(self) -> int:
        """Weight bytes of one expert bundle (FFN + router row + bias, every layer)."""
        per_layer = 3 * self.hidden * self.intermediate + self.hidden + 1
        return self.layers * per_layer * self.itemsize


# --- measuring -----------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; ru_maxrss where /proc is missing)."""
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        # NOTE: ru_maxrss is KiB on Linux, bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return kb * 1024


def current_rss_bytes() -> int | None:
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process: user + system, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


# --- building the inputs -------------------------------------------------------------------


_TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def public_specs(cfg: BenchConfig) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...]]]]:
    """config.json and (name, shape) of every tensor of an OLMo-2 model with these sizes.

    The names and shapes come from transformers' own Olmo2ForCausalLM built on the meta
    device (no memory), so the synthetic model is exactly what save_pretrained would write.
    """
    # NOTE: imported here, not at the top, so the child that measures memory never loads
    # transformers: its import-only baseline would otherwise include it.
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from flexfed.common.public.tiny import tiny_config

    config = tiny_config(
        "olmo2",
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.hidden // 64,
    )
    assert isinstance(config, Olmo2Config)
    config.architectures = ["Olmo2ForCausalLM"]
    config.dtype = _TORCH_DTYPE_NAMES[cfg.dtype]
    with torch.device("meta"):
        model = Olmo2ForCausalLM(config)
    specs = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    return config.to_dict(), specs


def random_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator
) -> torch.Tensor:
    """A plausible initial value: norms are ones, everything else N(0, 0.02)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def write_streaming(
    path: Path, specs: Sequence[tuple[str, tuple[int, ...]]], dtype: str, seed: int
) -> None:
    """Write a safetensors file of random tensors, one tensor in memory at a time."""
    torch_dtype = TORCH_DTYPES[dtype]
    header = build_header([OutTensor(n, dtype, s) for n, s in specs], {"format": "pt"})
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(header)
        for name, shape in specs:
            f.write(tensor_bytes(random_tensor(name, shape, torch_dtype, g)))
        f.flush()
        os.fsync(f.fileno())


def build_inputs(cfg: BenchConfig, root: Path) -> tuple[Anchor, list[Path]]:
    """Write the public model, make it an anchor, write the expert bundles."""
    # NOTE: tiny imports transformers; kept out of the child (see public_specs).
    from flexfed.common.public.tiny import byte_tokenizer

    public = root / "public"
    public.mkdir()
    config, specs = public_specs(cfg)
    (public / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    write_streaming(public / "model.safetensors", specs, cfg.dtype, cfg.seed)
    byte_tokenizer().save_pretrained(public)

    g = torch.Generator().manual_seed(cfg.seed + 1)
    r_pub = [torch.randn(cfg.hidden, generator=g) * 0.02 for _ in range(cfg.layers)]
    anchor = create_anchor(public, root / "anchor", r_pub, {"kind": "random", "seed": cfg.seed})
    shutil.rmtree(public)  # the anchor is a full copy; free the disk
    _ = anchor.digest  # every expert.json names it; the child recomputes it, timed

    torch_dtype = TORCH_DTYPES[cfg.dtype]
    dirs = []
    for j in range(cfg.experts):
        g = torch.Generator().manual_seed(cfg.seed + 100 + j)
        # NOTE: write_bundle takes the whole bundle as a dict, so one bundle (~0.3 GB at the
        # defaults) is in memory at once here, about twice over while it is serialised.
        tensors = {
            name: random_tensor(name, shape, torch_dtype, g)
            for name, shape in expected_tensors(anchor.shapes).items()
        }
        meta = ExpertMeta(
            org=f"org{j + 1}",
            name="expert",
            family=anchor.family.dense_model_type,
            anchor_digest=anchor.digest,
            shapes=anchor.shapes,
            data_commitment=f"{j + 1:064x}",
            training={"synthetic": True, "seed": cfg.seed + 100 + j},
            license="benchmark",
        )
        dirs.append(write_bundle(root / "experts" / f"org{j + 1}", tensors, meta, anchor))
        del tensors
    return anchor, dirs


def estimated_disk_bytes(cfg: BenchConfig) -> int:
    """Peak scratch space: the anchor and the bundles, plus a copy and an assembled model."""
    h, i, n = cfg.hidden, cfg.intermediate, cfg.layers
    per_layer = 4 * h * h + 3 * h * i + 4 * h
    public = (n * per_layer + 2 * 258 * h + h) * cfg.itemsize
    experts = cfg.experts * cfg.expert_bytes()
    # The public model is deleted once the anchor exists, so the peak is anchor + bundles +
    # one copy of both + one assembled model (the last round's output stays while it copies).
    return max(2 * public, public + experts + 2 * (public + experts)) + 64 * MB


# --- the two timed operations --------------------------------------------------------------


def source_files(anchor: Anchor, experts: Sequence[Path]) -> list[Path]:
    """The files whose bytes assembly streams into its output."""
    files = [anchor.path / name for name in anchor.checkpoint.weight_files]
    files.append(anchor.path / "router_pub.safetensors")
    files.extend(d / EXPERT_WEIGHTS for d in experts)
    return files


def _copyfile(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)  # os.sendfile on Linux: in-kernel, no user-space buffer


def _copy_file_range(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        remaining = os.fstat(fin.fileno()).st_size
        while remaining > 0:
            sent = os.copy_file_range(fin.fileno(), fout.fileno(), remaining)
            if sent == 0:
                raise SystemExit(f"{src} shrank while it was copied")
            remaining -= sent


COPIERS: dict[str, Callable[[Path, Path], None]] = {
    "copyfile": _copyfile,
    "copy_file_range": _copy_file_range,
}


def copy_baseline(
    sources: Sequence[Path], dest: Path, copier: Callable[[Path, Path], None]
) -> tuple[int, float, float]:
    """Copy files into a fresh directory, fsyncing each; (bytes, wall s, CPU s)."""

    def copy_all() -> int:
        total = 0
        for k, src in enumerate(sources):
            out = dest / f"{k:03d}-{src.name}"
            copier(src, out)
            with open(out, "rb+") as f:
                os.fsync(f.fileno())
            total += out.stat().st_size
        return total

    dest.mkdir()
    os.sync()
    total, wall, cpu = timed(copy_all)
    shutil.rmtree(dest)
    return total, wall, cpu


def child_assemble(
    anchor_dir: Path, expert_dirs: Sequence[Path], out: Path, shard: int
) -> dict[str, Any]:
    """In the child: the assembly as ``flexfed assemble`` runs it, timed and measured by phase."""
    result: dict[str, Any] = {"rss_after_import": current_rss_bytes()}
    anchor, result["t_open"], result["c_open"] = timed(lambda: open_anchor(anchor_dir))
    _, result["t_digest"], result["c_digest"] = timed(lambda: anchor.digest)
    bundles: list[ExpertBundle]
    bundles, result["t_validate"], result["c_validate"] = timed(
        lambda: [validate_bundle(d, anchor) for d in expert_dirs]
    )
    result["peak_through_validation"] = peak_rss_bytes()
    result["write_peak_separate"] = reset_peak_rss()
    result["rss_before_write"] = current_rss_bytes()
    _, result["t_write"], result["c_write"] = timed(
        lambda: assemble(anchor, expert_dirs, out, max_shard_bytes=shard, bundles=bundles)
    )
    result["peak_write"] = peak_rss_bytes()
    shards = sorted(out.glob("*.safetensors"))
    result["shards"] = [p.stat().st_size for p in shards]
    return result


def run_child(args: Sequence[str]) -> dict[str, Any]:
    """Run this script with --child in a fresh interpreter; return the JSON it prints."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), _CHILD_FLAG, *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {args[:1]} failed:\n{proc.stderr.strip()}")
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc


def child_main(argv: Sequence[str]) -> None:
    """A child's entry: ``idle`` (imports only) or ``assemble ANCHOR OUT SHARD EXPERT...``."""
    if argv[0] == "idle":
        print(json.dumps({"peak": peak_rss_bytes(), "rss": current_rss_bytes()}))
        return
    anchor_dir, out, shard, *experts = argv[1:]
    doc = child_assemble(Path(anchor_dir), [Path(e) for e in experts], Path(out), int(shard))
    print(json.dumps(doc))


# --- reporting -----------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / MB:,.0f} MB"


def _rss_row(label: str, n: int, largest: int) -> str:
    return f"{label:<34}{n / MB:>10,.0f}{n / largest:>10.3f}"


@dataclass(frozen=True)
class Round:
    """One copy baseline and one assembly, run back to back."""

    copied: int
    t_copy: dict[str, float]  # copier name -> wall seconds
    c_copy: dict[str, float]  # copier name -> CPU seconds
    child: dict[str, Any]

    @property
    def out_bytes(self) -> int:
        return int(sum(self.child["shards"]))

    @property
    def t_total(self) -> float:
        c = self.child
        return float(c["t_open"] + c["t_digest"] + c["t_validate"] + c["t_write"])

    @property
    def c_total(self) -> float:
        c = self.child
        return float(c["c_open"] + c["c_digest"] + c["c_validate"] + c["c_write"])

    @property
    def peak(self) -> int:
        return int(max(self.child["peak_through_validation"], self.child["peak_write"]))


def report(
    cfg: BenchConfig,
    expert_total: int,
    idle: dict[str, Any],
    rounds: list[Round],
    load: tuple[float, float],
) -> str:
    """The table: medians over the rounds for times, the maximum for memory."""

    def med(values: Sequence[float]) -> float:
        return statistics.median(values)

    out_bytes = rounds[0].out_bytes
    copied = rounds[0].copied
    largest = max(max(r.child["shards"]) for r in rounds)
    copy_wall = med([r.t_copy["copyfile"] for r in rounds])
    copy_cpu = med([r.c_copy["copyfile"] for r in rounds])

    def per_round(copier: str) -> str:
        ratios = [
            (r.out_bytes / r.child["t_write"]) / (r.copied / r.t_copy[copier]) for r in rounds
        ]
        return ", ".join(f"{x:.2f}" for x in ratios)

    def row(label: str, nbytes: int | None, wall: float, cpu: float) -> str:
        """Bytes, wall time, throughput and its ratio to the copyfile baseline, CPU time."""
        if nbytes is None:
            return f"{label:<32}{'':>8}{wall:>8.2f}{'':>8}{'':>8}{cpu:>8.2f}"
        rate = nbytes / wall
        return (
            f"{label:<32}{nbytes / MB:>8,.0f}{wall:>8.2f}{rate / MB:>8.0f}"
            f"{rate / (copied / copy_wall):>8.2f}{cpu:>8.2f}"
        )

    def child_row(label: str, key: str, nbytes: int | None) -> str:
        wall = med([r.child["t_" + key] for r in rounds])
        cpu = med([r.child["c_" + key] for r in rounds])
        return row(label, nbytes, wall, cpu)

    cfr_wall = med([r.t_copy["copy_file_range"] for r in rounds])
    cfr_cpu = med([r.c_copy["copy_file_range"] for r in rounds])
    write_wall = med([r.child["t_write"] for r in rounds])
    peak = max(r.peak for r in rounds)
    base = int(idle["peak"])
    lines = [
        f"assembly benchmark: {cfg.experts} experts x {cfg.layers} layers, hidden {cfg.hidden}, "
        f"intermediate {cfg.intermediate}, {cfg.dtype}, max shard {_mb(cfg.max_shard_bytes)}",
        f"expert weights {_mb(expert_total)} ({expert_total / 2**30:.2f} GiB); output "
        f"{_mb(out_bytes)} in {len(rounds[0].child['shards'])} shard(s); {os.cpu_count()} CPUs; "
        f"median of {len(rounds)} round(s)",
        f"1-minute load average at start {load[0]:.2f}, at end {load[1]:.2f} "
        "(other work on the machine makes the times noisy)",
        "",
        f"{'throughput (medians)':<32}{'MB':>8}{'wall s':>8}{'MB/s':>8}{'x copy':>8}{'CPU s':>8}",
        row("copy baseline (copyfile+fsync)", copied, copy_wall, copy_cpu),
        row("  copy_file_range+fsync", copied, cfr_wall, cfr_cpu),
        child_row("assembly: write", "write", out_bytes),
        row(
            "assembly: end to end",
            out_bytes,
            med([r.t_total for r in rounds]),
            med([r.c_total for r in rounds]),
        ),
        child_row("  open anchor (headers)", "open", None),
        child_row("  anchor digest (SHA-256)", "digest", None),
        child_row("  validate bundles", "validate", None),
        f"validation: {expert_total / MB:,.0f} MB of expert weights at "
        f"{expert_total / med([r.child['t_validate'] for r in rounds]) / MB:,.0f} MB/s",
        "write / copy_file_range copy: "
        f"{(out_bytes / write_wall) / (copied / cfr_wall):.2f} (medians)",
        f"write / copyfile, each round: {per_round('copyfile')}",
        f"write / copy_file_range, each round: {per_round('copy_file_range')}",
        "",
        f"{'peak RSS (child processes)':<34}{'MB':>10}{'x shard':>10}",
        _rss_row("import-only child (baseline)", base, largest),
        _rss_row("assembly child, whole run", peak, largest),
        _rss_row("  increase over baseline", peak - base, largest),
        _rss_row(
            "  peak through validation",
            max(r.child["peak_through_validation"] for r in rounds),
            largest,
        ),
    ]
    rises = [
        r.child["peak_write"] - r.child["rss_before_write"]
        for r in rounds
        if r.child["write_peak_separate"] and r.child["rss_before_write"] is not None
    ]
    if rises:
        lines.append(_rss_row("  write: rise over its start", max(rises), largest))
    lines.append(_rss_row("largest shard written", largest, largest))
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    d = BenchConfig()
    p.add_argument("--experts", type=int, default=d.experts, help="number of expert bundles")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--dtype", default=d.dtype, choices=sorted(TORCH_DTYPES))
    p.add_argument("--max-shard-size", default="500MB", help="e.g. 500MB, 2GiB (default 500MB)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch directory (default: a new temp dir, deleted at the end)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch files")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--repeat", type=int, default=d.repeat, help="rounds of copy + assembly (medians shown)"
    )
    a = p.parse_args(argv)
    try:
        shard = parse_size(a.max_shard_size)
    except FlexfedError as err:
        p.error(str(err))
    return BenchConfig(
        a.experts,
        a.layers,
        a.hidden,
        a.intermediate,
        a.dtype,
        shard,
        a.workdir,
        a.keep,
        a.seed,
        a.repeat,
    )


def prepare_workdir(cfg: BenchConfig) -> tuple[Path, bool]:
    """(scratch root, whether we created it); refuses a non-empty --workdir."""
    if cfg.workdir is None:
        return Path(tempfile.mkdtemp(prefix="flexfed-bench-assemble-")), True
    created = not cfg.workdir.exists()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    if any(cfg.workdir.iterdir()):
        raise SystemExit(f"--workdir {cfg.workdir} is not empty; give an empty or new directory")
    return cfg.workdir, created


def main(argv: Sequence[str]) -> None:
    cfg = parse_args(argv)
    root, created = prepare_workdir(cfg)
    try:
        need = estimated_disk_bytes(cfg)
        free = shutil.disk_usage(root).free
        if free < need:
            raise SystemExit(
                f"not enough free disk in {root}: need about {need / 1e9:.1f} GB, "
                f"{free / 1e9:.1f} GB free; use --workdir on a larger filesystem or fewer --experts"
            )
        expert_total = cfg.experts * cfg.expert_bytes()
        if expert_total < 10**9:
            print(f"note: {_mb(expert_total)} of expert weights is under 1 GB", file=sys.stderr)

        (anchor, experts), t_build, _ = timed(lambda: build_inputs(cfg, root))
        print(f"built the anchor and {len(experts)} bundles in {t_build:.0f} s", file=sys.stderr)
        load_start = os.getloadavg()[0]
        idle = run_child(["idle"])
        sources = source_files(anchor, experts)
        out = root / "assembled"
        rounds = []
        steps = [*COPIERS, "assemble"]
        for k in range(cfg.repeat):
            # NOTE: the order rotates from round to round, so no path is always the one that
            # runs first after the previous round's files were deleted.
            order = steps[k % len(steps) :] + steps[: k % len(steps)]
            t_copy: dict[str, float] = {}
            c_copy: dict[str, float] = {}
            copied = 0
            child: dict[str, Any] = {}
            for step in order:
                if step in COPIERS:
                    copied, t_copy[step], c_copy[step] = copy_baseline(
                        sources, root / "copy", COPIERS[step]
                    )
                    continue
                if out.exists():
                    shutil.rmtree(out)
                os.sync()
                args = ["assemble", str(anchor.path), str(out), str(cfg.max_shard_bytes)]
                child = run_child([*args, *map(str, experts)])
            rounds.append(Round(copied, t_copy, c_copy, child))
            print(f"round {k + 1}/{cfg.repeat}: {' -> '.join(order)}", file=sys.stderr)
        # Sanity: the output parses as a checkpoint and holds every expert's bytes.
        ckpt = Checkpoint.open(out)
        if ckpt.total_bytes() < expert_total:
            raise SystemExit(f"the assembled model holds only {_mb(ckpt.total_bytes())}")
        load = (load_start, os.getloadavg()[0])
        print(report(cfg, expert_total, idle, rounds, load))
    finally:
        if cfg.keep:
            print(f"kept the scratch files in {root}", file=sys.stderr)
        elif created:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for p in root.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == _CHILD_FLAG:
        child_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
