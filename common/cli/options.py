"""Option parsing shared by several commands: sizes, and options built from config dataclasses."""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from flexfed.common.errors import ConfigError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000; '2GiB' -> 2**31; a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"cannot read size {text!r}; use e.g. 500MB, 2GB or 1073741824")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"size must be positive, got {text!r}")
    return size


# --- options from a config dataclass ---------------------------------------------------------

_F = TypeVar("_F", bound=Callable[..., Any])


def config_options(
    cls: type[Any], names: Sequence[str], into: str = "config"
) -> Callable[[_F], _F]:
    """Click options for the fields ``names`` of the config dataclass ``cls``.

    Each option's help, default and choices come from the field itself (``metadata["help"]``,
    ``metadata["choices"]``), so a default lives once, next to its help. The command receives
    one ``cls`` instance as the keyword argument ``into`` instead of one argument per field.
    A field whose ``metadata["default_from"]`` names another field defaults to that field's
    value. Booleans that default to True get a ``--no-`` form.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)

    def decorate(command: _F) -> _F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            for name in names:
                source = fields[name].metadata.get("default_from")
                if source is not None and values[name] is None:
                    values[name] = values[source]
            return command(*args, **kwargs, **{into: cls(**values)})

        for name in reversed(names):
            wrapper = _field_option(fields[name], hints[name])(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate


def _field_option(f: dataclasses.Field[Any], hint: Any) -> Callable[[Any], Any]:
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help")
    if help_text is None:
        raise TypeError(f"config field {f.name} has no help text (metadata['help'])")
    default = f.default
    if f.metadata.get("default_from") is not None:
        return click.option(flag, f.name, default=None, type=_scalar(hint), help=help_text)
    if hint is bool:
        if default:
            return click.option(
                f"{flag}/--no-{flag[2:]}", f.name, default=True, show_default=True, help=help_text
            )
        return click.option(flag, f.name, is_flag=True, default=False, help=help_text)
    choices = f.metadata.get("choices")
    kind = click.Choice(list(choices)) if choices else _scalar(hint)
    return click.option(
        flag, f.name, default=default, type=kind, show_default=default is not None, help=help_text
    )


def _scalar(hint: Any) -> Any:
    """int for ``int`` and ``int | None``; likewise float and str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if len(args) != 1 or args[0] not in (int, float, str):
        raise TypeError(f"no command-line type for {hint!r}")
    return args[0]


# --- talking to a coordinator ----------------------------------------------------------------


def connection_options(command: Any) -> Any:
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
