"""Plausibility gates: an expert's values must be the kind training from the anchor produces.

A valid, signed bundle may still hold values no training run yields, chosen to break the
merged model: a ``down_proj`` of 3e38 everywhere made every logit constant, and router rows
of norm 1000 took all of the routing on unrelated text. Both passed every check that only
asked for finite values. Each expert starts as a copy of the anchor's FFN with router rows
near the anchor's r_pub, and is trained at a small learning rate, so its statistics stay
near the anchor's; the gates bound them relative to the anchor, each with its own reason:

- ``weights-implausible``: a projection's RMS above :data:`WEIGHT_RMS_RATIO` times the
  anchor's same projection's, or its largest magnitude above :data:`WEIGHT_MAX_RATIO` times;
- ``router-implausible``: a router row's norm above :data:`ROUTER_NORM_RATIO` times the
  router rows' starting norm (the anchor's recorded ``embedder.norm``, or r_pub's norm; the
  larger row takes the routing), or a router bias above :data:`ROUTER_BIAS_MAX`;
- ``activations-implausible``: on a fixed probe (the anchor's embeddings of
  :data:`PROBE_TOKENS` evenly spaced tokens), the expert FFN's mean output norm above
  :data:`ACTIVATION_RATIO` times the anchor FFN's in some layer.

Only upper bounds: an expert that is too weak (small weights, a short router row) harms
nobody but its owner. The thresholds leave a wide margin over what honest training gives
(docs/operator-guide.md has the measured figures); they bound damage, not quality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexfed.common.errors import BundleError
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.bundle import ExpertBundle
from flexfed.common.formats.families import PROJECTIONS
from flexfed.common.formats.safetensors_io import read_tensor

WEIGHT_RMS_RATIO = 4.0
WEIGHT_MAX_RATIO = 32.0
ROUTER_NORM_RATIO = 8.0
ROUTER_BIAS_MAX = 1.0
ACTIVATION_RATIO = 8.0
PROBE_TOKENS = 256


class ImplausibleExpertError(BundleError):
    """An expert's values are outside what training from the anchor produces."""

    code = "weights-implausible"


class ImplausibleRouterError(ImplausibleExpertError):
    code = "router-implausible"


class ImplausibleActivationsError(ImplausibleExpertError):
    code = "activations-implausible"


@dataclass(frozen=True)
class LayerStats:
    """One layer of an expert against the anchor: each ratio is expert / anchor."""

    layer: int
    rms_ratio: dict[str, float]  # per projection
    max_ratio: dict[str, float]
    router_norm_ratio: float  # against the rows' starting norm
    router_bias: float
    activation_ratio: float


def _ffn(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def _probe(anchor: Anchor) -> torch.Tensor:
    embed = anchor.checkpoint.info("model.embed_tokens.weight")
    table = read_tensor(embed).float()
    ids = torch.linspace(0, table.shape[0] - 1, min(PROBE_TOKENS, table.shape[0])).long()
    return table[ids]


def expert_stats(bundle: ExpertBundle, anchor: Anchor) -> list[LayerStats]:
    """Every layer's ratios (one layer's tensors in memory at a time)."""
    probe = _probe(anchor)
    recorded = (anchor.meta.get("embedder") or {}).get("norm")
    start_norm = float(recorded) if isinstance(recorded, int | float) and recorded > 0 else 0.0
    out = []
    for layer in range(anchor.shapes.num_layers):
        mine = {p: read_tensor(bundle.info(layer, f"{p}.weight")).float() for p in PROJECTIONS}
        public = {
            p: read_tensor(anchor.checkpoint.info(anchor.family.dense_ffn_key(layer, p))).float()
            for p in PROJECTIONS
        }
        rms = {p: _rms(mine[p]) / max(_rms(public[p]), 1e-30) for p in PROJECTIONS}
        peak = {
            p: float(mine[p].abs().max()) / max(float(public[p].abs().max()), 1e-30)
            for p in PROJECTIONS
        }
        row = read_tensor(bundle.info(layer, "router.weight")).double()
        bias = float(read_tensor(bundle.info(layer, "router.bias")).double().max())
        pub_norm = max(float(anchor.r_pub(layer).double().norm()), start_norm)
        with torch.no_grad():
            y_mine = _ffn(probe, mine["gate_proj"], mine["up_proj"], mine["down_proj"])
            y_pub = _ffn(probe, public["gate_proj"], public["up_proj"], public["down_proj"])
        act = float(y_mine.double().norm(dim=-1).mean()) / max(
            float(y_pub.double().norm(dim=-1).mean()), 1e-30
        )
        out.append(
            LayerStats(layer, rms, peak, float(row.norm()) / max(pub_norm, 1e-30), bias, act)
        )
    return out


def check_plausible(bundle: ExpertBundle, anchor: Anchor) -> list[LayerStats]:
    """Raise the first gate an expert fails (see the module's doc); return its statistics."""
    stats = expert_stats(bundle, anchor)
    for s in stats:
        for p in PROJECTIONS:
            if not s.rms_ratio[p] <= WEIGHT_RMS_RATIO or not s.max_ratio[p] <= WEIGHT_MAX_RATIO:
                raise ImplausibleExpertError(
                    f"layer {s.layer} {p}: RMS {s.rms_ratio[p]:.3g}x and largest value "
                    f"{s.max_ratio[p]:.3g}x the anchor's (the most: {WEIGHT_RMS_RATIO:g}x and "
                    f"{WEIGHT_MAX_RATIO:g}x); training from the anchor does not produce these"
                )
        if not s.router_norm_ratio <= ROUTER_NORM_RATIO or not s.router_bias <= ROUTER_BIAS_MAX:
            raise ImplausibleRouterError(
                f"layer {s.layer} router: row norm {s.router_norm_ratio:.3g}x r_pub's and bias "
                f"{s.router_bias:.3g} (the most: {ROUTER_NORM_RATIO:g}x and "
                f"{ROUTER_BIAS_MAX:g}); such a row would take the routing from every expert"
            )
    for s in stats:
        if not s.activation_ratio <= ACTIVATION_RATIO:
            raise ImplausibleActivationsError(
                f"layer {s.layer}: on the probe the expert's FFN output is "
                f"{s.activation_ratio:.3g}x the anchor's (the most: {ACTIVATION_RATIO:g}x)"
            )
    return stats
