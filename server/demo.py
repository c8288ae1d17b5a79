"""``flexfed demo``: the whole FlexOlmo flow on one machine, on the embedded defaults.

1. The operator builds the public model: a small OLMo-2-shaped model with a locally trained
   BPE tokenizer, pre-trained by flexfed on the public corpus (cached and reused), and
   publishes it as the anchor with r_pub computed on public documents.
2. Each data owner, in its own working directory holding only its own data and a copy of the
   anchor, trains an expert with the real CLI (``flexfed client train``, a separate process).
3. The operator assembles the experts, evaluates every domain's held-out documents on the
   public model and on the assembled model, opts one owner out, and evaluates again.

The results (table, ``results.json``, ``results.png``) land in the work directory.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flexfed.common import __version__
from flexfed.common.anchor import Anchor, create_anchor, open_anchor
from flexfed.common.assembly import assemble
from flexfed.common.corpora import CLOSED_DOMAINS, write_domain
from flexfed.common.data import is_validation_document, pack_documents, read_documents
from flexfed.common.errors import FlexfedError
from flexfed.common.evaluation import evaluate_model, held_out
from flexfed.common.optout import optout
from flexfed.common.progress import console
from flexfed.common.router_init import mlp_input_means, sample_documents
from flexfed.common.tiny import build_public_model, train_bpe_tokenizer

log = logging.getLogger(__name__)

VAL_FRACTION = 0.05  # the trainer's default: evaluation uses exactly its held-out documents


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run; ``quick`` is what the end-to-end test runs."""

    corpus_chars: int
    public_chars: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    public_steps: int
    expert_steps: int
    seq_len: int
    batch_size: int
    lr: float
    eval_sequences: int

    @classmethod
    def preset(cls, quick: bool) -> DemoSettings:
        if quick:
            return cls(
                corpus_chars=300_000, public_chars=400_000, vocab_size=1024, hidden_size=64,
                intermediate_size=256, layers=2, heads=4, public_steps=150, expert_steps=50,
                seq_len=64, batch_size=16, lr=3e-3, eval_sequences=24,
            )
        return cls(
            corpus_chars=2_000_000, public_chars=470_000, vocab_size=4096, hidden_size=128,
            intermediate_size=512, layers=4, heads=4, public_steps=400, expert_steps=250,
            seq_len=128, batch_size=16, lr=3e-3, eval_sequences=64,
        )


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flexfed"


def _docs(path: Path) -> list[str]:
    return list(read_documents([path]))


def build_public(settings: DemoSettings, public_corpus: Path, out: Path) -> Path:
    """Train the public model on the public corpus (the operator's only data); cached."""
    from flexfed.client.trainer import TrainConfig, train_dense

    key_src = json.dumps({**asdict(settings), "version": __version__}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cached = cache_dir() / f"public-{key}"
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
            "olmo2", tmp, seed=0, tokenizer=tokenizer, hidden_size=settings.hidden_size,
            intermediate_size=settings.intermediate_size, num_hidden_layers=settings.layers,
            num_attention_heads=settings.heads, max_position_embeddings=max(512, settings.seq_len),
        )
        packed = pack_documents(train_docs, tokenizer, settings.seq_len, val_fraction=0.0)
        cfg = TrainConfig(
            seq_len=settings.seq_len, batch_size=settings.batch_size,
            max_steps=settings.public_steps, lr=settings.lr,
        )
        train_dense(model, packed.train, cfg, progress=True)
        model.save_pretrained(tmp)
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cached, ignore_errors=True)
        os.rename(tmp, cached)
    shutil.copytree(cached, out)
    return out


def publish_anchor(public: Path, public_corpus: Path, out: Path) -> Anchor:
    """r_pub = mean MLP input per layer over public documents (the paper's domain init)."""
    from transformers import AutoModelForCausalLM

    from flexfed.common.evaluation import load_tokenizer

    tokenizer = load_tokenizer(public)
    model = AutoModelForCausalLM.from_pretrained(public, dtype=torch.float32)
    docs = sample_documents(_docs(public_corpus), 200)
    r_pub = mlp_input_means(model, tokenizer, docs, max_tokens=256)
    return create_anchor(public, out, r_pub, {"kind": "hidden-states", "documents": len(docs)})


def train_owner(anchor: Anchor, org: str, domain_file: Path, home: Path, s: DemoSettings) -> Path:
    """One data owner: its own directory, its own data, the real CLI in its own process."""
    data_dir = home / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(domain_file, data_dir / domain_file.name)
    out = home / "expert"
    cmd = [
        sys.executable, "-m", "flexfed.common.cli", "client", "train",
        "--public", str(anchor.path), "--data", str(data_dir), "--org", org, "--name", domain_file.stem,
        "--out", str(out), "--max-steps", str(s.expert_steps), "--seq-len", str(s.seq_len),
        "--batch-size", str(s.batch_size), "--lr", str(s.lr), "--device", "cpu",
    ]
    console.print(f"owner {org}: training its {domain_file.stem} expert in {home}")
    proc = subprocess.run(cmd, cwd=home, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise FlexfedError(f"owner {org}'s training failed (exit {proc.returncode}); see the output above")
    console.print(f"owner {org}: {proc.stdout.strip()}")
    return out


def run_demo(workdir: Path, quick: bool = False) -> dict[str, Any]:
    """Run the whole flow in ``workdir``; return the results (also written as JSON)."""
    t0 = time.monotonic()
    s = DemoSettings.preset(quick)
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("operator", "owners", "corpora"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    corpora = workdir / "corpora"
    public_corpus = write_domain("public", corpora, s.public_chars)
    domain_files = {d: write_domain(d, corpora, s.corpus_chars) for d in CLOSED_DOMAINS}

    operator = workdir / "operator"
    operator.mkdir()
    public = build_public(s, public_corpus, operator / "public")
    anchor = publish_anchor(public, public_corpus, operator / "anchor")
    console.print(f"operator: published anchor {anchor.digest[:16]}...")

    experts = []
    orgs = {}
    for i, domain in enumerate(CLOSED_DOMAINS):
        org = f"owner-{chr(ord('a') + i)}"
        orgs[domain] = org
        home = workdir / "owners" / org
        shutil.copytree(anchor.path, home / "anchor")  # all an owner shares with the others
        experts.append(train_owner(open_anchor(home / "anchor"), org, domain_files[domain], home, s))

    model = operator / "flexolmo"
    record = assemble(anchor, experts, model, top_k=len(experts) + 1)
    dropped_domain = CLOSED_DOMAINS[-1]
    dropped = orgs[dropped_domain]
    without = operator / f"flexolmo-without-{dropped}"
    optout(model, [dropped], without)
    console.print(f"operator: assembled {record['num_experts']} experts; opted out {dropped}")

    domains = {"public": held_out(_docs(public_corpus), VAL_FRACTION)}
    domains.update({d: held_out(_docs(f), VAL_FRACTION) for d, f in domain_files.items()})
    kw = {"seq_len": s.seq_len, "max_sequences": s.eval_sequences}
    columns = {
        "public": evaluate_model(anchor.path, domains, **kw),
        "flexolmo": evaluate_model(model, domains, **kw),
        f"flexolmo-without-{dropped}": evaluate_model(without, domains, **kw),
    }
    results = {
        "quick": quick,
        "settings": asdict(s),
        "anchor_digest": anchor.digest,
        "owners": orgs,
        "opted_out": {"org": dropped, "domain": dropped_domain},
        "columns": list(columns),
        "loss": {d: {c: columns[c][d]["loss"] for c in columns} for d in domains},
        "seconds": round(time.monotonic() - t0, 1),
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_chart(results, workdir / "results.png")
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
