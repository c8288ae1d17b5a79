"""The coordinator's Flower ServerApp: training and federated-evaluation campaigns.

Flower is the control plane: this ServerApp runs inside the SuperLink's deployment runtime
(``flwr run deploy/flower-app <connection> -c campaign="train" ...``), sends each connected
SuperNode the campaign's plan and collects the answers. The heavy lifting happens on the
owners' nodes and through the Consortium API (the data plane): experts are uploaded, verified
and logged there; this app only sees digests, log indices and metrics.

A node that fails, goes offline or answers too late is reported, never fatal: the campaign
completes for the others. The run fails only if no node succeeded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from flexfed.common.errors import FlexfedError
from flexfed.common.flower.campaign import (
    FAILED,
    MESSAGE_TYPES,
    OK,
    TIMED_OUT,
    UNAVAILABLE,
    CampaignConfig,
    CampaignReport,
    EvaluationAnswer,
    NodeOutcome,
    TrainingAnswer,
    answer_from_record,
)

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the campaign the run config names; print (and optionally write) the report."""
    cfg = CampaignConfig.from_run_config(context.run_config)
    report = run_campaign(grid, cfg, run_id=context.run_id)
    for line in report.lines():
        print(line, flush=True)  # NOTE: the ServerApp's stdout is what `flwr log` streams
    if cfg.report:
        Path(cfg.report).write_text(report.to_json() + "\n")
    if not report.succeeded:
        raise RuntimeError(f"{cfg.campaign} campaign: no node succeeded")


def wait_for_nodes(grid: Grid, min_nodes: int, wait: float, poll: float = 1.0) -> list[int]:
    """The connected nodes, once at least ``min_nodes`` are (or ``wait`` seconds passed)."""
    deadline = time.monotonic() + wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes or time.monotonic() >= deadline:
            return nodes
        time.sleep(poll)


def node_names(grid: Grid) -> dict[int, str]:
    """node id -> the name it was registered with (empty where the Grid does not know)."""
    try:
        return {int(n.node_id): str(getattr(n, "name", "") or "") for n in grid.get_nodes()}
    except Exception:  # names are decoration; never fail a campaign for them
        log.debug("cannot list node names", exc_info=True)
        return {}


def run_campaign(
    grid: Grid, cfg: CampaignConfig, run_id: int = 0, poll: float = 3.0
) -> CampaignReport:
    """Send the plan to every connected node and classify what came back."""
    nodes = wait_for_nodes(grid, cfg.min_nodes, cfg.node_wait)
    if len(nodes) < cfg.min_nodes:
        log.warning("only %d of the %d requested nodes connected", len(nodes), cfg.min_nodes)
    names = node_names(grid)
    messages = [
        Message(
            cfg.plan(),  # NOTE: a fresh RecordDict per message; Flower tracks content objects
            dst_node_id=node,
            message_type=MESSAGE_TYPES[cfg.campaign],
            # NOTE: the TTL bounds how long the SuperLink keeps the instruction and its reply.
            ttl=cfg.reply_timeout + 60.0,
        )
        for node in nodes
    ]
    ids = list(grid.push_messages(messages)) if messages else []
    log.info("%s campaign: plan sent to %d nodes", cfg.campaign, len(messages))
    replies = collect(grid, dict(zip(ids, nodes, strict=True)), cfg.reply_timeout, poll, names)
    kind = TrainingAnswer if cfg.campaign == "train" else EvaluationAnswer
    return CampaignReport(cfg.campaign, run_id, classify(nodes, replies, kind, names))


def collect(
    grid: Grid,
    pending: dict[str | None, int],
    timeout: float,
    poll: float = 3.0,
    names: dict[int, str] | None = None,
) -> dict[int, Message | None]:
    """Pull replies until every node answered or ``timeout`` passed: node -> reply.

    Replies are matched to nodes by the instruction they answer, not by their sender: the
    SuperLink answers for a node that went offline (NODE_UNAVAILABLE) in its own name. A
    message the SuperLink did not accept (id None) maps to None.
    """
    names = names or {}
    replies: dict[int, Message | None] = {n: None for i, n in pending.items() if i is None}
    waiting = {i: n for i, n in pending.items() if i is not None}
    deadline = time.monotonic() + timeout
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            node = waiting.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                replies[node] = reply
                what = "an error" if reply.has_error() else "its answer"
                log.info("node %d (%s) sent %s", node, names.get(node, "?"), what)
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies


def classify(
    nodes: Iterable[int],
    replies: dict[int, Message | None],
    kind: type[TrainingAnswer] | type[EvaluationAnswer],
    names: dict[int, str] | None = None,
) -> list[NodeOutcome]:
    """One outcome per addressed node: its answer, its error, or that it never answered."""
    names = names or {}
    outcomes = []
    for node in nodes:
        name = names.get(node, "")
        if node not in replies:
            outcomes.append(NodeOutcome(node, name, TIMED_OUT, "no answer before reply-timeout"))
            continue
        reply = replies[node]
        if reply is None:
            outcomes.append(NodeOutcome(node, name, FAILED, "the SuperLink refused the message"))
        elif reply.has_error():
            status = UNAVAILABLE if reply.error.code == ErrorCode.NODE_UNAVAILABLE else FAILED
            reason = (reply.error.reason or f"error code {reply.error.code}").strip()
            outcomes.append(NodeOutcome(node, name, status, reason.splitlines()[-1]))
        else:
            try:
                answer = answer_from_record(kind, reply.content)
            except FlexfedError as err:
                outcomes.append(NodeOutcome(node, name, FAILED, f"malformed answer: {err}"))
            else:
                outcomes.append(NodeOutcome(node, name, OK, answer=answer))
    return outcomes
