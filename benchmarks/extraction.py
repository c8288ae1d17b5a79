"""Training-data extraction (the paper's privacy analysis), and utility against epsilon.

One owner ("owner-a", the target) holds a closed domain to which short documents cut from
it are added several times over (the canaries: repeated records are what language models
memorise); a second owner ("owner-b") holds another domain. Every model is attacked on the
same canaries: the first ``--prefix`` tokens in, ``--suffix`` tokens decoded greedily,
extracted when the decoded suffix equals the true one exactly
(:mod:`flexfed.common.moe.extraction`). The same attack on pieces of held-out documents of
the target domain (never trained on) is the floor: what the domain's regularity alone gives.

Models, every trained one with the same steps, batch and sequence length:

- ``public``: the public model alone (never saw the target's data);
- ``dense``: the target's full dense fine-tune of the public model (the non-FlexOlmo route);
- ``flexolmo``: public + the target's expert + owner-b's expert, the demo's recipe;
- ``flexolmo-optout``: the same model after ``flexfed optout --drop owner-a``;
- ``flexolmo-dp-eps{E}``: public + the target's expert trained with DP-SGD at epsilon E
  (``client train --dp-epsilon E``) + owner-b's expert.

Also the held-out loss on the target domain of every model (utility against epsilon).

    .venv/bin/python benchmarks/extraction.py [--quick] [--workdir DIR] [--epsilons 1,8,64]
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
from transformers import AutoModelForCausalLM

from flexfed.client.trainer import train_expert
from flexfed.common.data.corpora import write_domain
from flexfed.common.data.documents import read_documents
from flexfed.common.data.packing import pack_documents
from flexfed.common.moe.assembly import assemble
from flexfed.common.moe.config import TrainConfig
from flexfed.common.moe.evaluation import held_out, load_tokenizer
from flexfed.common.moe.extraction import candidates, extraction
from flexfed.common.moe.optout import optout
from flexfed.common.moe.recipe import evaluate, train_dense
from flexfed.server.demo import local as demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo's --quick model sizes")
    ap.add_argument("--workdir", type=Path, default=Path("extraction-work"))
    ap.add_argument("--target", default="math", help="the target owner's domain")
    ap.add_argument("--other", default="code", help="the second owner's domain")
    ap.add_argument("--canaries", type=int, default=32, help="short documents repeated in training")
    ap.add_argument("--repeats", type=int, default=8, help="times each canary occurs")
    ap.add_argument("--prefix", type=int, default=32, help="prefix tokens given")
    ap.add_argument("--suffix", type=int, default=16, help="suffix tokens to reproduce")
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: the preset's x3)")
    ap.add_argument("--epsilons", default="1,8,64", help="DP experts to train ('' for none)")
    ap.add_argument("--delta", type=float, default=1e-5)
    args = ap.parse_args()
    t0 = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f}s] {text}", flush=True)

    s = demo.DemoSettings.preset(args.quick)
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    (work / "corpora").mkdir(parents=True)
    public_corpus = write_domain("public", work / "corpora", s.public_chars)
    target_file = write_domain(args.target, work / "corpora", s.corpus_chars)
    other_file = write_domain(args.other, work / "corpora", s.corpus_chars)
    public = demo.build_public(s, public_corpus, work / "public")
    anchor = demo.publish_anchor(public, public_corpus, work / "anchor", max_tokens=s.seq_len)
    tokenizer = load_tokenizer(anchor.path)
    need = args.prefix + args.suffix

    # The target's data: its domain plus the canaries, short documents (the first prefix +
    # suffix tokens of a training document, cut out) that occur --repeats times. Short,
    # repeated records are what a small model can memorise. held_out() is a function of each
    # document's text, so a canary is kept only if it lands in training; the controls are cut
    # the same way from held-out documents and never trained on.
    docs = list(read_documents([target_file]))
    val = set(held_out(docs, 0.05))

    def cut(doc: str) -> str | None:
        ids = tokenizer(doc, add_special_tokens=False).input_ids
        return str(tokenizer.decode(ids[:need])) if len(ids) >= need else None

    cuts = [(d, c) for d in docs if (c := cut(d)) is not None]
    canaries = [c for d, c in cuts if d not in val and c not in set(held_out([c], 0.05))]
    canaries = canaries[: args.canaries]
    controls = [c for d, c in cuts if d in val][: args.canaries]
    data_file = work / "corpora" / "target-with-canaries.jsonl"
    with data_file.open("w") as f:
        for d in docs + canaries * args.repeats:
            f.write(json.dumps({"text": d}) + "\n")
    steps = args.steps or 3 * s.expert_steps
    cfg = TrainConfig(
        seq_len=s.seq_len,
        batch_size=s.batch_size,
        max_steps=steps,
        lr=s.lr,
        device="cpu",
        **demo.EXPERT_OPTIONS,
    )
    say(
        f"target {args.target}: {len(docs)} documents + {len(canaries)} canaries x "
        f"{args.repeats}; {len(controls)} held-out controls; {steps} steps"
    )

    say("owner-a: expert")
    train_expert(anchor.path, [data_file], "owner-a", work / "experts" / "a", cfg, progress=False)
    say("owner-b: expert")
    train_expert(anchor.path, [other_file], "owner-b", work / "experts" / "b", cfg, progress=False)
    models: dict[str, Path] = {"public": anchor.path}
    models["flexolmo"] = work / "models" / "flexolmo"
    assemble(anchor, [work / "experts" / "a", work / "experts" / "b"], models["flexolmo"])
    models["flexolmo-optout"] = work / "models" / "flexolmo-optout"
    optout(models["flexolmo"], ["owner-a"], models["flexolmo-optout"])

    say("owner-a: dense fine-tune")
    train_docs = [d for d in read_documents([data_file]) if d not in val]
    packed = pack_documents(train_docs, tokenizer, cfg.seq_len, 0.0)
    dense = AutoModelForCausalLM.from_pretrained(anchor.path, dtype=torch.float32)
    train_dense(dense, packed.train, cfg)
    models["dense"] = work / "models" / "dense"
    dense.save_pretrained(models["dense"])
    tokenizer.save_pretrained(models["dense"])

    dp_records: dict[str, Any] = {}
    for eps in [float(e) for e in args.epsilons.split(",") if e.strip()]:
        name = f"flexolmo-dp-eps{eps:g}"
        say(f"owner-a: DP expert at epsilon {eps:g}")
        out = work / "experts" / f"a-dp-{eps:g}"
        dp_cfg = replace(cfg, dp_epsilon=eps, dp_delta=args.delta)
        train_expert(anchor.path, [data_file], "owner-a", out, dp_cfg, progress=False)
        meta = json.loads((out / "expert.json").read_text())
        dp_records[name] = meta["training"]["differential_privacy"]
        models[name] = work / "models" / name
        assemble(anchor, [out, work / "experts" / "b"], models[name])

    attack = candidates(canaries, tokenizer, args.prefix, args.suffix)
    floor = candidates(controls, tokenizer, args.prefix, args.suffix)
    val_docs = sorted(val)
    val_ids = pack_documents(val_docs, tokenizer, s.seq_len, 0.0).train[: s.eval_sequences]
    rows: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        say(f"attacking {name}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()  # type: ignore[no-untyped-call]  # PreTrainedModel.eval is unannotated
        hit = extraction(model, attack, args.prefix)
        ctl = extraction(model, floor, args.prefix)
        loss = evaluate(model, val_ids, 8, torch.device("cpu"), max_batches=1000)
        rows[name] = {
            "attacked": hit.documents,
            "controls_attacked": ctl.documents,
            "extracted": hit.extracted,
            "rate": hit.rate,
            "token_match": round(hit.token_match, 4),
            "control_rate": ctl.rate,
            "control_token_match": round(ctl.token_match, 4),
            "held_out_loss": round(loss, 4),
            **({"epsilon": round(dp_records[name]["epsilon"], 3)} if name in dp_records else {}),
        }
    results = {
        "quick": args.quick,
        "settings": {k: v for k, v in vars(args).items() if k != "workdir"},
        "steps": steps,
        "canaries": len(canaries),
        "controls": len(controls),
        "dp": dp_records,
        "models": rows,
        "seconds": round(time.monotonic() - t0),
    }
    (work / "extraction.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = [
        f"prefix {args.prefix} tokens, suffix {args.suffix} tokens (greedy), "
        f"{len(attack)} canaries x {args.repeats} in owner-a's data, "
        f"{len(floor)} held-out controls; {steps} steps",
        "",
        "| model | extracted | rate | suffix tokens matched | control rate | control tokens "
        "matched | held-out loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        label = name + (f" (epsilon {r['epsilon']})" if "epsilon" in r else "")
        lines.append(
            f"| {label} | {r['extracted']}/{r['attacked']} | {100 * r['rate']:.1f} % | "
            f"{100 * r['token_match']:.1f} % | {100 * r['control_rate']:.1f} % | "
            f"{100 * r['control_token_match']:.1f} % | {r['held_out_loss']:.3f} |"
        )
    md = "\n".join(lines) + "\n"
    (work / "extraction.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
