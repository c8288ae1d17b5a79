"""Flower campaigns: the settings, the plans sent to SuperNodes and the answers they send back.

Shared by the ServerApp (:mod:`flexfed.server.flower_app`) and the ClientApp
(:mod:`flexfed.client.flower_app`). This module is their one serde: every conversion between
Flower records (``ConfigRecord``/``MetricRecord`` in a ``RecordDict``) and Python types is
here, so both sides agree on the keys.

What travels, and why it is safe: a plan holds the anchor digest, the Consortium API address
and hyperparameters (nothing about any owner's data); an answer holds digests, a log index and
metrics (losses, token counts). Weights travel only through the Consortium API, signed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from flexfed.common.errors import ConfigError, InvalidInputError

CAMPAIGNS = ("train", "evaluate")
# Flower message types: the ClientApp's @app.train() and @app.evaluate() handlers.
MESSAGE_TYPES = {"train": "train", "evaluate": "evaluate"}

PLAN = "plan"  # the ConfigRecord of an instruction
RESULT = "result"  # the ConfigRecord of an answer (identities and digests)
METRICS = "metrics"  # the MetricRecord of an answer

# How a node's part in a campaign ended.
OK, FAILED, UNAVAILABLE, TIMED_OUT = "ok", "failed", "unavailable", "timed out"


@dataclass(frozen=True)
class CampaignConfig:
    """A campaign's settings: the Flower run config (``[tool.flwr.app.config]``, ``-c k=v``).

    Keys are the field names with ``-`` for ``_`` (``reply-timeout``).
    """

    campaign: str = "train"
    consortium_address: str = ""  # host:port of the Consortium API (data plane)
    anchor_digest: str = ""  # train: the anchor every expert must be trained from
    model_version: int = 0  # evaluate: the released model version; 0 = the latest
    min_nodes: int = 1  # wait (up to node_wait seconds) for this many SuperNodes
    node_wait: float = 60.0
    reply_timeout: float = 3600.0  # seconds for all answers; later ones count as timed out
    # training hyperparameters (see flexfed.client.trainer.TrainConfig)
    max_steps: int = 200
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 9e-4
    seed: int = 0
    val_fraction: float = 0.05  # the held-out split, the same rule for training and evaluation
    # evaluation
    eval_seq_len: int = 256
    eval_max_sequences: int = 64
    report: str = ""  # optional: write the campaign report as JSON here (SuperLink host)

    def __post_init__(self) -> None:
        if self.campaign not in CAMPAIGNS:
            raise ConfigError(
                f"campaign must be one of {', '.join(CAMPAIGNS)}, got {self.campaign!r}"
            )
        if not self.consortium_address:
            raise ConfigError("consortium-address (host:port of the Consortium API) is required")
        if self.campaign == "train" and not self.anchor_digest:
            raise ConfigError(
                "a training campaign needs anchor-digest (flexfed coordinator status)"
            )
        if self.model_version < 0:
            raise ConfigError("model-version must be 0 (the latest) or a released version")
        for name in ("min_nodes", "max_steps", "seq_len", "batch_size", "eval_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1")
        if self.eval_max_sequences < 1:
            raise ConfigError("eval-max-sequences must be at least 1")
        if not (self.node_wait >= 0 and self.reply_timeout > 0):
            raise ConfigError("node-wait must be >= 0 and reply-timeout > 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("lr must be positive")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError("val-fraction must be in (0, 0.5)")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> CampaignConfig:
        """From Flower's run config; unknown keys are an error (a typo must not pass)."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown campaign setting {key!r}")
            default = known[name].default
            values[name] = _coerce(key, value, type(default))
        return cls(**values)

    def plan(self) -> RecordDict:
        """The instruction for every node of this campaign (the same for all)."""
        common: dict[str, Any] = {
            "campaign": self.campaign,
            "consortium-address": self.consortium_address,
            "seed": self.seed,
            "val-fraction": self.val_fraction,
        }
        if self.campaign == "train":
            common |= {
                "anchor-digest": self.anchor_digest,
                "max-steps": self.max_steps,
                "seq-len": self.seq_len,
                "batch-size": self.batch_size,
                "lr": self.lr,
            }
        else:
            common |= {
                "model-version": self.model_version,
                "seq-len": self.eval_seq_len,
                "max-sequences": self.eval_max_sequences,
            }
        return RecordDict({PLAN: ConfigRecord(common)})


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Flower's run config is TOML-typed; accept an int where a float is expected."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"campaign setting {key!r} must be {kind.__name__}, got {value!r}")
    return value


def read_plan(content: RecordDict) -> dict[str, Any]:
    """The plan in an instruction, as a dict with kebab-case keys (the ClientApp's side)."""
    if PLAN not in content.config_records:
        raise InvalidInputError("the message holds no campaign plan")
    return dict(content.config_records[PLAN])


def plan_value(plan: Mapping[str, Any], key: str, kind: type) -> Any:
    """One typed value of a plan; a missing or mistyped one is an :class:`InvalidInputError`."""
    if key not in plan:
        raise InvalidInputError(f"the campaign plan lacks {key!r}")
    value = plan[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise InvalidInputError(f"the campaign plan's {key!r} is not {kind.__name__}")
    return value


# --- answers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingAnswer:
    """A node's answer to a training plan: what it submitted and how training went."""

    org: str
    expert_id: str  # the accepted bundle's artifact digest
    weights_sha256: str  # expert.safetensors, as signed in model.sig
    anchor_digest: str
    data_commitment: str  # the digest of the owner's data manifest (the data stays)
    log_index: int  # the expert-accepted entry in the transparency log
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    val_loss_public: float
    val_loss_expert: float


@dataclass(frozen=True)
class EvaluationAnswer:
    """A node's answer to an evaluation plan: metrics on its own held-out data, nothing else."""

    org: str
    model_version: int
    loss_public: float
    loss_model: float
    ppl_public: float
    ppl_model: float
    tokens: int  # held-out tokens evaluated
    documents: int  # held-out documents

    @property
    def gain(self) -> float:
        """Loss reduction of the released model over the public one (positive: better)."""
        return self.loss_public - self.loss_model


_STRINGS = {
    TrainingAnswer: ("org", "expert_id", "weights_sha256", "anchor_digest", "data_commitment"),
    EvaluationAnswer: ("org",),
}


def answer_to_record(answer: TrainingAnswer | EvaluationAnswer) -> RecordDict:
    """Identities and digests in a ConfigRecord, numbers in a MetricRecord."""
    values = asdict(answer)
    strings = _STRINGS[type(answer)]
    return RecordDict(
        {
            RESULT: ConfigRecord({k: values[k] for k in strings}),
            METRICS: MetricRecord({k: v for k, v in values.items() if k not in strings}),
        }
    )


def answer_from_record(
    kind: type[TrainingAnswer] | type[EvaluationAnswer], content: RecordDict
) -> TrainingAnswer | EvaluationAnswer:
    """The inverse of :func:`answer_to_record`; a malformed answer is an InvalidInputError."""
    if RESULT not in content.config_records or METRICS not in content.metric_records:
        raise InvalidInputError("the answer holds no result/metrics records")
    merged = {**dict(content.config_records[RESULT]), **dict(content.metric_records[METRICS])}
    values: dict[str, Any] = {}
    for f in fields(kind):
        if f.name not in merged:
            raise InvalidInputError(f"the answer lacks {f.name!r}")
        value = merged[f.name]
        expected = {"int": int, "float": float, "str": str}.get(str(f.type), f.type)
        if (
            expected in (int, float)
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            value = expected(value)
        if not isinstance(value, expected):  # type: ignore[arg-type]
            raise InvalidInputError(f"the answer's {f.name!r} is not {expected}")
        values[f.name] = value
    return kind(**values)


# --- the campaign report (the ServerApp's output) ------------------------------------------


@dataclass(frozen=True)
class NodeOutcome:
    """How one SuperNode's part ended: ``ok`` with an answer, or why not."""

    node_id: int
    node_name: str  # the name it was registered with (flwr supernode register --name)
    status: str  # OK, FAILED, UNAVAILABLE or TIMED_OUT
    detail: str = ""
    answer: TrainingAnswer | EvaluationAnswer | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node_id": self.node_id,
            "node_name": self.node_name,
            "status": self.status,
            "detail": self.detail,
        }
        if self.answer is not None:
            out["answer"] = asdict(self.answer)
            if isinstance(self.answer, EvaluationAnswer):
                out["answer"]["gain"] = self.answer.gain
        return out


@dataclass(frozen=True)
class CampaignReport:
    """What a campaign did on every node it addressed."""

    campaign: str
    run_id: int
    outcomes: list[NodeOutcome] = field(default_factory=list)

    @property
    def succeeded(self) -> list[NodeOutcome]:
        return [o for o in self.outcomes if o.status == OK]

    @property
    def failed(self) -> list[NodeOutcome]:
        return [o for o in self.outcomes if o.status != OK]

    def to_json(self) -> str:
        return json.dumps(
            {
                "campaign": self.campaign,
                "run_id": self.run_id,
                "succeeded": len(self.succeeded),
                "failed": len(self.failed),
                "nodes": [o.to_json() for o in self.outcomes],
            },
            indent=2,
        )

    def lines(self) -> list[str]:
        """The human-readable report: one line per node, then a summary line."""
        out = []
        for o in sorted(self.outcomes, key=lambda o: (o.status != OK, o.node_name, o.node_id)):
            who = f"node {o.node_id}" + (f" ({o.node_name})" if o.node_name else "")
            a = o.answer
            if isinstance(a, TrainingAnswer):
                out.append(
                    f"{a.org}: {who} accepted {a.expert_id}, log entry {a.log_index}; "
                    f"{a.steps} steps, {a.tokens:,} tokens, held-out loss public "
                    f"{a.val_loss_public:.4f} -> expert {a.val_loss_expert:.4f}"
                )
            elif isinstance(a, EvaluationAnswer):
                out.append(
                    f"{a.org}: {who} model v{a.model_version} loss {a.loss_model:.4f} vs public "
                    f"{a.loss_public:.4f}: gain {a.gain:+.4f} ({a.documents} held-out documents)"
                )
            else:
                out.append(f"{who}: {o.status}: {o.detail}")
        out.append(
            f"{self.campaign} campaign (run {self.run_id}): {len(self.succeeded)} of "
            f"{len(self.outcomes)} nodes succeeded"
            + (f", {len(self.failed)} reported above" if self.failed else "")
        )
        return out
