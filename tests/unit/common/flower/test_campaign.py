"""Flower campaigns without Flower processes: settings, plans, answers, outcomes, node config.

Protects what the ServerApp and ClientApp agree on (the records in a message), that a node
which fails, goes offline or never answers is reported rather than fatal, and that what a plan
carries never depends on an owner's data. The real SuperLink/SuperNode flow is
tests/integration/test_flower.py.
"""

from __future__ import annotations

import stat
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import Context, Error, Message, RecordDict
from flwr.app.message.message import Message as _Message
from flwr.cli.supernode.register import try_load_public_key
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from flexfed.client import flower_app as client_app
from flexfed.client.flower_node import ConsentError, NodeSettings
from flexfed.common.errors import ConfigError, InvalidInputError
from flexfed.common.flower.campaign import (
    FAILED,
    OK,
    TIMED_OUT,
    UNAVAILABLE,
    CampaignConfig,
    CampaignReport,
    EvaluationAnswer,
    TrainingAnswer,
    answer_from_record,
    answer_to_record,
    read_plan,
)
from flexfed.common.flower.node_key import generate_node_key
from flexfed.common.trust.keys import KeyExistsError
from flexfed.server.flower_app import run_campaign

APP = Path(__file__).resolve().parents[4] / "deploy" / "flower-app" / "pyproject.toml"
DIGEST = "sha256:" + "ab" * 32

TRAINED = TrainingAnswer(
    org="acme",
    expert_id="sha256:" + "01" * 32,
    weights_sha256="02" * 32,
    anchor_digest=DIGEST,
    data_commitment="03" * 32,
    log_index=7,
    steps=2,
    tokens=128,
    seconds=1.5,
    final_loss=5.25,
    val_loss_public=5.5,
    val_loss_expert=5.0,
)
EVALUATED = EvaluationAnswer(
    org="globex",
    model_version=3,
    loss_public=5.5,
    loss_model=5.0,
    ppl_public=244.7,
    ppl_model=148.4,
    tokens=310,
    documents=4,
)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a ServerApp/ClientApp process before messages can be made."""
    for name, value in (("_run_id", 5), ("_task_id", 11), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def train_config(**overrides: object) -> CampaignConfig:
    values = {"consortium-address": "127.0.0.1:7443", "anchor-digest": DIGEST, **overrides}
    return CampaignConfig.from_run_config(values)


# --- settings and plans ----------------------------------------------------------------------


def test_the_shipped_run_config_is_valid_once_the_deployment_values_are_set() -> None:
    config = tomllib.loads(APP.read_text())["tool"]["flwr"]["app"]["config"]
    cfg = CampaignConfig.from_run_config({**config, "anchor-digest": DIGEST})
    assert cfg == CampaignConfig(consortium_address="127.0.0.1:7443", anchor_digest=DIGEST)
    components = tomllib.loads(APP.read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "flexfed.server.flower_app:app",
        "clientapp": "flexfed.client.flower_app:app",
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max-step": 2}, "unknown campaign setting 'max-step'"),
        ({"max-steps": "2"}, "must be int"),
        ({"max-steps": True}, "must be int"),
        ({"campaign": "tune"}, "campaign must be one of"),
        ({"anchor-digest": ""}, "needs anchor-digest"),
        ({"consortium-address": ""}, "consortium-address"),
        ({"reply-timeout": 0.0}, "reply-timeout"),
        ({"val-fraction": 0.0}, "val-fraction"),
        ({"model-version": -1}, "model-version"),
    ],
)
def test_bad_campaign_settings_are_refused_with_the_setting_named(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        train_config(**overrides)


def test_a_float_setting_accepts_a_toml_integer() -> None:
    assert train_config(**{"reply-timeout": 30}).reply_timeout == 30.0


def test_a_training_plan_carries_the_anchor_address_and_hyperparameters_only() -> None:
    plan = read_plan(train_config(**{"max-steps": 2, "seq-len": 32}).plan())
    assert plan == {
        "campaign": "train",
        "consortium-address": "127.0.0.1:7443",
        "anchor-digest": DIGEST,
        "max-steps": 2,
        "seq-len": 32,
        "batch-size": 8,
        "lr": 9e-4,
        "seed": 0,
        "val-fraction": 0.05,
    }


def test_an_evaluation_plan_names_the_model_version_not_the_anchor() -> None:
    cfg = CampaignConfig.from_run_config(
        {"campaign": "evaluate", "consortium-address": "c:1", "model-version": 2}
    )
    plan = read_plan(cfg.plan())
    assert plan["model-version"] == 2 and "anchor-digest" not in plan
    assert (plan["seq-len"], plan["max-sequences"]) == (256, 64)


# --- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [TRAINED, EVALUATED])
def test_answers_round_trip_through_flower_records(
    answer: TrainingAnswer | EvaluationAnswer,
) -> None:
    record = answer_to_record(answer)
    assert answer_from_record(type(answer), record) == answer


def test_a_malformed_answer_is_an_input_error() -> None:
    record = answer_to_record(TRAINED)
    del record.metric_records["metrics"]["log_index"]
    with pytest.raises(InvalidInputError, match="log_index"):
        answer_from_record(TrainingAnswer, record)
    with pytest.raises(InvalidInputError, match="no result"):
        answer_from_record(TrainingAnswer, RecordDict())


def test_evaluation_gain_is_the_loss_reduction_over_the_public_model() -> None:
    assert EVALUATED.gain == pytest.approx(0.5)
    report = CampaignReport("evaluate", 9, [])
    assert report.lines() == ["evaluate campaign (run 9): 0 of 0 nodes succeeded"]


# --- the ServerApp's campaign loop against a fake Grid ---------------------------------------


class FakeGrid(Grid):
    """Answers like a SuperLink would: node 1 trains, node 2 fails, node 3 went offline (the
    SuperLink answers for it), node 4 never answers."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []
        self.pulls = 0

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [4, 3, 2, 1]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.pushed.append(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        wanted = set(message_ids)
        out: list[Message] = []
        for msg in self.pushed:
            if msg.metadata.message_id not in wanted:
                continue
            node = msg.metadata.dst_node_id
            if node == 1:
                out.append(_Message(answer_to_record(TRAINED), reply_to=msg))
            elif node == 2:
                out.append(_Message(Error(code=100, reason="ConfigError: no data"), reply_to=msg))
            elif node == 3:
                out.append(create_message_error_unavailable_res_message(msg.metadata, "node"))
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError


def test_failed_offline_and_silent_nodes_are_reported_and_the_campaign_completes() -> None:
    grid = FakeGrid()
    cfg = train_config(**{"min-nodes": 4, "reply-timeout": 0.05})
    report = run_campaign(grid, cfg, run_id=5, poll=0.01)
    status = {o.node_id: o.status for o in report.outcomes}
    assert status == {1: OK, 2: FAILED, 3: UNAVAILABLE, 4: TIMED_OUT}
    assert [o.answer for o in report.succeeded] == [TRAINED]
    assert {m.metadata.dst_node_id for m in grid.pushed} == {1, 2, 3, 4}
    assert all(m.metadata.message_type == "train" for m in grid.pushed)
    failed = next(o for o in report.outcomes if o.node_id == 2)
    assert failed.detail == "ConfigError: no data"
    lines = report.lines()
    assert lines[0].startswith(f"acme: node 1 accepted {TRAINED.expert_id}, log entry 7")
    assert lines[-1] == "train campaign (run 5): 1 of 4 nodes succeeded, 3 reported above"
    assert '"status": "unavailable"' in report.to_json()


# --- the ClientApp and the node config -------------------------------------------------------


def test_a_node_without_its_data_path_answers_with_a_one_line_error(tmp_path: Path) -> None:
    plan = train_config().plan()
    msg = Message(plan, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    context = Context(1, 1, {"cert": "c.pem"}, RecordDict(), {})
    reply = client_app.train(msg, context)
    assert reply.has_error() and reply.error.code == client_app.FLEXFED_ERROR
    assert reply.error.reason == (
        "ConfigError: the SuperNode's --node-config lacks data-path, key, ca "
        "(see deploy/flower/supernode.sh)"
    )


def node_config(tmp_path: Path) -> dict[str, str]:
    """A node config whose files exist (their contents are not read here)."""
    for name in ("data", "cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    return {
        "data-path": str(tmp_path / "data"),
        "cert": str(tmp_path / "cert.pem"),
        "key": str(tmp_path / "key.pem"),
        "ca": str(tmp_path / "ca.pem"),
    }


def test_node_settings_check_paths_and_pin_the_coordinator(tmp_path: Path) -> None:
    config = {**node_config(tmp_path), "work-dir": str(tmp_path / "work")}
    settings = NodeSettings.from_node_config(config)
    assert settings.coordinator_for("a:1") == "a:1"
    pinned = NodeSettings.from_node_config({**config, "coordinator": "b:2"})
    assert pinned.coordinator_for("b:2") == "b:2"
    with pytest.raises(ConfigError, match="refusing to send credentials"):
        pinned.coordinator_for("evil:1")
    with pytest.raises(ConfigError, match="unknown node-config key"):
        NodeSettings.from_node_config({**config, "data_path": "x"})
    with pytest.raises(ConfigError, match="does not exist on this node"):
        NodeSettings.from_node_config({**config, "data-path": str(tmp_path / "nope")})


def test_the_owners_consent_bounds_what_a_plan_may_ask(tmp_path: Path) -> None:
    """Issue 12: the node trained on whatever plan arrived, for whichever anchor."""
    config = node_config(tmp_path)
    approved = "ab" * 32
    settings = NodeSettings.from_node_config(
        {**config, "anchors": f"sha256:{approved}, {'cd' * 32}", "max-steps": "100",
         "max-seq-len": 512, "max-tokens": "40000"}
    )  # fmt: skip
    assert settings.anchors == (approved, "cd" * 32)
    settings.approve_anchor(approved)
    settings.approve_anchor("sha256:" + approved)
    with pytest.raises(ConsentError) as other:
        settings.approve_anchor("ef" * 32)
    assert str(other.value) == (
        "anchor efefefefefefefef... is not one this node's owner approved (node-config anchors: "
        "abababababababab..., cdcdcdcdcdcdcdcd...); refusing to train or evaluate on it"
    )
    settings.check_plan(steps=100, seq_len=50, batch_size=8)  # 40,000 tokens: at the bound
    with pytest.raises(ConsentError, match=r"asks for 101 \(steps\), more than .* = 100\)"):
        settings.check_plan(steps=101, seq_len=8, batch_size=1)
    with pytest.raises(ConsentError, match=r"asks for 1024 \(seq-len\)"):
        settings.check_plan(steps=1, seq_len=1024, batch_size=1)
    with pytest.raises(ConsentError, match=r"asks for 40014 \(tokens\)"):
        settings.check_plan(steps=3, seq_len=26, batch_size=513)
    unbounded = NodeSettings.from_node_config(config)
    unbounded.approve_anchor("ef" * 32)  # no pin: any anchor (the docs recommend a pin)
    unbounded.check_plan(steps=10**6, seq_len=10**5, batch_size=10**3)
    with pytest.raises(ConfigError, match="is not an anchor digest"):
        NodeSettings.from_node_config({**config, "anchors": "tiny"})
    with pytest.raises(ConfigError, match="max-steps must be a positive integer"):
        NodeSettings.from_node_config({**config, "max-steps": "0"})


def test_node_keys_are_what_flower_registers_and_loads(tmp_path: Path) -> None:
    private, public = generate_node_key(tmp_path / "keys" / "node")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    load_ssh_private_key(private.read_bytes(), None)  # flower-supernode's loader
    assert try_load_public_key(public).startswith(b"-----BEGIN PUBLIC KEY-----")  # register's
    with pytest.raises(KeyExistsError):
        generate_node_key(private)
