"""The data owner's Flower ClientApp: train and submit an expert, or evaluate a release.

Runs on the owner's SuperNode. The plan from the ServerApp says *what* (anchor digest,
Consortium API address, hyperparameters); the node config says *with what* (data path,
credentials, work directory; see :mod:`flexfed.client.flower_node`), and never leaves.

- ``@app.train()``: fetch the anchor if this node does not hold it yet, check it is the
  planned one, train an expert on the local data, sign it, upload and submit it through the
  Consortium API (verified and logged there), and answer with digests, the log index and
  training metrics.
- ``@app.evaluate()``: fetch the released model version, evaluate it and the public model on
  the node's own held-out documents (the trainer's split, never trained on), and answer with
  losses only.

A flexfed error becomes an error reply with its one-line message (the ServerApp reports it);
anything else is left to Flower, which answers with the traceback's last line.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from flexfed.client.flower_node import NodeSettings
from flexfed.common.errors import ConfigError, FlexfedError, VerificationError
from flexfed.common.flower.campaign import (
    EvaluationAnswer,
    TrainingAnswer,
    answer_to_record,
    plan_value,
    read_plan,
)

if TYPE_CHECKING:  # imported when used: the ClientApp loads fast
    from flexfed.common.api.consortium import ConsortiumClient
    from flexfed.common.formats.anchor import Anchor

log = logging.getLogger(__name__)

app = ClientApp()

# Error codes of flexfed's error replies (Flower's own codes are below 100).
FLEXFED_ERROR = 100


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train, sign, upload and submit an expert as the plan says."""
    return _answer(msg, lambda: _train(msg, context))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate a released model on this owner's held-out data; answer with metrics only."""
    return _answer(msg, lambda: _evaluate(msg, context))


def _answer(msg: Message, work: Any) -> Message:
    try:
        answer = work()
    except FlexfedError as err:
        log.error("campaign step failed: %s", err)
        return Message(
            Error(code=FLEXFED_ERROR, reason=f"{type(err).__name__}: {err}"), reply_to=msg
        )
    return Message(answer_to_record(answer), reply_to=msg)


def _settings(context: Context) -> NodeSettings:
    return NodeSettings.from_node_config(context.node_config)


def _run_dir(settings: NodeSettings, msg: Message, plan: dict[str, Any]) -> Path:
    """This run's directory; ``plan.json`` records what this node was asked to do."""
    campaign: str = plan_value(plan, "campaign", str)
    run: Path = settings.work_dir / "runs" / f"{campaign}-{msg.metadata.run_id}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n")
    return run


def _client(settings: NodeSettings, plan: dict[str, Any]) -> ConsortiumClient:
    from flexfed.common.api.consortium import Connection, ConsortiumClient

    address = settings.coordinator_for(plan_value(plan, "consortium-address", str))
    return ConsortiumClient(Connection(address, settings.ca, settings.cert, settings.key))


def _anchor(client: ConsortiumClient, settings: NodeSettings, digest: str = "") -> Anchor:
    """The coordinator's anchor, downloaded once per digest into the work directory."""
    published = client.anchor_info().digest
    settings.approve_anchor(published)  # the owner's consent, before anything is fetched
    if digest and published != digest:
        raise VerificationError(
            f"the plan is for anchor {digest}, but the coordinator publishes {published}"
        )
    out = settings.work_dir / "anchors" / published.replace(":", "-")
    anchor: Anchor = client.fetch_anchor(out, progress=False)
    settings.approve_anchor(anchor.digest)  # computed here, not announced by the coordinator
    return anchor


def _train(msg: Message, context: Context) -> TrainingAnswer:
    from flexfed.client.sign import sign_bundle
    from flexfed.client.trainer import train_expert
    from flexfed.common.formats.bundle import read_expert_meta
    from flexfed.common.moe.config import TrainConfig
    from flexfed.common.trust.signing import BundleSigner

    settings = _settings(context)
    plan = read_plan(msg.content)
    run = _run_dir(settings, msg, plan)
    signer = BundleSigner(settings.key, settings.cert, [settings.ca])
    org = signer.check_certificate().org  # refuse a bad certificate before training
    cfg = TrainConfig(
        seq_len=plan_value(plan, "seq-len", int),
        batch_size=plan_value(plan, "batch-size", int),
        micro_batch_size=plan_value(plan, "batch-size", int),
        max_steps=plan_value(plan, "max-steps", int),
        lr=plan_value(plan, "lr", float),
        seed=plan_value(plan, "seed", int),
        val_fraction=plan_value(plan, "val-fraction", float),
        device=settings.device,
    )
    settings.check_plan(cfg.max_steps, cfg.seq_len, cfg.batch_size)
    with _client(settings, plan) as client:
        anchor = _anchor(client, settings, plan_value(plan, "anchor-digest", str))
        log.info("training %s's expert on %s", org, settings.data_path)
        result = train_expert(
            anchor.path, [settings.data_path], org, run / "expert", cfg, progress=False
        )
        signed = sign_bundle(result.out, settings.key, settings.cert, [settings.ca])
        submission = client.submit(result.out, progress=False)
    meta = read_expert_meta(result.out / "expert.json")
    return TrainingAnswer(
        org=org,
        expert_id=submission.expert.expert_id,
        weights_sha256=signed.weights_sha256,
        anchor_digest=anchor.digest,
        data_commitment=meta.data_commitment,
        log_index=submission.log_index,
        steps=result.steps,
        tokens=result.tokens,
        seconds=result.seconds,
        final_loss=result.final_loss,
        val_loss_public=result.val_loss_public,
        val_loss_expert=result.val_loss_expert,
    )


def _evaluate(msg: Message, context: Context) -> EvaluationAnswer:
    from flexfed.common.data.documents import find_data_files, read_documents
    from flexfed.common.moe.evaluation import evaluate_model, held_out
    from flexfed.common.trust.pki import identity_of, load_certificate

    settings = _settings(context)
    plan = read_plan(msg.content)
    _run_dir(settings, msg, plan)
    org = identity_of(load_certificate(settings.cert)).org
    docs = held_out(
        list(read_documents(find_data_files([settings.data_path]))),
        plan_value(plan, "val-fraction", float),
    )
    if not docs:
        raise ConfigError(
            f"{settings.data_path} has no held-out documents at val-fraction "
            f"{plan_value(plan, 'val-fraction', float)}; nothing private to evaluate on"
        )
    seq_len = plan_value(plan, "seq-len", int)
    max_sequences = plan_value(plan, "max-sequences", int)
    with _client(settings, plan) as client:
        anchor = _anchor(client, settings)
        version = plan_value(plan, "model-version", int)
        if version == 0:
            releases = client.releases()
            if not releases:
                raise ConfigError("the coordinator has released no model yet")
            version = max(r.version for r in releases)
        model = settings.work_dir / "models" / f"v{version}"
        if not (model / "config.json").is_file():
            shutil.rmtree(model, ignore_errors=True)
            client.fetch_model(model, version=version, progress=False)
    start = time.monotonic()
    domain = {org: docs}
    public = evaluate_model(anchor.path, domain, seq_len, max_sequences, progress=False)[org]
    released = evaluate_model(model, domain, seq_len, max_sequences, progress=False)[org]
    log.info("evaluated v%d on %d documents in %.1fs", version, len(docs), time.monotonic() - start)
    return EvaluationAnswer(
        org=org,
        model_version=version,
        loss_public=public["loss"],
        loss_model=released["loss"],
        ppl_public=public["ppl"],
        ppl_model=released["ppl"],
        tokens=int(released["tokens"]),
        documents=len(docs),
    )
