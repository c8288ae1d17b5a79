"""``flexfed client ...``: the data owner's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from flexfed.common.cli.options import config_options, connection_options
from flexfed.common.moe.config import TrainConfig

# TrainConfig fields offered by `client train` (help and defaults: the fields themselves).
TRAIN_OPTIONS = (
    "max_steps",
    "device",
    "seed",
    "seq_len",
    "batch_size",
    "micro_batch_size",
    "lr",
    "warmup_steps",
    "router_init",
    "router_init_documents",
    "eval_batches",
    "bias_init",
    "learn_bias",
    "max_tokens",
    "checkpoint_every",
    "activation_checkpointing",
    "compile",
    "dp_epsilon",
    "dp_delta",
    "dp_max_grad_norm",
)


@click.group("client")
def group() -> None:
    """Data owner: train an expert on local data (the data never leaves)."""


@group.command("train")
@click.option(
    "--public",
    required=True,
    type=click.Path(path_type=Path),
    help="The anchor directory (public model + anchor.json).",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Text, .jsonl/.json (field 'text'), .parquet, or a folder of them (repeat).",
)
@click.option("--org", required=True, help="Your organisation's name (as in your certificate).")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write the expert bundle.",
)
@click.option(
    "--name", default="expert", show_default=True, help="Name of this expert (e.g. its domain)."
)
@config_options(TrainConfig, TRAIN_OPTIONS, into="cfg")
@click.option(
    "--license",
    "license_",
    default="proprietary; no use without the owner's consent",
    show_default=True,
    help="Usage terms attached to the expert.",
)
@click.option(
    "--sign",
    "sign_",
    is_flag=True,
    help="Sign the bundle when training ends (needs --key, --cert).",
)
@click.option(
    "--key", type=click.Path(path_type=Path), default=None, help="Private key for --sign."
)
@click.option(
    "--cert", type=click.Path(path_type=Path), default=None, help="Owner certificate for --sign."
)
@click.option(
    "--chain", multiple=True, type=click.Path(path_type=Path), help="CA certificate(s) for --sign."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(
    public: Path,
    data: tuple[Path, ...],
    org: str,
    out: Path,
    name: str,
    cfg: TrainConfig,
    license_: str,
    sign_: bool,
    key: Path | None,
    cert: Path | None,
    chain: tuple[Path, ...],
    quiet: bool,
) -> None:
    """Train one expert FFN and router embedding on local data; write the expert bundle.

    Rerunning the same command after an interruption resumes from the last checkpoint.
    """
    from flexfed.client.trainer import train_expert

    if sign_:
        if key is None or cert is None:
            raise click.UsageError("--sign needs --key and --cert")
        from flexfed.common.trust.signing import BundleSigner, CertificateOrgMismatchError

        signer = BundleSigner(key, cert, chain)  # refuse a bad certificate before training
        signer.check_certificate()
        if signer.identity.org != org:
            raise CertificateOrgMismatchError(
                f"{cert} certifies org {signer.identity.org!r}, not --org {org!r}"
            )
    result = train_expert(
        public, data, org, out, cfg, name=name, license=license_, progress=not quiet
    )
    if result.rank != 0:  # under torchrun, rank 0 speaks for all
        return
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
    click.echo(
        f"wrote {result.out}: {result.steps} steps, {result.tokens:,} tokens, "
        f"{result.seconds:.1f}s{resumed}; held-out loss public {result.val_loss_public:.4f} -> "
        f"expert {result.val_loss_expert:.4f}"
    )
    if sign_:
        from flexfed.client.sign import sign_bundle

        assert key is not None and cert is not None
        signed = sign_bundle(result.out, key, cert, chain)
        click.echo(f"signed {signed.path} as {signed.identity}")


from flexfed.client.keys import keygen  # noqa: E402

group.add_command(keygen)

from flexfed.client.sign import sign  # noqa: E402

group.add_command(sign)


# --- talking to the coordinator --------------------------------------------------------------


def _client(address: str | None, ca: Path | None, cert: Path | None, key: Path | None) -> Any:
    from flexfed.common.api.consortium import Connection, ConsortiumClient

    return ConsortiumClient(Connection.resolve(address, ca, cert, key))


@group.command("fetch-anchor")
@connection_options
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Directory for the anchor."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fetch_anchor(
    address: str | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    out: Path,
    quiet: bool,
) -> None:
    """Download the consortium's published anchor (resumes an interrupted download)."""
    with _client(address, ca, cert, key) as client:
        anchor = client.fetch_anchor(out, progress=not quiet)
    click.echo(f"anchor {out}: {anchor.family.dense_model_type}, digest {anchor.digest}")


@group.command("submit")
@connection_options
@click.argument("expert_dir", type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def submit(
    address: str | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    expert_dir: Path,
    quiet: bool,
) -> None:
    """Upload a signed expert bundle and submit it; prints the acceptance or the refusal."""
    with _client(address, ca, cert, key) as client:
        result = client.submit(expert_dir, progress=not quiet)
    click.echo(
        f"accepted: {result.expert.org}/{result.expert.name} as {result.expert.expert_id}, "
        f"log entry {result.log_index} (inclusion proven in a tree of {result.tree_size})"
    )


@group.command("optout")
@connection_options
@click.argument("expert_id")
@click.option("--org", required=True, help="Your organisation (the expert's owner).")
@click.option("--opt-in", "opt_in", is_flag=True, help="Withdraw an earlier opt-out instead.")
def optout(
    address: str | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    expert_id: str,
    org: str,
    opt_in: bool,
) -> None:
    """Take your expert EXPERT_ID out of future releases (a request signed with your key)."""
    action = "opt-in" if opt_in else "opt-out"
    with _client(address, ca, cert, key) as client:
        answer = client.owner_request(action, expert_id, org)
    click.echo(
        f"{action}: {expert_id} is now {_state(answer.expert.state)}, log entry {answer.log_index}"
    )


@group.command("status")
@connection_options
@click.option("--org", default="", help="Only this organisation's experts.")
def status(
    address: str | None, ca: Path | None, cert: Path | None, key: Path | None, org: str
) -> None:
    """List the experts the coordinator holds, with their state and log entry."""
    with _client(address, ca, cert, key) as client:
        experts = client.experts(org)
    if not experts:
        click.echo("no experts")
    for e in experts:
        click.echo(
            f"{e.expert_id}  {e.org}/{e.name}  {_state(e.state)}  log {e.log_index}  "
            f"{e.submitted_at}"
        )


def _state(state: int) -> str:
    from flexfed.proto.v1 import registry_pb2

    # NOTE: typed str here because protobuf's enum wrapper is Any without types-protobuf.
    name: str = registry_pb2.ExpertState.Name(state)
    return name.removeprefix("EXPERT_STATE_").lower()


@group.command("fetch-model")
@connection_options
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Directory for the model."
)
@click.option(
    "--version", "version", default=0, type=int, help="Release version (default: latest)."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fetch_model(
    address: str | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    out: Path,
    version: int,
    quiet: bool,
) -> None:
    """Download a released model (an HF checkpoint) to evaluate or audit it."""
    with _client(address, ca, cert, key) as client:
        path = client.fetch_model(out, version, progress=not quiet)
    click.echo(f"model {path}")
