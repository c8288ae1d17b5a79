"""FlexOlmo's optional router tuning (RT) on proxy data, measured on a flexmix work directory.

For each closed domain of ``benchmarks/flexmix.py``'s work directory, the owner selects a
proxy set from the public corpus (training split only) with its own training documents
(:func:`flexfed.common.moe.router_tuning.select_proxy`); the coordinator then tunes every router
row of ``models/flexolmo`` on the proxies and the public training documents, each source
sampled uniformly (:func:`flexfed.common.moe.router_tuning.tune_router`). Variants:

- ``flexolmo-rt``: the paper's recipe, top-k as assembled during tuning;
- ``flexolmo-rt-topall``: the same with top-k = number of experts during tuning (the paper's
  setting; inference keeps the assembled top-k);
- ``flexolmo-rt-public``: control, tuned on the public documents only (no proxies): how much
  of any change is proxy selection rather than tuning at all;
- ``oracle-rt-own``: *not federated*, tuned on the owners' own training documents (what RT
  could do with real data; owners never share it, so this is a ceiling, not a method).

Every model is scored exactly as flexmix scores (the same held-out sequences, mean loss over
positions 16..), then the opt-out check on ``flexolmo-rt``: remove each expert, change per
domain. Writes ``router_tuning.json`` and ``router_tuning.md`` into the work directory.

    .venv/bin/python benchmarks/router_tuning.py --workdir /tmp/fmq [--proxy-docs 20] [--steps 200]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers is imported

import torch
from transformers import AutoModelForCausalLM

from flexfed.common.data.documents import read_documents
from flexfed.common.data.packing import pack_documents
from flexfed.common.moe.evaluation import held_out, load_tokenizer, routing_statistics
from flexfed.common.moe.optout import optout
from flexfed.common.moe.router_tuning import select_proxy, tune_router
from flexfed.server.demo import local as demo


def load_flexmix() -> ModuleType:
    """benchmarks/flexmix.py as a module: its scoring functions are the reference."""
    path = Path(__file__).with_name("flexmix.py")
    spec = importlib.util.spec_from_file_location("flexmix_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="a finished flexmix work dir")
    ap.add_argument("--proxy-docs", type=int, default=20, help="proxy documents per owner")
    ap.add_argument("--steps", type=int, default=200, help="router tuning steps")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.monotonic()
    fm = load_flexmix()
    work: Path = args.workdir
    mix = json.loads((work / "flexmix.json").read_text())
    s = demo.DemoSettings(**mix["settings"])
    val_fraction = fm.expert_config(s).val_fraction
    base = work / "models" / "flexolmo"
    assembly = json.loads((base / "assembly.json").read_text())
    owners = {slot["org"]: slot["name"] for slot in assembly["slots"] if slot.get("org")}
    domains = list(owners.values())
    corpora = work / "corpora"
    anchor = work / "anchor"
    tokenizer = load_tokenizer(anchor)
    out_dir = work / "models-rt"
    shutil.rmtree(out_dir, ignore_errors=True)

    def split(name: str) -> tuple[list[str], list[str]]:
        docs = list(read_documents([corpora / f"{name}.jsonl"]))
        held = set(held_out(docs, val_fraction))
        return [d for d in docs if d not in held], [d for d in docs if d in held]

    train, evald = {}, {}
    for d in ["public", *domains]:
        train[d], evald[d] = split(d)

    # Owners: proxy selection on the public training split, with the public model.
    public_model = AutoModelForCausalLM.from_pretrained(anchor, dtype=torch.float32)
    public_model.train(False)
    proxies: dict[str, list[str]] = {}
    for org, domain in owners.items():
        proxies[domain] = select_proxy(
            train["public"],
            train[domain],
            args.proxy_docs,
            model=public_model,
            tokenizer=tokenizer,
            max_tokens=s.seq_len * 4,
            seed=args.seed,
        )
        print(
            f"[{time.monotonic() - t0:5.0f}s] proxy set of {org} ({domain}): "
            f"{len(proxies[domain])} docs, e.g. {proxies[domain][0][:60]!r}",
            flush=True,
        )
    overlap = len(set().union(*map(set, proxies.values())))

    # Coordinator: tune the routers.
    common = dict(
        steps=args.steps, lr=args.lr, seq_len=s.seq_len, batch_size=s.batch_size, seed=args.seed
    )
    num_experts = len(assembly["slots"])
    mix_rt = {"public": train["public"], **{f"proxy-{d}": p for d, p in proxies.items()}}
    note = {"proxy_docs_per_owner": args.proxy_docs, "selector": "logistic, cross-fitted"}
    runs: dict[str, tuple[dict[str, list[str]], int | None]] = {
        "flexolmo-rt": (mix_rt, None),
        "flexolmo-rt-topall": (mix_rt, num_experts),
        "flexolmo-rt-public": ({"public": train["public"]}, None),
        "oracle-rt-own": ({"public": train["public"], **{d: train[d] for d in domains}}, None),
    }
    models: dict[str, Path] = {"public": anchor, "flexolmo": base}
    records: dict[str, Any] = {}
    for name, (sources, top) in runs.items():
        print(f"[{time.monotonic() - t0:5.0f}s] tuning {name}", flush=True)
        models[name] = out_dir / name
        records[name] = tune_router(
            base, sources, models[name], **common, train_top_k=top, note=note, progress=False
        )

    # Scoring: flexmix's held-out sequences and its positions PREFIX..
    data = {
        d: pack_documents(evald[d], tokenizer, s.seq_len, 0.0).train[: s.eval_sequences]
        for d in ["public", *domains]
    }

    def losses(path: Path) -> dict[str, float]:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        m.train(False)
        return {d: fm.score(fm.token_logprobs(m, ids)) for d, ids in data.items()}

    print(f"[{time.monotonic() - t0:5.0f}s] evaluating", flush=True)
    by_model = {name: losses(path) for name, path in models.items()}
    columns = list(models)
    table = {d: {c: by_model[c][d] for c in columns} for d in data}
    avg = {c: sum(table[d][c] for d in domains) / len(domains) for c in columns}
    check = abs(table["public"]["flexolmo"] - mix["loss"]["public"]["flexolmo"])

    # Opt-out on the tuned model: remove each expert in turn, every domain's change.
    opt: dict[str, dict[str, float]] = {}
    for org, domain in owners.items():
        path = out_dir / f"flexolmo-rt-without-{org}"
        optout(models["flexolmo-rt"], [org], path)
        lp = losses(path)
        opt[f"{org} ({domain})"] = {d: lp[d] - table[d]["flexolmo-rt"] for d in data}

    # Why: where each domain's tokens go (full softmax, mean over layers), before and after.
    slot_of = {s["name"]: s["slot"] for s in assembly["slots"] if s.get("org")}
    routing: dict[str, dict[str, dict[str, float]]] = {}
    for name in ("flexolmo", "flexolmo-rt", "oracle-rt-own"):
        stats = routing_statistics(models[name], evald, s.seq_len)
        routing[name] = {}
        for d, per_layer in stats["probs"].items():
            own = slot_of.get(d, 0)
            routing[name][d] = {
                "own": sum(p[own] for p in per_layer) / len(per_layer),
                "public": sum(p[0] for p in per_layer) / len(per_layer),
            }

    results = {
        "workdir": str(work),
        "settings": {**vars(args), "workdir": str(work)},
        "prefix": fm.PREFIX,
        "proxy_docs_distinct": overlap,
        "public_train_docs": len(train["public"]),
        "loss": table,
        "closed_average": avg,
        "flexmix_reference": {"optout_delta_flexolmo": mix.get("optout_delta", {})},
        "matches_flexmix": check < 1e-4,
        "optout_delta": opt,
        "routing": routing,
        "tuning": records,
        "seconds": round(time.monotonic() - t0),
    }
    (work / "router_tuning.json").write_text(json.dumps(results, indent=2) + "\n")
    md = render(results, columns)
    (work / "router_tuning.md").write_text(md)
    print(md)


def render(r: dict[str, Any], columns: list[str]) -> str:
    lines = [
        f"Held-out loss (nats/token, positions {r['prefix']}..); "
        f"{r['settings']['steps']} steps, {r['settings']['proxy_docs']} proxy docs per owner "
        f"({r['proxy_docs_distinct']} distinct of {r['public_train_docs']} public training docs)",
        "",
        "| domain | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for d, row in r["loss"].items():
        lines.append(f"| {d} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    avg = r["closed_average"]
    lines.append("| **closed avg** | " + " | ".join(f"**{avg[c]:.3f}**" for c in columns) + " |")
    lines += [
        "",
        f"flexolmo column matches flexmix.json: {r['matches_flexmix']}",
        "",
        "Opt-out on flexolmo-rt: change in loss when each expert is removed (rows) per domain:",
        "",
    ]
    doms = list(r["loss"])
    lines += ["| removed | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
    for who, deltas in r["optout_delta"].items():
        lines.append(f"| {who} | " + " | ".join(f"{deltas[d]:+.3f}" for d in doms) + " |")
    lines += [
        "",
        "Mean router probability (full softmax, mean over layers) of each domain's own expert"
        " (slot 0 for public) / of the public expert:",
        "",
        "| domain | " + " | ".join(r["routing"]) + " |",
        "|---" * (len(r["routing"]) + 1) + "|",
    ]
    for d in doms:
        cells = [f"{v[d]['own']:.2f} / {v[d]['public']:.2f}" for v in r["routing"].values()]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
