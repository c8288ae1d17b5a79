"""``flexfed corpora``: write the demo's text domains, offline and reproducibly."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("corpora")
@click.argument("domains", nargs=-1)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Directory for DOMAIN.jsonl."
)
@click.option(
    "--chars",
    default=2_000_000,
    show_default=True,
    type=int,
    help="At most this many characters per domain (some sources have fewer).",
)
def command(domains: tuple[str, ...], out: Path, chars: int) -> None:
    """Write DOMAINS (default: public and every closed domain) as JSON Lines, with a manifest.

    Sources are on the machine (CPython's files, Debian's base files, changelogs and manual
    pages) or generated; licenses are in the manifest and docs/data-sources.md.
    """
    from flexfed.common.data.corpora import CLOSED_DOMAINS, prepare

    names = list(domains) or ["public", *CLOSED_DOMAINS]
    manifest = prepare(names, out, chars)
    for name, entry in manifest.items():
        click.echo(
            f"{name:10s} {entry['documents']:6d} documents {entry['characters']:10,d} chars  "
            f"{out / str(entry['file'])}"
        )
