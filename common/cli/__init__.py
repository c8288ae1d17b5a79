"""The ``flexfed`` command: one console script, groups by user kind.

Subcommands live one per module and are imported only when used, so ``flexfed --help`` is
fast and a data owner's machine never imports coordinator code. Only :func:`main` catches
everything: a :class:`FlexfedError` becomes one clear line and its exit code; anything else
is an internal error. Tracebacks appear only with ``--verbose``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from typing import Any

import click

from flexfed.common.errors import FlexfedError
from flexfed.common.util.text import printable

# name -> "module:attribute" of a click command or group
SUBCOMMANDS: dict[str, str] = {
    "anchor": "flexfed.server.cli.anchor:group",
    "assemble": "flexfed.common.cli.assemble:command",
    "optout": "flexfed.common.cli.optout:command",
    "inspect": "flexfed.common.cli.inspect:command",
    "eval": "flexfed.common.cli.eval:command",
    "demo": "flexfed.server.demo.cli:command",
    "corpora": "flexfed.common.cli.corpora:command",
    "client": "flexfed.client.cli:group",
    "ca": "flexfed.server.cli.ca:group",
    "public": "flexfed.common.cli.public:group",
    "release": "flexfed.server.cli.release:group",
    "audit": "flexfed.common.cli.audit:group",
    "coordinator": "flexfed.server.cli.coordinator:group",
    "serve": "flexfed.common.cli.serve:command",
}

_state = {"verbose": False}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attr = self.lazy[cmd_name].split(":")
            cmd = getattr(importlib.import_module(module), attr)
            assert isinstance(cmd, click.Command)
            return cmd
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup, lazy=SUBCOMMANDS, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option("-v", "--verbose", is_flag=True, help="Show debug logs and full tracebacks.")
@click.version_option(package_name="flexfed")
def cli(verbose: bool) -> None:
    """flexfed: train one language model together without sharing data (FlexOlmo)."""
    _state["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    if not verbose:
        # NOTE: transformers draws a tqdm bar for every checkpoint it loads or writes; flexfed
        # shows its own progress for the work a person waits for. Set before transformers is
        # imported (it reads this once); child processes (the demo's owners) inherit it.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        # NOTE: with standalone_mode=False click does not exit: a command's ctx.exit(n) or
        # raise Exit(n) comes back as the return value, which must become the exit code.
        code = cli.main(args=args, prog_name="flexfed", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("flexfed: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except FlexfedError as err:
        if verbose:
            traceback.print_exc()
        click.echo(printable(f"flexfed: error: {err}"), err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("flexfed: interrupted", err=True)
        sys.exit(130)
    except Exception as err:
        if verbose:
            traceback.print_exc()
        click.echo(
            f"flexfed: internal error: {type(err).__name__}: {err} (rerun with --verbose "
            "for the traceback)",
            err=True,
        )
        sys.exit(70)
    sys.exit(code if isinstance(code, int) else 0)
