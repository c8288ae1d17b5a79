"""``flexfed serve``: an OpenAI-compatible completions server with per-request expert sets."""

from __future__ import annotations

from pathlib import Path

import click

from flexfed.common.errors import ConfigError


@click.command("serve")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--name", default="flexfed", show_default=True, help='The model id clients send ("model").'
)
@click.option(
    "--exclude",
    "exclude",
    multiple=True,
    help="Organisation whose experts no request may use (repeat); e.g. one that opted out "
    "and whose expert is still in this checkpoint.",
)
@click.option(
    "--license",
    "licenses",
    multiple=True,
    help="Serve only experts of this license class (repeat); requests may narrow further.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N.",
)
def command(
    model_dir: Path,
    host: str,
    port: int,
    name: str,
    exclude: tuple[str, ...],
    licenses: tuple[str, ...],
    device: str,
) -> None:
    """Serve MODEL_DIR (an assembled model) at /v1/completions, OpenAI-style.

    Each request may restrict its experts with a "flexfed" body field, e.g.
    {"exclude_orgs": ["acme"]}, {"include_orgs": ["labs"]} or {"licenses": ["open"]};
    the answer is exactly what `flexfed optout --drop` of those experts would give.
    """
    import uvicorn

    from flexfed.common.serving.app import create_app
    from flexfed.common.serving.generation import Engine
    from flexfed.common.serving.policy import ExpertPolicy

    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    default = ExpertPolicy(exclude_orgs=exclude, licenses=licenses or None)
    engine = Engine(model_dir, device=device, default=default)
    _, kept = engine.plan(ExpertPolicy())
    click.echo(
        f"serving {model_dir} as {name!r} on http://{host}:{port}/v1 (experts: {', '.join(kept)})",
        err=True,
    )
    uvicorn.run(create_app(engine, name), host=host, port=port, log_level="warning")
