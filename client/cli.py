"""``flexfed client ...``: the data owner's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


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
@click.option("--max-steps", default=200, show_default=True, type=int, help="Optimizer steps.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--seq-len", default=256, show_default=True, type=int, help="Tokens per training sequence."
)
@click.option(
    "--batch-size", default=8, show_default=True, type=int, help="Sequences per optimizer step."
)
@click.option(
    "--micro-batch-size",
    default=None,
    type=int,
    help="Sequences per forward pass (default: batch size).",
)
@click.option("--lr", default=9e-4, show_default=True, type=float, help="Peak learning rate.")
@click.option(
    "--warmup-steps", default=None, type=int, help="Warmup steps (default: 10% of max steps)."
)
@click.option(
    "--router-init",
    default="hidden-states",
    show_default=True,
    type=click.Choice(["hidden-states", "embedder", "random", "public"]),
    help="How r_i starts: mean public-model hidden state of your documents, random, or r_pub.",
)
@click.option(
    "--router-init-documents",
    default=1000,
    show_default=True,
    type=int,
    help="Documents sampled to compute r_i (fewer: faster on a large public model).",
)
@click.option(
    "--eval-batches",
    default=16,
    show_default=True,
    type=int,
    help="Held-out batches scored before and after training.",
)
@click.option(
    "--bias-init",
    default=0.0,
    show_default=True,
    type=float,
    help="Initial router bias b_i (clamped to <= 0).",
)
@click.option(
    "--learn-bias/--no-learn-bias",
    default=True,
    show_default=True,
    help="Train the negative router bias b_i (off: the no-bias ablation).",
)
@click.option("--max-tokens", default=None, type=int, help="Use at most this many tokens of data.")
@click.option(
    "--checkpoint-every",
    default=50,
    show_default=True,
    type=int,
    help="Steps between resumable checkpoints.",
)
@click.option("--activation-checkpointing", is_flag=True, help="Trade compute for memory.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (CUDA only).")
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
    max_steps: int,
    device: str,
    seed: int,
    seq_len: int,
    batch_size: int,
    micro_batch_size: int | None,
    lr: float,
    warmup_steps: int | None,
    router_init: str,
    router_init_documents: int,
    eval_batches: int,
    bias_init: float,
    learn_bias: bool,
    max_tokens: int | None,
    checkpoint_every: int,
    activation_checkpointing: bool,
    compile_: bool,
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
    from flexfed.client.trainer import TrainConfig, train_expert

    cfg = TrainConfig(
        seq_len=seq_len,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size or batch_size,
        max_steps=max_steps,
        lr=lr,
        warmup_steps=warmup_steps,
        router_init=router_init,
        router_init_documents=router_init_documents,
        eval_batches=eval_batches,
        bias_init=bias_init,
        learn_bias=learn_bias,
        max_tokens=max_tokens,
        checkpoint_every=checkpoint_every,
        seed=seed,
        device=device,
        activation_checkpointing=activation_checkpointing,
        compile=compile_,
    )
    if sign_:
        if key is None or cert is None:
            raise click.UsageError("--sign needs --key and --cert")
        from flexfed.common.signing import BundleSigner, CertificateOrgMismatchError

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


def _connection_options(command: Any) -> Any:
    """--coordinator, --ca, --cert and --key (or FLEXFED_COORDINATOR, _CA, _CERT, _KEY)."""
    options = [
        click.option("--coordinator", "address", help="HOST:PORT of the coordinator."),
        click.option(
            "--ca", type=click.Path(path_type=Path), help="The consortium CA certificate."
        ),
        click.option("--cert", type=click.Path(path_type=Path), help="Your certificate."),
        click.option("--key", type=click.Path(path_type=Path), help="Your private key."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _client(address: str | None, ca: Path | None, cert: Path | None, key: Path | None) -> Any:
    from flexfed.client.consortium import Connection, ConsortiumClient

    return ConsortiumClient(Connection.resolve(address, ca, cert, key))


@group.command("fetch-anchor")
@_connection_options
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
@_connection_options
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
@_connection_options
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
@_connection_options
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
@_connection_options
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
