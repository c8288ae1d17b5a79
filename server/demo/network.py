"""``flexfed demo --network``: the demo's whole flow through the real network components.

Everything runs on 127.0.0.1, each party in its own process and directory:

1. The operator prepares the corpora, the public model (cached) and the anchor exactly as
   ``flexfed demo`` does (:func:`flexfed.server.demo.local.prepare`), creates a throwaway consortium
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
at the end, on failure, on Ctrl-C and on SIGTERM (:mod:`flexfed.server.demo.processes`).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexfed.common.flower.campaign import OK
from flexfed.common.flower.node_key import generate_node_key
from flexfed.common.trust.ca import init_ca
from flexfed.common.util.progress import console
from flexfed.server.demo.local import (
    DEMO_DOMAINS,
    THREADS_PER_PROCESS,
    TOP_K,
    VAL_FRACTION,
    DemoSettings,
    Prepared,
    demo_orgs,
    evaluate_columns,
    prepare,
    results_record,
    save_results,
    torch_threads,
)
from flexfed.server.demo.parties import (
    CAMPAIGN_TIMEOUT,
    CONNECTION,
    LOG_ORIGIN,
    NODE_WAIT,
    Laps,
    Network,
    NetworkDemoError,
    Owner,
    Pki,
    environment,
    flexfed_cli,
    issue,
    member_env,
    quiet_logger,
    run_config,
    write_flower_app,
)
from flexfed.server.demo.processes import (
    Services,
    free_port,
    run_cli,
    sigterm_as_exit,
    tail,
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
    with torch_threads(THREADS_PER_PROCESS), sigterm_as_exit():
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
    laps = Laps(t0)
    pki = issue_credentials(workdir, prepared)
    net = start_services(workdir / "operator", pki, prepared, services)
    laps.done("coordinator and SuperLink")
    enrol_owners(net)
    campaigns = Campaigns.open(net)
    train = training_campaign(campaigns, s, prepared)
    experts = {n["node_name"]: n["answer"]["expert_id"] for n in train["nodes"]}
    laps.done("training campaign")
    model = release_and_fetch(net)
    laps.done("release 1")
    evaluation = evaluation_campaign(campaigns, s, net.releases[0]["version"])
    laps.done("evaluation campaign")
    leaver, without = opt_out_and_rerelease(net, experts)
    laps.done("opt-out and release 2")
    log_size = check_coordinator(net)
    columns = operator_evaluation(s, prepared, model, leaver, without)
    laps.done("operator evaluation")
    return collect_results(
        workdir,
        results_record(
            s, quick, prepared, net.releases[0]["top_k"], demo_orgs(), leaver.domain, columns, t0
        ),
        network={
            "coordinator": net.address,
            "superlink": net.superlink,
            "log_origin": LOG_ORIGIN,
            "log_size": log_size,
            "campaigns": {"train": train, "evaluate": evaluation},
            "releases": net.releases,
            "opted_out": {"org": leaver.org, "expert_id": experts[leaver.org]},
            "logs": str(net.logs),
            "seconds": laps.seconds,
        },
    )


# --- the steps -----------------------------------------------------------------------------


def issue_credentials(workdir: Path, prepared: Prepared) -> Pki:
    """A throwaway consortium CA and everyone's certificates; each owner's home and data."""
    operator = workdir / "operator"
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
    with quiet_logger(
        "flexfed.common.trust.ca"
    ):  # NOTE: warns that this one is no server certificate
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
    return Pki(ca_dir, ca, tls, admin, tuple(owners))


def start_services(operator: Path, pki: Pki, prepared: Prepared, services: Services) -> Network:
    """The coordinator (Consortium API) and the SuperLink; the operator's `flwr` connection."""
    op_home = operator / "flwr"  # the operator's `flwr` CLI configuration
    coordinator_dir = operator / "coordinator"
    address = start_coordinator(coordinator_dir, pki, prepared, services, environment(op_home))
    op_env = member_env(address, pki.ca, pki.admin, op_home)
    superlink = start_superlink(operator, pki, services)
    # the `flwr` CLI's connection, as deploy/flower/connection.sh writes it
    op_home.mkdir(parents=True, exist_ok=True)
    (op_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{superlink}"\nroot-certificates = "{pki.ca}"\n'
    )
    console.print(f"operator: Flower SuperLink on {superlink} (TLS, SuperNode authentication)")
    return Network(operator, services, pki, coordinator_dir, address, superlink, op_env)


def start_coordinator(
    coordinator_dir: Path,
    pki: Pki,
    prepared: Prepared,
    services: Services,
    env: dict[str, str],
) -> str:
    """``flexfed coordinator init`` + ``serve``; the address it serves on."""
    run_cli(
        "coordinator-init",
        flexfed_cli(
            "coordinator",
            "init",
            coordinator_dir,
            "--ca-cert",
            pki.ca,
            "--crl",
            pki.ca_dir / "crl.pem",
            "--tls-cert",
            pki.tls.cert,
            "--tls-key",
            pki.tls.key,
            "--anchor",
            prepared.anchor.path,
            "--listen",
            "127.0.0.1:0",
            "--origin",
            LOG_ORIGIN,
        ),
        env,
        services.logs,
    )
    services.start("coordinator", flexfed_cli("coordinator", "serve", coordinator_dir), env)
    address = services.wait_for("coordinator", r"serving on (127\.0\.0\.1:\d+)").group(1)
    console.print(f"operator: coordinator serving the Consortium API on {address}")
    return address


def start_superlink(operator: Path, pki: Pki, services: Services) -> str:
    """The Flower control plane, as deploy/flower/superlink.sh starts it; its address."""
    port = free_port()
    state = operator / "superlink"
    state.mkdir()
    services.start(
        "superlink",
        [
            "flower-superlink",
            "--ssl-certfile",
            pki.tls.cert,
            "--ssl-keyfile",
            pki.tls.key,
            "--ssl-ca-certfile",
            pki.ca,
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
    return f"127.0.0.1:{port}"


def enrol_owners(net: Network) -> None:
    """Each owner makes a node key, the operator registers it, the owner starts a SuperNode."""
    for owner in net.pki.owners:
        key, public = generate_node_key(owner.home / "node-key")
        run_cli(
            f"register-{owner.org}",
            ["flwr", "supernode", "register", public, CONNECTION, "--name", owner.org],
            net.op_env,
            net.logs,
        )
        node_config = " ".join(
            f"{k}={json.dumps(str(v))}"
            for k, v in {
                "data-path": owner.data,
                "cert": owner.creds.cert,
                "key": owner.creds.key,
                "ca": owner.ca,
                "work-dir": owner.home / "work",
                "coordinator": net.address,  # credentials go only to this address
                "device": "cpu",
            }.items()
        )
        net.services.start(
            f"supernode-{owner.org}",
            [
                "flower-supernode",
                "--superlink",
                net.superlink,
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


@dataclass(frozen=True)
class Campaigns:
    """Campaigns: ``flwr run`` of the flexfed Flower App; the ServerApps' reports."""

    net: Network
    app: Path
    reports: Path
    common: dict[str, Any]  # the run config every campaign shares

    @classmethod
    def open(cls, net: Network) -> Campaigns:
        app = write_flower_app(net.operator / "flower-app")
        reports = net.operator / "campaigns"
        reports.mkdir()
        common = {
            "consortium-address": net.address,
            "min-nodes": len(net.pki.owners),
            "node-wait": NODE_WAIT,
            "reply-timeout": CAMPAIGN_TIMEOUT,
            "val-fraction": VAL_FRACTION,
        }
        return cls(net, app, reports, common)

    def run(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        """``flwr run APP consortium --run-config ... --stream``; the ServerApp's report."""
        services, owners = self.net.services, self.net.pki.owners
        report = self.reports / f"{name}.json"
        values = {**self.common, **settings, "report": str(report)}
        proc = services.start(
            f"campaign-{name}",
            ["flwr", "run", self.app, CONNECTION, "--run-config", run_config(values), "--stream"],
            self.net.op_env,
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


def training_campaign(campaigns: Campaigns, s: DemoSettings, prepared: Prepared) -> dict[str, Any]:
    """Every node fetches the anchor, trains, signs and submits its expert; the report."""
    console.print(
        f"operator: training campaign on {len(campaigns.net.pki.owners)} SuperNodes "
        f"({s.expert_steps} steps each)"
    )
    return campaigns.run(
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


def release_and_fetch(net: Network) -> Path:
    """``flexfed coordinator release``, recorded in ``net.releases``; the downloaded model."""
    out = run_cli(
        f"release-{len(net.releases) + 1}",
        flexfed_cli("coordinator", "release", "--top-k", str(TOP_K)),
        net.op_env,
        net.logs,
    )
    m = re.search(r"release (\d+): (\d+) experts, top-(\d+), model (\S+), log entry (\d+)", out)
    if not m:
        raise NetworkDemoError(f"unexpected `coordinator release` output: {out}")
    version = int(m.group(1))
    model = net.operator / "releases" / f"v{version}"
    run_cli(
        f"fetch-model-{version}",
        flexfed_cli("client", "fetch-model", "--out", model, "--version", str(version)),
        net.op_env,
        net.logs,
    )
    net.releases.append(
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


def evaluation_campaign(campaigns: Campaigns, s: DemoSettings, version: int) -> dict[str, Any]:
    """Each owner measures release ``version`` on its own held-out data; the report."""
    console.print("operator: evaluation campaign on the release (owners answer with metrics)")
    return campaigns.run(
        "evaluate",
        {
            "campaign": "evaluate",
            "model-version": version,
            "eval-seq-len": s.seq_len,
            "eval-max-sequences": s.eval_sequences,
        },
    )


def opt_out_and_rerelease(net: Network, experts: dict[str, str]) -> tuple[Owner, Path]:
    """The dropped domain's owner opts out, signed with its own key; the next release."""
    leaver = next(o for o in net.pki.owners if o.domain == DEMO_DOMAINS[-1])
    out = run_cli(
        f"optout-{leaver.org}",
        flexfed_cli("client", "optout", experts[leaver.org], "--org", leaver.org),
        member_env(net.address, leaver.ca, leaver.creds, leaver.home / "flwr"),
        net.logs,
        cwd=leaver.home,
    )
    console.print(f"owner {leaver.org}: {out.strip()}", soft_wrap=True)
    return leaver, release_and_fetch(net)


def check_coordinator(net: Network) -> int | None:
    """``flexfed coordinator check``; the transparency log's size it reports."""
    check = run_cli(
        "coordinator-check",
        flexfed_cli("coordinator", "check", net.coordinator_dir),
        net.op_env,
        net.logs,
    )
    m = re.search(r"\((\d+) experts, (\d+) entries\)", check)
    console.print(f"operator: {check.strip()}", soft_wrap=True)
    return int(m.group(2)) if m else None


def operator_evaluation(
    s: DemoSettings, prepared: Prepared, model: Path, leaver: Owner, without: Path
) -> dict[str, dict[str, dict[str, Any]]]:
    """The operator's evaluation, exactly as the local demo's: public, release 1, release 2."""
    return evaluate_columns(
        s,
        prepared,
        [
            ("public", prepared.anchor.path),
            ("flexolmo", model),
            (f"flexolmo-without-{leaver.org}", without),
        ],
    )


def collect_results(
    workdir: Path, results: dict[str, Any], network: dict[str, Any]
) -> dict[str, Any]:
    """``network.json`` and, marked ``"network": true``, the local demo's results files."""
    results["network"] = True
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
