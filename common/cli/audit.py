"""``flexfed audit ...``: the auditor's commands: verify a released model, render the report.

``verify`` prints a per-slot report and exits 0 only when every check held; otherwise it ends
with one ``flexfed: error: audit of ... failed ...`` line and exit code 4 (a
:class:`~flexfed.common.errors.VerificationError`). ``report`` renders the same audit as text,
Markdown or JSON and exits 0 once it is written, whatever the verdict (the verdict is in it).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from flexfed.common.errors import ConfigError
from flexfed.common.util.text import printable

_PATH = click.Path(path_type=Path)


def _options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The inputs of an audit, shared by ``verify`` and ``report``."""
    options = [
        click.argument("model_dir", type=_PATH),
        click.option(
            "--trust",
            required=True,
            type=_PATH,
            help="The consortium CA certificate (ca.pem), obtained out of band.",
        ),
        click.option("--crl", type=_PATH, default=None, help="The CA's current CRL (crl.pem)."),
        click.option(
            "--log",
            type=str,
            default=None,
            help="The transparency log: its file, or the coordinator as grpcs://HOST:PORT "
            "(then --cert and --key are your TLS identity).",
        ),
        click.option(
            "--cert", type=_PATH, default=None, help="Your certificate, for --log grpcs://..."
        ),
        click.option(
            "--key", type=_PATH, default=None, help="Your private key, for --log grpcs://..."
        ),
        click.option(
            "--log-key",
            type=_PATH,
            default=None,
            help="The log's public key (PEM public key or the operator's certificate).",
        ),
        click.option("--log-origin", default=None, help="Refuse a checkpoint of another log."),
        click.option(
            "--anchor",
            type=_PATH,
            default=None,
            help="The anchor directory: also check the shared tensors and slot 0.",
        ),
        click.option(
            "--at",
            default=None,
            help="Judge certificates at this time (ISO 8601, UTC if no zone; default now).",
        ),
        click.option(
            "--workdir",
            type=_PATH,
            default=None,
            help="Where experts are rebuilt, one at a time (default: the temp directory).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _run(
    model_dir: Path,
    trust: Path,
    crl: Path | None,
    log: str | None,
    cert: Path | None,
    key: Path | None,
    log_key: Path | None,
    log_origin: str | None,
    anchor: Path | None,
    at: str | None,
    workdir: Path | None,
) -> Any:
    from flexfed.common.api.remote_log import is_remote, open_remote_log
    from flexfed.common.formats.anchor import open_anchor
    from flexfed.common.trust.audit import audit_model, public_key_of

    reader: Any = log
    if log is not None and is_remote(log):
        if cert is None or key is None or log_key is None:
            raise ConfigError(
                "--log grpcs://... needs --cert and --key (your TLS identity) and --log-key "
                "(the log's public key, pinned out of band: the server's word is not trusted)"
            )
        reader = open_remote_log(log, public_key_of(log_key), trust, cert, key, origin=log_origin)

    when = None
    if at is not None:
        try:
            when = dt.datetime.fromisoformat(at)
        except ValueError:
            raise ConfigError(
                f"--at {at!r} is not an ISO 8601 time, e.g. 2030-01-31T12:00"
            ) from None
    return audit_model(
        model_dir,
        trust,
        crl,
        reader,
        log_key,
        when,
        anchor=open_anchor(anchor) if anchor is not None else None,
        log_origin=log_origin,
        workdir=workdir,
    )


def _short(digest: str | None) -> str:
    return f"{digest[:16]}..." if digest else "-"


def render_text(report: Any) -> str:
    """The per-slot report ``flexfed audit verify`` prints."""
    lines = [
        f"model        {report.model} ({report.model_type or '?'}, {len(report.slots)} slots), "
        f"anchor {_short(report.anchor_digest)}",
        f"release      signed by {report.release_signer or '(no valid operator signature)'}",
    ]
    if report.log:
        log = report.log
        extra = f", log file has {log['log_size']} entries" if "log_size" in log else ""
        lines.append(
            f"log          {log['origin']}, checkpoint of {log['tree_size']} entries{extra}"
        )
    for f in report.findings:
        lines.append(f"  FAIL {f.reason}: {f.message}")
    for s in report.slots:
        who = "public" if s.kind == "public" else f"{s.org}/{s.name}"
        log_at = f" log #{s.log_index}" if s.log_index is not None else ""
        parts = [f"slot {s.slot:<7} {who:<24} {'ok' if s.ok else 'FAIL':<4}"]
        if s.signer:
            parts.append(f"weights {_short(s.expert_sha256)} signed by {s.signer}")
        if log_at:
            parts.append(log_at.strip())
        if getattr(s, "privacy", None):
            parts.append(f"DP epsilon {s.privacy['epsilon']} (delta {s.privacy['delta']})")
        lines.append(" ".join(parts))
        for f in s.findings:
            lines.append(f"  FAIL {f.reason}: {f.message}")
    for item in report.not_checked:
        lines.append(f"not checked  {item}")
    n = len(report.all_findings)
    lines.append(f"result       {'PASS' if report.ok else f'FAIL ({n} problem(s))'}")
    # Names, signers and messages come from the model under audit: never raw to a terminal.
    return "\n".join(printable(line) for line in lines)


def render_markdown(report: Any) -> str:
    """The report as a Markdown document."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    verdict = "PASS" if report.ok else "FAIL"
    out = [
        f"# Audit of `{report.model}`: {verdict}",
        "",
        f"- judged at: {report.at.isoformat()}",
        f"- model type: {report.model_type or '?'}; anchor: `{report.anchor_digest}`",
        f"- content digest: `{report.model_digest}`",
        f"- release signed by: {report.release_signer or '(no valid operator signature)'}",
    ]
    if report.log:
        out.append(
            f"- log: {report.log['origin']}, checkpoint of {report.log['tree_size']} entries, "
            f"root `{report.log['root']}`"
        )
    out += [f"- not checked: {item}" for item in report.not_checked]
    out += [
        "",
        "| slot | expert | signer | weights | log | privacy | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report.slots:
        who = "public" if s.kind == "public" else f"{s.org}/{s.name}"
        result = "ok" if s.ok else "FAIL: " + ", ".join(str(f.reason) for f in s.findings)
        log_at = "" if s.log_index is None else str(s.log_index)
        dp = getattr(s, "privacy", None)
        privacy = f"DP epsilon {dp['epsilon']}, delta {dp['delta']}" if dp else "no DP"
        if s.kind == "public":
            privacy = ""
        out.append(
            f"| {s.slot} | {cell(who)} | {cell(s.signer or '')} | `{_short(s.expert_sha256)}` "
            f"| {log_at} | {cell(privacy)} | {cell(result)} |"
        )
    if not report.ok:
        out += ["", "## Problems", ""]
        for f in report.all_findings:
            where = "model" if f.slot is None else f"slot {f.slot}"
            out.append(f"- **{f.reason}** ({where}): {cell(f.message)}")
    return "\n".join(out) + "\n"


@click.group("audit")
def group() -> None:
    """Auditor: verify a released model offline, expert by expert."""


@group.command("verify")
@_options
def verify(**inputs: Any) -> None:
    """Verify MODEL_DIR: release signature, every expert's signature and weights, the log.

    Exits 0 only if every check held, 4 otherwise.
    """
    report = _run(**inputs)
    click.echo(render_text(report))
    report.raise_for_failure()


@group.command("report")
@_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "markdown", "json"]),
    default="markdown",
    show_default=True,
)
@click.option("--out", type=_PATH, default=None, help="Write here instead of standard output.")
def report(fmt: str, out: Path | None, **inputs: Any) -> None:
    """Render the audit of MODEL_DIR (exit 0 once written; the verdict is inside)."""
    result = _run(**inputs)
    if fmt == "json":
        text = json.dumps(result.to_json(), indent=2) + "\n"
    elif fmt == "markdown":
        text = render_markdown(result)
    else:
        text = render_text(result) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        click.echo(f"wrote {out}: {'PASS' if result.ok else 'FAIL'}")
