"""``flexfed demo``: the whole flow on the embedded defaults."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option(
    "--quick", is_flag=True, help="Small sizes (about a minute); what the end-to-end test runs."
)
@click.option(
    "--workdir",
    default="flexfed-demo",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the corpora, models and results go.",
)
def command(quick: bool, workdir: Path) -> None:
    """Build a public model, let three owners train experts, assemble, evaluate, opt one out."""
    from flexfed.server.demo import print_table, run_demo

    results = run_demo(workdir, quick=quick)
    print_table(results)
    took = results["seconds"]
    click.echo(f"results: {workdir / 'results.json'}, chart: {workdir / 'results.png'} ({took}s)")
