"""``flexfed demo --network``: the demo's whole flow through the real network components.

Everything runs on 127.0.0.1, each party in its own process and directory:

1. The operator prepares the corpora, the public model (cached) and the anchor exactly as
   ``flexfed demo`` does (:func:`flexfed.server.demo.prepare`), creates a throwaway consortium
   CA, its coordinator TLS certificate (SANs 127.0.0.1 and localhost), an admin certificate,
   and one certificate per data owner.
2. ``flexfed coordinator init`` + ``serve`` (the Consortium API, the data plane) and a Flower
   SuperLink (the control plane: TLS with the coordinator's certificate, SuperNode
   authentication on), as ``deploy/flower/superlink.sh`` starts it.
3. Each owner, in its own directory holding only its own data, makes a node key; the operator
   registers it (``flwr supernode register``); the owner starts a SuperNode whose node config
   names its data, certificate and key.
4. A training campaign (``flwr run`` of the flexfed Flower App, as
   ``deploy/flower/campaign.sh``) with the demo's hyperparameters: every node fetches the
   anchor, trains, signs and submits its expert through the Consortium API.
5. ``flexfed coordinator release``; an evaluation campaign (each owner's gain on its own
   held-out data comes back as metrics); the operator downloads the release
   (``flexfed client fetch-model``) and evaluates it on every domain's held-out documents.
6. The dropped owner opts out (``flexfed client optout``, signed with its key); a second
   release, downloaded and evaluated.

The results (``results.json``, ``results.png``: the local demo's schema and columns, with
``"network": true``) and ``network.json`` (campaign reports, releases, log size) land in the
work directory; every process's log is under ``network/logs``. All processes are stopped
at the end, on failure, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from flexfed.client.flower_node import generate_node_key
from flexfed.common.ca import generate_key_and_csr, init_ca, issue_certificate
from flexfed.common.campaign import OK, CampaignConfig
from flexfed.common.errors import FlexfedError
from flexfed.common.progress import console
from flexfed.server.demo import (
    DEMO_DOMAINS,
    THREADS_PER_PROCESS,
    TOP_K,
    VAL_FRACTION,
    DemoSettings,
    Prepared,
    _torch_threads,
    demo_orgs,
    evaluate_columns,
    prepare,
    results_record,
    save_results,
)

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr live here
CONNECTION = "consortium"  # the `flwr` CLI's name for the SuperLink
LOG_ORIGIN = "demo.flexfed.local/log"
START_TIMEOUT = 120.0  # seconds for a service to come up (imports are slow on a busy machine)
CAMPAIGN_TIMEOUT = 1800.0  # seconds for a whole campaign
NODE_WAIT = 120.0  # seconds the ServerApp waits for all SuperNodes to connect
TAIL_LINES = 25


class NetworkDemoError(FlexfedError):
    """A step of the network demo failed (the message holds the relevant log's tail)."""


def free_port() -> int:
    """A port nobody listens on now (the SuperLink and SuperNodes need one up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    if not path.is_file():
        return f"({path} was not written)"
    text = path.read_text(errors="replace").rstrip().splitlines()
    return "\n".join(text[-lines:]) or f"({path} is empty)"


@dataclass
class Services:
    """The long-running processes, each leading its own process group, and their logs.

    ``stop_all`` terminates each group (a SuperLink's ServerApp and a SuperNode's ClientApp
    processes with it), then kills what did not stop.
    """

    logs: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(
        self, name: str, args: list[str | Path], env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [str(a) for a in args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,  # NOTE: Ctrl-C reaches only us; we stop the group
            )
        self.running[name] = proc
        return proc

    def wait_for(self, name: str, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait until ``name``'s log matches ``pattern``; fail if it exits or times out."""
        proc, log = self.running[name], self.log(name)
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, log.read_text(errors="replace"))
            if match:
                return match
            if proc.poll() is not None:
                raise NetworkDemoError(
                    f"{name} exited ({proc.returncode}) before it was ready; {log}:\n{tail(log)}"
                )
            if time.monotonic() > deadline:
                raise NetworkDemoError(
                    f"{name} not ready after {timeout:.0f}s; {log}:\n{tail(log)}"
                )
            time.sleep(0.2)

    def check_alive(self, names: list[str]) -> None:
        for name in names:
            proc = self.running[name]
            if proc.poll() is not None:
                raise NetworkDemoError(
                    f"{name} exited ({proc.returncode}); {self.log(name)}:\n{tail(self.log(name))}"
                )

    def stop(self, name: str, grace: float = 10.0) -> None:
        proc = self.running.pop(name)
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=30)
        # a ClientApp or ServerApp child may outlive its leader: end the group regardless
        _signal_group(proc, signal.SIGKILL)

    def stop_all(self, grace: float = 10.0) -> None:
        # NOTE: Flower starts some helpers in sessions of their own (the SuperLink's SuperExec,
        # which starts the ServerApp): they are found by parentage, before their parents go.
        detached = {
            pid
            for proc in self.running.values()
            for pid in _descendants(proc.pid)
            if _pgid(pid) not in (None, proc.pid)
        }
        for proc in reversed(self.running.values()):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        for pid in detached:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        for name in reversed(list(self.running)):
            self.stop(name, grace)
        deadline = time.monotonic() + grace
        while detached and time.monotonic() < deadline:
            detached = {pid for pid in detached if _alive(pid)}
            time.sleep(0.1)
        for pid in detached:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc (empty where there is none: not Linux)."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields_ = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields_[1]), []).append(int(stat.parent.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie does not: its parent, ours, is gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return _pgid(pid) is not None
    return state != "Z"


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (so the services are stopped); restored after."""
    if not _in_main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """The block without ``logger``'s warnings."""
    import logging

    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def environment(flwr_home: Path, **extra: str) -> dict[str, str]:
    """A process's environment: one thread, its own FLWR_HOME (as on separate machines)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLEXFED_")  # the demo passes every connection setting itself
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        OMP_NUM_THREADS=str(THREADS_PER_PROCESS),
        FLWR_HOME=str(flwr_home),
        # NOTE: as deploy/flower/*.sh: no telemetry, no update checks
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    env.update(extra)
    return env


def run_cli(
    name: str, args: list[str | Path], env: dict[str, str], logs: Path, cwd: Path | None = None
) -> str:
    """One short command (``flexfed ...`` or ``flwr ...``); its output, also in ``logs``."""
    done = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    logs.mkdir(parents=True, exist_ok=True)
    out = done.stdout + done.stderr
    (logs / f"{name}.log").write_text(out)
    if done.returncode != 0:
        short = "\n".join(out.rstrip().splitlines()[-TAIL_LINES:])
        raise NetworkDemoError(f"{name} failed (exit {done.returncode}):\n{short}")
    return done.stdout


def flexfed_cli(*args: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "flexfed.common.cli", *args]


# --- the Flower App ------------------------------------------------------------------------


def write_flower_app(out: Path) -> Path:
    """The flexfed Flower App project (deploy/flower-app's pyproject.toml), for ``flwr run``.

    Written here rather than read from the repository so an installed flexfed runs the demo
    too; the settings table comes from :class:`CampaignConfig` (one source for the keys).
    """
    defaults = {f.name.replace("_", "-"): f.default for f in fields(CampaignConfig)}
    defaults["consortium-address"] = "127.0.0.1:7443"  # run config values must not be empty
    config = "\n".join(f"{k} = {_toml(v)}" for k, v in defaults.items())
    out.mkdir(parents=True, exist_ok=True)
    (out / "pyproject.toml").write_text(
        f"""# The flexfed Flower App, as in deploy/flower-app (written by `flexfed demo --network`).
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "flexfed-campaigns"
version = "0.1.0"
description = "flexfed campaigns: train FlexOlmo experts and evaluate releases on owners' nodes"
license = "Apache-2.0"
dependencies = ["flwr>=1.42,<1.43", "flexfed"]

[tool.flwr.app]
publisher = "flexfed"

[tool.flwr.app.components]
serverapp = "flexfed.server.flower_app:app"
clientapp = "flexfed.client.flower_app:app"

[tool.flwr.app.config]
{config}
"""
    )
    return out


def _toml(value: Any) -> str:
    """A TOML scalar (strings as JSON strings: TOML basic strings use the same escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)  # ints, and floats (repr always has a "." or an exponent)


def run_config(settings: dict[str, Any]) -> str:
    """``flwr run --run-config``: space-separated ``key=value`` in TOML."""
    return " ".join(f"{k}={_toml(v)}" for k, v in settings.items())


# --- the parties ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Owner:
    org: str
    domain: str
    home: Path
    creds: Credentials
    ca: Path
    data: Path


def issue(
    ca_dir: Path,
    org: str,
    role: str,
    out: Path,
    san_dns: tuple[str, ...] = (),
    san_ip: tuple[str, ...] = (),
) -> Credentials:
    """A key made in ``out`` (it never leaves) and the CA's certificate for it."""
    req = generate_key_and_csr(org, out, role)
    cert = issue_certificate(
        ca_dir, req.csr, role, out=out / "cert.pem", san_dns=san_dns, san_ip=san_ip
    )
    return Credentials(cert.path, req.key)


def member_env(address: str, ca: Path, creds: Credentials, flwr_home: Path) -> dict[str, str]:
    """A member's connection to the Consortium API, as the variables it would export."""
    return environment(
        flwr_home,
        FLEXFED_COORDINATOR=address,
        FLEXFED_CA=str(ca),
        FLEXFED_CERT=str(creds.cert),
        FLEXFED_KEY=str(creds.key),
    )


# --- the flow ------------------------------------------------------------------------------


def run_network_demo(
    workdir: Path, quick: bool = False, public_model: str = "tiny"
) -> dict[str, Any]:
    """Run the demo through the coordinator, a SuperLink and SuperNodes; return the results.

    Writes ``results.json``/``results.png`` (as ``flexfed demo``) and ``network.json``.
    """
    workdir = Path(workdir).resolve()  # NOTE: every process gets absolute paths
    s = DemoSettings.preset(quick, public_model)
    with _torch_threads(THREADS_PER_PROCESS), _sigterm_as_exit():
        return _run(workdir, s, quick)


def _run(workdir: Path, s: DemoSettings, quick: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    shutil.rmtree(workdir / "network", ignore_errors=True)
    prepared = prepare(workdir, s)
    services = Services(workdir / "network" / "logs")
    try:
        return _federate(workdir, s, quick, prepared, services, t0)
    except BaseException:
        dead = [n for n, p in services.running.items() if p.poll() not in (None, 0)]
        for name in dead:
            console.print(
                f"[red]{name} exited; {services.log(name)}:[/red]\n{tail(services.log(name))}"
            )
        console.print(f"network demo: every process's log is in {services.logs}")
        raise
    finally:
        services.stop_all()


def _federate(
    workdir: Path,
    s: DemoSettings,
    quick: bool,
    prepared: Prepared,
    services: Services,
    t0: float,
) -> dict[str, Any]:
    operator = workdir / "operator"
    logs = services.logs
    timings: dict[str, float] = {"prepare": round(time.monotonic() - t0, 1)}
    lap = [time.monotonic()]

    def done(step: str) -> None:
        now = time.monotonic()
        timings[step] = round(now - lap[0], 1)
        lap[0] = now

    op_home = operator / "flwr"  # the operator's `flwr` CLI configuration

    # --- PKI: a throwaway consortium CA and everyone's certificates --------------------------
    ca_dir = operator / "ca"
    ca = init_ca(ca_dir, "flexfed demo consortium CA").cert
    tls = issue(
        ca_dir,
        "consortium",
        "operator",
        operator / "tls",
        san_dns=("localhost",),
        san_ip=("127.0.0.1",),
    )
    with _quiet("flexfed.common.ca"):  # NOTE: warns that this one is no server certificate
        admin = issue(ca_dir, "consortium", "operator", operator / "admin")
    owners: list[Owner] = []
    for domain, org in demo_orgs().items():
        home = workdir / "owners" / org
        data = home / "data"
        data.mkdir(parents=True)
        shutil.copyfile(prepared.domain_files[domain], data / prepared.domain_files[domain].name)
        owner_ca = home / "keys" / "ca.pem"
        creds = issue(ca_dir, org, "owner", home / "keys")
        shutil.copyfile(ca, owner_ca)  # the one public file the operator hands every owner
        owners.append(Owner(org, domain, home, creds, owner_ca, data))
    console.print(
        f"operator: consortium CA {ca}; certificates for the coordinator and {len(owners)} owners"
    )

    # --- the coordinator (Consortium API) --------------------------------------------------
    coordinator_dir = operator / "coordinator"
    run_cli(
        "coordinator-init",
        flexfed_cli(
            "coordinator",
            "init",
            coordinator_dir,
            "--ca-cert",
            ca,
            "--crl",
            ca_dir / "crl.pem",
            "--tls-cert",
            tls.cert,
            "--tls-key",
            tls.key,
            "--anchor",
            prepared.anchor.path,
            "--listen",
            "127.0.0.1:0",
            "--origin",
            LOG_ORIGIN,
        ),
        environment(op_home),
        logs,
    )
    services.start(
        "coordinator", flexfed_cli("coordinator", "serve", coordinator_dir), environment(op_home)
    )
    address = services.wait_for("coordinator", r"serving on (127\.0\.0\.1:\d+)").group(1)
    console.print(f"operator: coordinator serving the Consortium API on {address}")
    op_env = member_env(address, ca, admin, op_home)

    # --- the SuperLink (Flower control plane), as deploy/flower/superlink.sh -----------------
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    state = operator / "superlink"
    state.mkdir()
    services.start(
        "superlink",
        [
            "flower-superlink",
            "--ssl-certfile",
            tls.cert,
            "--ssl-keyfile",
            tls.key,
            "--ssl-ca-certfile",
            ca,
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--isolation",
            "subprocess",
            "--database",
            state / "superlink.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        environment(operator / "flwr-superlink"),
        cwd=state,
    )
    services.wait_for("superlink", r"Uvicorn running on https://")
    # the `flwr` CLI's connection, as deploy/flower/connection.sh writes it
    op_home.mkdir(parents=True, exist_ok=True)
    (op_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{superlink}"\nroot-certificates = "{ca}"\n'
    )
    console.print(f"operator: Flower SuperLink on {superlink} (TLS, SuperNode authentication)")
    done("coordinator and SuperLink")

    # --- the owners: node keys (registered by the operator) and SuperNodes -------------------
    for owner in owners:
        key, public = generate_node_key(owner.home / "node-key")
        run_cli(
            f"register-{owner.org}",
            ["flwr", "supernode", "register", public, CONNECTION, "--name", owner.org],
            op_env,
            logs,
        )
        node_config = " ".join(
            f"{k}={json.dumps(str(v))}"
            for k, v in {
                "data-path": owner.data,
                "cert": owner.creds.cert,
                "key": owner.creds.key,
                "ca": owner.ca,
                "work-dir": owner.home / "work",
                "coordinator": address,  # credentials go only to this address
                "device": "cpu",
            }.items()
        )
        services.start(
            f"supernode-{owner.org}",
            [
                "flower-supernode",
                "--superlink",
                superlink,
                "--root-certificates",
                owner.ca,
                "--auth-supernode-private-key",
                key,
                "--node-config",
                node_config,
                "--isolation",
                "subprocess",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
            ],
            environment(owner.home / "flwr"),
            cwd=owner.home,
        )
        console.print(
            f"owner {owner.org}: SuperNode started in {owner.home} with its {owner.domain} data"
        )

    app = write_flower_app(operator / "flower-app")
    campaigns = operator / "campaigns"
    campaigns.mkdir()
    common = {
        "consortium-address": address,
        "min-nodes": len(owners),
        "node-wait": NODE_WAIT,
        "reply-timeout": CAMPAIGN_TIMEOUT,
        "val-fraction": VAL_FRACTION,
    }

    def campaign(name: str, settings: dict[str, Any]) -> dict[str, Any]:
        """``flwr run APP consortium --run-config ... --stream``; the ServerApp's report."""
        report = campaigns / f"{name}.json"
        values = {**common, **settings, "report": str(report)}
        proc = services.start(
            f"campaign-{name}",
            ["flwr", "run", app, CONNECTION, "--run-config", run_config(values), "--stream"],
            op_env,
        )
        deadline = time.monotonic() + CAMPAIGN_TIMEOUT + 120
        while proc.poll() is None:
            services.check_alive(["coordinator", "superlink"])
            if time.monotonic() > deadline:
                raise NetworkDemoError(f"the {name} campaign did not finish in time")
            time.sleep(0.5)
        log = services.log(f"campaign-{name}")
        if proc.returncode != 0 or not report.is_file():
            raise NetworkDemoError(
                f"the {name} campaign failed (exit {proc.returncode}); {log}:\n{tail(log)}"
            )
        services.running.pop(f"campaign-{name}")
        result: dict[str, Any] = json.loads(report.read_text())
        bad = [n for n in result["nodes"] if n["status"] != OK]
        for n in result["nodes"]:
            console.print(f"  {n['node_name']}: {_outcome(n)}", soft_wrap=True)
        if bad or result["succeeded"] != len(owners):
            why = "; ".join(f"{n['node_name']}: {n['status']}: {n['detail']}" for n in bad)
            node_logs = [services.log(f"supernode-{n['node_name']}") for n in bad]
            tails = "\n".join(f"--- {log}:\n{tail(log, 10)}" for log in node_logs)
            raise NetworkDemoError(
                f"the {name} campaign: {result['succeeded']} of {len(owners)} nodes succeeded "
                f"({why or 'some never connected'})\n{tails}"
            )
        return result

    # --- a training campaign --------------------------------------------------------------
    console.print(
        f"operator: training campaign on {len(owners)} SuperNodes ({s.expert_steps} steps each)"
    )
    train = campaign(
        "train",
        {
            "campaign": "train",
            "anchor-digest": prepared.anchor.digest,
            "max-steps": s.expert_steps,
            "seq-len": s.seq_len,
            "batch-size": s.batch_size,
            "lr": s.lr,
            "seed": 0,
        },
    )
    experts = {n["node_name"]: n["answer"]["expert_id"] for n in train["nodes"]}
    done("training campaign")

    releases: list[dict[str, Any]] = []

    def release_and_fetch() -> Path:
        out = run_cli(
            f"release-{len(releases) + 1}",
            flexfed_cli("coordinator", "release", "--top-k", str(TOP_K)),
            op_env,
            logs,
        )
        m = re.search(r"release (\d+): (\d+) experts, top-(\d+), model (\S+), log entry (\d+)", out)
        if not m:
            raise NetworkDemoError(f"unexpected `coordinator release` output: {out}")
        version = int(m.group(1))
        model = operator / "releases" / f"v{version}"
        run_cli(
            f"fetch-model-{version}",
            flexfed_cli("client", "fetch-model", "--out", model, "--version", str(version)),
            op_env,
            logs,
        )
        releases.append(
            {
                "version": version,
                "experts": int(m.group(2)),
                "top_k": int(m.group(3)),
                "model_artifact_digest": m.group(4),
                "log_index": int(m.group(5)),
            }
        )
        console.print(f"operator: {out.strip()}", soft_wrap=True)
        return model

    model = release_and_fetch()
    done("release 1")

    # --- an evaluation campaign: each owner measures the release on its own held-out data ---
    console.print("operator: evaluation campaign on the release (owners answer with metrics)")
    evaluation = campaign(
        "evaluate",
        {
            "campaign": "evaluate",
            "model-version": releases[0]["version"],
            "eval-seq-len": s.seq_len,
            "eval-max-sequences": s.eval_sequences,
        },
    )
    done("evaluation campaign")

    # --- an owner opts out, signed with its own key; the operator releases again ------------
    dropped_domain = DEMO_DOMAINS[-1]
    leaver = next(o for o in owners if o.domain == dropped_domain)
    out = run_cli(
        f"optout-{leaver.org}",
        flexfed_cli("client", "optout", experts[leaver.org], "--org", leaver.org),
        member_env(address, leaver.ca, leaver.creds, leaver.home / "flwr"),
        logs,
        cwd=leaver.home,
    )
    console.print(f"owner {leaver.org}: {out.strip()}", soft_wrap=True)
    without = release_and_fetch()
    done("opt-out and release 2")
    check = run_cli(
        "coordinator-check", flexfed_cli("coordinator", "check", coordinator_dir), op_env, logs
    )
    m = re.search(r"\((\d+) experts, (\d+) entries\)", check)
    log_size = int(m.group(2)) if m else None
    console.print(f"operator: {check.strip()}", soft_wrap=True)

    # --- the operator's evaluation, exactly as the local demo's --------------------------------
    orgs = demo_orgs()
    columns = evaluate_columns(
        s,
        prepared,
        [
            ("public", prepared.anchor.path),
            ("flexolmo", model),
            (f"flexolmo-without-{leaver.org}", without),
        ],
    )
    done("operator evaluation")
    results: dict[str, Any] = results_record(
        s, quick, prepared, releases[0]["top_k"], orgs, dropped_domain, columns, t0
    )
    results["network"] = True
    network = {
        "coordinator": address,
        "superlink": superlink,
        "log_origin": LOG_ORIGIN,
        "log_size": log_size,
        "campaigns": {"train": train, "evaluate": evaluation},
        "releases": releases,
        "opted_out": {"org": leaver.org, "expert_id": experts[leaver.org]},
        "logs": str(logs),
        "seconds": timings,
    }
    (workdir / "network.json").write_text(json.dumps(network, indent=2) + "\n")
    save_results(results, workdir)
    return results


def _outcome(node: dict[str, Any]) -> str:
    a = node.get("answer")
    if node["status"] != OK or not a:
        return f"{node['status']}: {node['detail']}"
    if "expert_id" in a:
        return (
            f"expert {a['expert_id'][:23]}... accepted (log entry {a['log_index']}); "
            f"held-out loss {a['val_loss_public']:.3f} -> {a['val_loss_expert']:.3f}"
        )
    return (
        f"release v{a['model_version']} on its own held-out data: loss {a['loss_public']:.3f} "
        f"-> {a['loss_model']:.3f} (gain {a['gain']:+.3f})"
    )
