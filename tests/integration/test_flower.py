"""Flower campaigns on real processes: a SuperLink, four SuperNodes and the coordinator.

Protects issue 7: the operator starts ``flower-superlink`` with TLS (the consortium CA's server
certificate) and SuperNode authentication on, registers four owners' node keys, and the owners
start ``flower-supernode`` with their data path and credentials in ``--node-config`` (all with
the scripts in ``deploy/flower``). A node whose key was never registered is refused. A training
campaign (``flwr run deploy/flower-app``) makes every node fetch the anchor, train, sign and
submit through the Consortium API; one node is killed mid-campaign and is reported while the
campaign completes for the other two; a fourth node, whose owner approved another anchor
(FLEXFED_ANCHORS), refuses the campaign before fetching anything. The operator releases a
model; an evaluation campaign returns per-owner gains on private held-out data; ``flexfed
audit verify`` passes on the release.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from consortium import Consortium, Member

from flexfed.common.api.consortium import Connection, ConsortiumClient
from flexfed.common.moe.optout import AssembledModel
from flexfed.common.public.tiny import build_anchor
from flexfed.server.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
FLEXFED = str(BIN / "flexfed")
REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "deploy" / "flower"
APP = REPO / "deploy" / "flower-app"
ORIGIN = "flower.example/log"
TOPICS = {
    "acme": "one plus one is two and two plus two is four",
    "globex": "the quick brown fox jumps over the lazy dog",
    "initech": "reports are due on friday with a new cover sheet",
    "umbrella": "the owner approved another anchor than the one published",
}
UNAPPROVED = "0" * 64  # the only anchor umbrella's owner approved (FLEXFED_ANCHORS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environment(flwr_home: Path) -> dict[str, str]:
    """Each Flower process gets its own FLWR_HOME, as on separate machines."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "FLWR_HOME": str(flwr_home),
    }


def run(args: list[str | Path], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Processes:
    """Long-running processes, each the leader of its own process group."""

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, args: list[str | Path], env: dict[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(a) for a in args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # NOTE: killpg then takes its ServerApp/ClientApp too
            )
        self.started.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.started):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill(proc)


@dataclass
class Federation:
    root: Path
    consortium: Consortium
    owners: dict[str, Member]
    coordinator: str  # Consortium API host:port
    coordinator_dir: Path
    anchor_digest: str
    superlink: str  # host:port of the SuperLink
    operator_env: dict[str, str]  # the `flwr` CLI's environment (connection "consortium")
    superlink_log: Path
    nodes: dict[str, subprocess.Popen[bytes]]
    processes: Processes


@pytest.fixture(scope="module")
def federation(
    consortium: Consortium, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("flower")
    processes = Processes()
    owners = {"acme": consortium.acme, "globex": consortium.globex}
    owners["initech"] = consortium.pki.member("initech")
    owners["umbrella"] = consortium.pki.member("umbrella")
    try:
        # --- the coordinator (data plane), as in test_full_flow -----------------------------
        anchor = build_anchor("olmo2", root / "anchor", hidden_size=32, num_hidden_layers=2)
        directory = root / "coordinator"
        run(
            [FLEXFED, *consortium.coordinator_init_args(directory, anchor.path, ORIGIN)],
            environment(root / "flwr-operator"),
        )  # fmt: skip
        coordinator = subprocess.Popen(
            [FLEXFED, "coordinator", "serve", str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=environment(root / "flwr-operator"),
            start_new_session=True,
        )
        processes.started.append(coordinator)
        assert coordinator.stdout is not None
        match = re.search(rb"serving on (127\.0\.0\.1:\d+)", coordinator.stdout.readline())
        assert match, "the coordinator did not start"
        address = match.group(1).decode()

        # --- the SuperLink (control plane): TLS + SuperNode authentication ------------------
        port = free_port()
        superlink_log = root / "superlink.log"
        processes.start(
            [SCRIPTS / "superlink.sh", root / "superlink", consortium.server.cert,
             consortium.server.key, consortium.pki.ca_pem, "127.0.0.1", str(port)],
            environment(root / "flwr-superlink"),
            superlink_log,
        )  # fmt: skip
        wait_for(
            lambda: b"Uvicorn running on https://" in superlink_log.read_bytes(), 60, "SuperLink"
        )
        operator_env = environment(root / "flwr-operator")
        run([SCRIPTS / "connection.sh", "consortium", f"127.0.0.1:{port}", consortium.pki.ca_pem],
            operator_env)  # fmt: skip

        # --- owners make node keys; the operator registers them -----------------------------
        nodes = {}
        for org, member in owners.items():
            home = root / org
            home.mkdir()
            key = home / "node-key"
            run([SCRIPTS / "node-key.sh", key], environment(home / "flwr"))
            run([SCRIPTS / "register-node.sh", f"{key}.pub", org, "consortium"], operator_env)
            data = home / "data.jsonl"
            data.write_text(
                "".join(json.dumps({"text": f"{TOPICS[org]} {i}. " * 6}) + "\n" for i in range(300))
            )
            nodes[org] = processes.start(
                [SCRIPTS / "supernode.sh", f"127.0.0.1:{port}", consortium.pki.ca_pem, key, data,
                 member.cert, member.key, home / "work", str(free_port())],
                {**environment(home / "flwr"), "FLEXFED_DEVICE": "cpu",
                 **({"FLEXFED_ANCHORS": UNAPPROVED} if org == "umbrella" else {})},
                home / "supernode.log",
            )  # fmt: skip
        yield Federation(
            root=root,
            consortium=consortium,
            owners=owners,
            coordinator=address,
            coordinator_dir=directory,
            anchor_digest=anchor.digest,
            superlink=f"127.0.0.1:{port}",
            operator_env=operator_env,
            superlink_log=superlink_log,
            nodes=nodes,
            processes=processes,
        )
    finally:
        processes.stop_all()


def campaign(fed: Federation, report: Path, **settings: str | int | float) -> subprocess.Popen[str]:
    """``flwr run deploy/flower-app consortium -c ... --stream`` (the operator's command)."""
    values = {"consortium-address": fed.coordinator, "report": str(report), **settings}
    config = " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in values.items()
    )
    return subprocess.Popen(
        [str(SCRIPTS / "campaign.sh"), "consortium", config],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=fed.operator_env,
    )


def member_client(fed: Federation, member: Member) -> ConsortiumClient:
    """A member's session with the coordinator (the Consortium API)."""
    return ConsortiumClient(
        Connection(fed.coordinator, fed.consortium.pki.ca_pem, member.cert, member.key)
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> str:
    out, _ = proc.communicate(timeout=timeout)
    print(out)  # the campaign's log: shown by pytest when a test fails
    assert proc.returncode == 0, out
    return out


def test_unregistered_node_is_refused(federation: Federation) -> None:
    fed = federation
    home = fed.root / "rogue"
    home.mkdir()
    run([SCRIPTS / "node-key.sh", home / "node-key"], environment(home / "flwr"))
    member = fed.owners["acme"]  # valid consortium credentials do not help without registration
    rogue = fed.processes.start(
        [SCRIPTS / "supernode.sh", fed.superlink, fed.consortium.pki.ca_pem, home / "node-key",
         home, member.cert, member.key, home / "work", str(free_port())],
        environment(home / "flwr"),
        home / "supernode.log",
    )  # fmt: skip
    # NOTE: a log file, not a pipe: a helper process of the node may outlive it holding a pipe
    assert rogue.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in (home / "supernode.log").read_text()
    assert "No SuperNode found with the given public key" in fed.superlink_log.read_text()


def test_training_campaign_then_release_then_evaluation_campaign(
    federation: Federation, tmp_path: Path
) -> None:
    fed = federation
    # --- training: three nodes get the plan; initech's node dies while it trains ------------
    train_report = tmp_path / "train.json"
    training = campaign(
        fed, train_report, campaign="train", **{"anchor-digest": fed.anchor_digest},
        **{"min-nodes": 4, "node-wait": 60.0, "reply-timeout": 150.0, "max-steps": 2,
           "seq-len": 32, "batch-size": 2},
    )  # fmt: skip
    runs = fed.root / "initech" / "work" / "runs"
    wait_for(lambda: any(runs.glob("train-*/plan.json")), 120, "initech's ClientApp to start")
    Processes.kill(fed.nodes["initech"])
    out = finish(training, 240)

    report = json.loads(train_report.read_text())
    by_name = {n["node_name"]: n for n in report["nodes"]}
    assert sorted(by_name) == ["acme", "globex", "initech", "umbrella"], out
    assert report["succeeded"] == 2, out
    assert by_name["initech"]["status"] == "unavailable", out  # the SuperLink noticed
    # issue 12: umbrella's owner approved another anchor; its node refuses before fetching it
    assert by_name["umbrella"]["status"] == "failed", out
    assert "is not one this node's owner approved" in by_name["umbrella"]["detail"], out
    assert not (fed.root / "umbrella" / "work" / "anchors").exists()
    assert f"initech): {by_name['initech']['status']}" in out  # reported in the run's log
    with member_client(fed, fed.consortium.auditor) as auditor:
        experts = {e.expert_id: e for e in auditor.experts()}
    for org in ("acme", "globex"):
        answer = by_name[org]["answer"]
        assert by_name[org]["status"] == "ok"
        assert answer["org"] == org and answer["anchor_digest"] == fed.anchor_digest
        assert answer["steps"] == 2
        expert = experts[answer["expert_id"]]  # accepted through the Consortium API
        assert (expert.org, expert.log_index) == (org, answer["log_index"])
        assert expert.data_commitment == answer["data_commitment"]
        assert f"{org}: node " in out and answer["expert_id"] in out
    assert not [e for e in experts.values() if e.org == "initech"]  # it died before submitting
    assert not [e for e in experts.values() if e.org == "umbrella"]

    # --- the operator releases; an evaluation campaign on the surviving nodes ---------------
    operator = fed.consortium.operator
    released = run(
        [FLEXFED, "coordinator", "release"],
        {**os.environ, "FLEXFED_COORDINATOR": fed.coordinator,
         "FLEXFED_CA": str(fed.consortium.pki.ca_pem), "FLEXFED_CERT": str(operator.cert),
         "FLEXFED_KEY": str(operator.key)},
    )  # fmt: skip
    assert re.match(r"release 1: 2 experts", released), released
    eval_report = tmp_path / "evaluate.json"
    evaluation = campaign(
        fed, eval_report, campaign="evaluate",
        **{"min-nodes": 2, "reply-timeout": 150.0, "eval-seq-len": 32, "eval-max-sequences": 8},
    )  # fmt: skip
    out = finish(evaluation, 200)
    report = json.loads(eval_report.read_text())
    answers = {n["node_name"]: n["answer"] for n in report["nodes"] if n["status"] == "ok"}
    assert sorted(answers) == ["acme", "globex"], out
    for org, answer in answers.items():
        assert answer["model_version"] == 1 and answer["documents"] > 0
        assert answer["gain"] == pytest.approx(answer["loss_public"] - answer["loss_model"])
        assert re.search(rf"{org}: node \d+ \({org}\) model v1 loss .* gain [+-]\d", out), out
        # only metrics travel: no text of the owner's data in the answer or the log
        assert TOPICS[org] not in json.dumps(answer) and TOPICS[org] not in out

    # --- an auditor checks the release ------------------------------------------------------
    auditor = fed.consortium.auditor
    model = tmp_path / "v1"
    with member_client(fed, auditor) as client:
        client.fetch_model(model, progress=False)
    assert sorted(str(s.get("org")) for s in AssembledModel(model).slots[1:]) == ["acme", "globex"]
    verdict = subprocess.run(
        [FLEXFED, "audit", "verify", str(model), "--trust", str(fed.consortium.pki.ca_pem),
         "--crl", str(fed.consortium.pki.crl_pem), "--log", f"grpcs://{fed.coordinator}",
         "--log-key", load_config(fed.coordinator_dir).log_public_key,
         "--cert", str(auditor.cert), "--key", str(auditor.key), "--log-origin", ORIGIN],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert "FAIL" not in verdict.stdout
