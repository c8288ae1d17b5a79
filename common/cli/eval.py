"""``flexfed eval``: per-domain held-out loss and perplexity of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("eval")
@click.option(
    "--model",
    "model",
    required=True,
    type=click.Path(path_type=Path),
    help="A dense or assembled checkpoint.",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    help="Held-out data of one domain: PATH or NAME=PATH (repeat; name defaults to the stem).",
)
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), help="Also write the results as JSON."
)
@click.option("--seq-len", default=256, show_default=True, type=int)
@click.option("--max-sequences", default=64, show_default=True, type=int, help="Per domain.")
@click.option(
    "--routing",
    "routing_png",
    type=click.Path(path_type=Path),
    help="MoE models: also write per-layer routing statistics as a heat-map PNG.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(
    model: Path,
    data: tuple[str, ...],
    json_out: Path | None,
    seq_len: int,
    max_sequences: int,
    routing_png: Path | None,
    quiet: bool,
) -> None:
    """Evaluate MODEL on each domain's held-out data; print loss and perplexity."""
    from flexfed.common.data.documents import find_data_files, read_documents
    from flexfed.common.moe.evaluation import evaluate_model

    domains: dict[str, list[str]] = {}
    for spec in data:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        p = Path(path)
        domains[name or p.stem] = list(read_documents(find_data_files([p])))
    results = evaluate_model(model, domains, seq_len, max_sequences, progress=not quiet)
    click.echo(f"{'domain':<16} {'loss':>8} {'ppl':>10} {'tokens':>9}")
    for name, r in results.items():
        click.echo(f"{name:<16} {r['loss']:>8.4f} {r['ppl']:>10.2f} {r['tokens']:>9}")
    doc: dict[str, object] = {"model": str(model), "domains": results}
    if routing_png is not None:
        from flexfed.common.moe.evaluation import routing_statistics, write_routing_heatmap
        from flexfed.common.moe.optout import AssembledModel

        stats = routing_statistics(model, domains, seq_len)
        slots = AssembledModel(model).slots
        labels = ["public" if s.get("org") is None else f"{s['org']}/{s['name']}" for s in slots]
        write_routing_heatmap(stats, routing_png, [str(x) for x in labels])
        doc["routing"] = stats
        click.echo(f"routing heat-map: {routing_png}")
    if json_out is not None:
        json_out.write_text(json.dumps(doc, indent=2) + "\n")
