"""``flexfed release ...``: the operator publishes an assembled model: log it, then sign it.

    flexfed release record MODEL_DIR --log FILE --log-key KEY --origin NAME
    flexfed release sign MODEL_DIR --key KEY --cert CERT [--chain ca.pem]

``record`` must come first: it writes the log indices and the signed checkpoint into
assembly.json, which ``sign`` then covers with the coordinator's ``model.sig``.
"""

from __future__ import annotations

from pathlib import Path

import click

_PATH = click.Path(path_type=Path)


@click.group("release")
def group() -> None:
    """Operator: record an assembled model in the transparency log and sign it."""


@group.command("record")
@click.argument("model_dir", type=_PATH)
@click.option("--log", "log_path", required=True, type=_PATH, help="The transparency log file.")
@click.option(
    "--log-key", required=True, type=_PATH, help="The log's private key (P-256 PEM) to sign with."
)
@click.option(
    "--origin", required=True, help="The log's name in its checkpoints, e.g. example.org/log."
)
def record(model_dir: Path, log_path: Path, log_key: Path, origin: str) -> None:
    """Log MODEL_DIR's experts and release; write log indices and checkpoint to assembly.json."""
    from flexfed.common.trust.log_events import open_log
    from flexfed.common.trust.release import record_release

    with open_log(log_path) as log:
        assembly = record_release(model_dir, log, log_key, origin)
        size = log.size
    click.echo(
        f"recorded {model_dir} at log entry {assembly['release_log_index']} "
        f"(log of {size} entries); now sign it with `flexfed release sign`"
    )


@group.command("sign")
@click.argument("model_dir", type=_PATH)
@click.option("--key", required=True, type=_PATH, help="The operator's private key.")
@click.option("--cert", required=True, type=_PATH, help="The operator's certificate.")
@click.option(
    "--chain", multiple=True, type=_PATH, help="CA certificate(s) to include, usually ca.pem."
)
def sign(model_dir: Path, key: Path, cert: Path, chain: tuple[Path, ...]) -> None:
    """Sign MODEL_DIR as the coordinator: model.sig over every file in it."""
    from flexfed.common.trust.release import sign_release

    signed = sign_release(model_dir, key, cert, chain)
    click.echo(f"signed {signed.path}: {signed.files} files, as {signed.identity}")
