"""The paper's comparison at small scale: FlexOlmo vs the baselines, ablations and opt-out.

Same data and the same training budget (steps x batch x sequence length) for every method:

- ``public``: the public model alone;
- ``dense-own``: each owner's dense full fine-tune, evaluated on its own domain (the "expert
  alone" row; on other domains the dense fine-tunes are not defined as one model);
- ``soup``: the uniform average of the owners' dense fine-tunes;
- ``btm``: Branch-Train-Merge ensemble of the public model and the dense fine-tunes; per
  sequence, weights softmax(-L_i(prefix)) over each model's loss on the first ``PREFIX``
  tokens, top-2, renormalised; next-token probabilities mixed with those weights;
- ``flexolmo``: the assembled MoE of the coordinated experts (the demo's recipe);
- ablations: ``-no-bias`` (b_i fixed at 0), ``-random-init`` (r_i random instead of the mean
  hidden state of the owner's documents), ``-embedder`` (r_pub and every r_i from the
  external embedder all-MiniLM-L6-v2 through the anchor's projection, as in the paper,
  instead of the public model's hidden states), ``-uncoordinated`` (each FFN fine-tuned alone
  in a dense copy of the public model, then merged with domain-embedding router rows).

Every method is scored on the same tokens: each domain's held-out documents (the trainer's
document-level split), positions ``PREFIX``.. of each sequence (BTM needs the prefix to pick
its weights). Then the opt-out experiment: remove each expert in turn from ``flexolmo`` and
report every domain's change. Writes ``flexmix.json``, ``flexmix.md`` and ``flexmix.png``.

    .venv/bin/python benchmarks/flexmix.py [--quick] [--workdir DIR] [--domains code,math]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers is imported

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from flexfed.client.trainer import train_expert
from flexfed.common.data.corpora import CLOSED_DOMAINS, write_domain
from flexfed.common.data.documents import data_commitment, read_documents
from flexfed.common.data.packing import pack_documents
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.bundle import ExpertMeta, write_bundle
from flexfed.common.moe.assembly import assemble
from flexfed.common.moe.config import TrainConfig
from flexfed.common.moe.evaluation import held_out, load_tokenizer
from flexfed.common.moe.optout import optout
from flexfed.common.moe.recipe import train_dense
from flexfed.common.moe.router_init import mlp_input_means, sample_documents
from flexfed.common.moe.training_model import build_training_model, extract_expert
from flexfed.server.demo import local as demo

PREFIX = 16


def expert_config(s: demo.DemoSettings) -> TrainConfig:
    return TrainConfig(
        seq_len=s.seq_len,
        batch_size=s.batch_size,
        max_steps=s.expert_steps,
        lr=s.lr,
        **demo.EXPERT_OPTIONS,
    )


def uncoordinated_expert(
    anchor: Anchor, org: str, domain_file: Path, out: Path, cfg: TrainConfig
) -> Path:
    """An FFN fine-tuned alone in a dense copy of the public model, packed as a bundle."""
    tokenizer = load_tokenizer(anchor.path)
    docs = list(read_documents([domain_file]))
    packed = pack_documents(docs, tokenizer, cfg.seq_len, cfg.val_fraction)
    dense = AutoModelForCausalLM.from_pretrained(anchor.path, dtype=torch.float32)
    norm = (anchor.meta.get("embedder") or {}).get("norm")  # the anchor's space
    r_init = mlp_input_means(dense, tokenizer, sample_documents(docs, 200), cfg.seq_len, norm=norm)
    train_dense(dense, packed.train, cfg, only=".mlp.")
    model = build_training_model(anchor, r_init)
    with torch.no_grad():
        for layer, mlp in zip(dense.model.layers, model.model.layers, strict=True):
            mlp.mlp.expert.load_state_dict(layer.mlp.state_dict())
    commitment, _ = data_commitment([domain_file])
    meta = ExpertMeta(
        org=org,
        name=f"{domain_file.stem}-uncoordinated",
        family=anchor.family.dense_model_type,
        anchor_digest=anchor.digest,
        shapes=anchor.shapes,
        data_commitment=commitment,
        training={"steps": cfg.max_steps, "method": "uncoordinated"},
        license="benchmark",
    )
    return write_bundle(out, extract_expert(model), meta, anchor)


def soup(dirs: list[Path], out: Path) -> Path:
    """Uniform average of models with identical architecture."""
    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32) for d in dirs]
    avg = models[0]
    with torch.no_grad():
        states = [m.state_dict() for m in models]
        for key, value in avg.state_dict().items():
            value.copy_(torch.stack([s[key] for s in states]).mean(0))
    avg.save_pretrained(out)
    load_tokenizer(dirs[0]).save_pretrained(out)
    return out


@torch.no_grad()
def token_logprobs(model: PreTrainedModel, ids: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """(N, T-1) log-probabilities of each next token."""
    out = []
    for i in range(0, len(ids), batch):
        x = ids[i : i + batch]
        logp = F.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
        out.append(logp.gather(-1, x[:, 1:, None]).squeeze(-1))
    return torch.cat(out)


def score(logp: torch.Tensor) -> float:
    """Mean next-token loss over positions PREFIX.. (the tokens every method is scored on)."""
    return float(-logp[:, PREFIX - 1 :].mean())


def btm(logps: list[torch.Tensor], top: int = 2) -> torch.Tensor:
    """BTM ensemble's per-token log-probabilities (weights from each model's prefix loss)."""
    stacked = torch.stack(logps)  # (M, N, T-1)
    prefix_ll = stacked[:, :, : PREFIX - 1].sum(-1)  # (M, N)
    keep = prefix_ll.topk(min(top, len(logps)), dim=0).indices
    mask = torch.full_like(prefix_ll, float("-inf")).scatter(0, keep, 0.0)
    w = torch.log_softmax(prefix_ll + mask, dim=0)  # (M, N)
    return torch.logsumexp(stacked + w[:, :, None], dim=0)  # (N, T-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo's --quick sizes")
    ap.add_argument("--workdir", type=Path, default=Path("flexmix-work"))
    ap.add_argument(
        "--domains",
        default=",".join(CLOSED_DOMAINS),
        help="comma-separated closed domains, one owner each (default: all)",
    )
    args = ap.parse_args()
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    t0 = time.monotonic()
    s = demo.DemoSettings.preset(args.quick)
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    public_corpus = write_domain("public", work / "corpora", s.public_chars)
    files = {d: write_domain(d, work / "corpora", s.corpus_chars) for d in domains}
    public = demo.build_public(s, public_corpus, work / "public")
    anchor = demo.publish_anchor(public, public_corpus, work / "anchor", max_tokens=s.seq_len)
    minilm = demo.publish_anchor(
        public, public_corpus, work / "anchor-minilm", max_tokens=s.seq_len, kind="minilm"
    )
    tokenizer = load_tokenizer(anchor.path)

    cfg = expert_config(s)
    variants = {  # name -> (anchor, recipe)
        "flexolmo": (anchor, cfg),
        "flexolmo-no-bias": (anchor, replace(cfg, learn_bias=False, bias_init=0.0)),
        "flexolmo-random-init": (anchor, replace(cfg, router_init="random")),
        "flexolmo-embedder": (minilm, replace(cfg, router_init="embedder")),
    }
    anchors = {v: a for v, (a, _) in variants.items()}
    anchors["flexolmo-uncoordinated"] = anchor
    experts: dict[str, list[Path]] = {v: [] for v in [*variants, "flexolmo-uncoordinated"]}
    dense_dirs: dict[str, Path] = {}
    for i, domain in enumerate(domains):
        org = f"owner-{chr(ord('a') + i)}"
        for v, (v_anchor, vcfg) in variants.items():
            out = work / v / org
            print(f"[{time.monotonic() - t0:6.0f}s] {v}: {org} on {domain}", flush=True)
            data = [files[domain]]
            train_expert(v_anchor.path, data, org, out, vcfg, name=domain, progress=False)
            experts[v].append(out)
        print(f"[{time.monotonic() - t0:6.0f}s] uncoordinated + dense: {org}", flush=True)
        experts["flexolmo-uncoordinated"].append(
            uncoordinated_expert(anchor, org, files[domain], work / "uncoordinated" / org, cfg)
        )
        docs = [d for d in read_documents([files[domain]])]
        train_docs = [d for d in docs if d not in set(held_out(docs, cfg.val_fraction))]
        packed = pack_documents(train_docs, tokenizer, cfg.seq_len, 0.0)
        dense = AutoModelForCausalLM.from_pretrained(anchor.path, dtype=torch.float32)
        train_dense(dense, packed.train, cfg)
        dense_dirs[domain] = work / "dense" / domain
        dense.save_pretrained(dense_dirs[domain])
        tokenizer.save_pretrained(dense_dirs[domain])

    top_k = demo.TOP_K
    models: dict[str, Path] = {"public": anchor.path}
    for v, dirs in experts.items():
        models[v] = work / "models" / v
        assemble(anchors[v], dirs, models[v], top_k=top_k)
    models["soup"] = soup(list(dense_dirs.values()), work / "models" / "soup")

    eval_domains = ["public", *domains]
    eval_files = {"public": public_corpus, **files}
    eval_data: dict[str, torch.Tensor] = {}
    for d in eval_domains:
        docs = held_out(list(read_documents([eval_files[d]])), cfg.val_fraction)
        eval_data[d] = pack_documents(docs, tokenizer, s.seq_len, 0.0).train[: s.eval_sequences]

    def logps_of(path: Path) -> dict[str, torch.Tensor]:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        m.eval()  # type: ignore[no-untyped-call]  # PreTrainedModel.eval is unannotated
        return {d: token_logprobs(m, ids) for d, ids in eval_data.items()}

    print(f"[{time.monotonic() - t0:6.0f}s] evaluating", flush=True)
    logp = {name: logps_of(path) for name, path in models.items()}
    dense_logp = {dom: logps_of(path) for dom, path in dense_dirs.items()}
    table: dict[str, dict[str, float]] = {}
    for d in eval_domains:
        row = {name: score(lp[d]) for name, lp in logp.items()}
        row["dense-own"] = score(dense_logp[d][d]) if d in dense_logp else float("nan")
        row["btm"] = score(btm([logp["public"][d], *(dl[d] for dl in dense_logp.values())]))
        table[d] = row

    # Opt-out: remove each expert in turn; every domain's change vs the full model.
    opt: dict[str, dict[str, float]] = {}
    for i, domain in enumerate(domains):
        org = f"owner-{chr(ord('a') + i)}"
        path = work / "models" / f"flexolmo-without-{org}"
        optout(models["flexolmo"], [org], path)
        lp = logps_of(path)
        opt[f"{org} ({domain})"] = {d: score(lp[d]) - table[d]["flexolmo"] for d in eval_domains}

    columns = [
        "public",
        "dense-own",
        "soup",
        "btm",
        "flexolmo",
        "flexolmo-no-bias",
        "flexolmo-random-init",
        "flexolmo-embedder",
        "flexolmo-uncoordinated",
    ]
    closed = domains
    avg = {c: sum(table[d][c] for d in closed) / len(closed) for c in columns}
    results = {
        "quick": args.quick,
        "settings": s.__dict__,
        "expert_options": demo.EXPERT_OPTIONS,
        "top_k": top_k,
        "prefix": PREFIX,
        "loss": table,
        "closed_average": avg,
        "optout_delta": opt,
        "seconds": round(time.monotonic() - t0),
    }
    (work / "flexmix.json").write_text(json.dumps(results, indent=2) + "\n")
    md = render(results, columns)
    (work / "flexmix.md").write_text(md)
    chart(results, columns, work / "flexmix.png")
    print(md)


def render(r: dict[str, Any], columns: list[str]) -> str:
    lines = ["| domain | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for d, row in r["loss"].items():
        lines.append(f"| {d} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    avg = r["closed_average"]
    lines.append("| **closed avg** | " + " | ".join(f"**{avg[c]:.3f}**" for c in columns) + " |")
    lines += ["", "Opt-out: change in loss when each expert is removed (rows) per domain:", ""]
    doms = list(r["loss"])
    lines += ["| removed | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
    for who, deltas in r["optout_delta"].items():
        lines.append(f"| {who} | " + " | ".join(f"{deltas[d]:+.3f}" for d in doms) + " |")
    return "\n".join(lines) + "\n"


def chart(r: dict[str, Any], columns: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = [*r["loss"], "closed avg"]
    vals = {c: [*(r["loss"][d][c] for d in r["loss"]), r["closed_average"][c]] for c in columns}
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(11, 4))
    for i, c in enumerate(columns):
        ax.bar([j + i * width for j in range(len(doms))], vals[c], width, label=c)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(doms))], doms)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
