"""Shared fixtures: tiny anchors of both families and expert bundles, all built in code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from flexfed.common.anchor import Anchor
from flexfed.common.bundle import ExpertMeta, write_bundle
from flexfed.common.tiny import build_anchor
from flexfed.common.training_model import build_training_model, extract_expert

FAMILIES = ["olmo2", "llama"]


@pytest.fixture(scope="session", params=FAMILIES)
def anchor(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Anchor:
    """A tiny random anchor of each supported family."""
    return build_anchor(
        request.param, tmp_path_factory.mktemp(f"anchor-{request.param}") / "anchor"
    )


def make_meta(anchor: Anchor, org: str, name: str = "expert") -> ExpertMeta:
    return ExpertMeta(
        org=org,
        name=name,
        family=anchor.family.dense_model_type,
        anchor_digest=anchor.digest,
        shapes=anchor.shapes,
        data_commitment="0" * 64,
        training={"steps": 0},
        license="test",
    )


def make_expert_bundle(
    anchor: Anchor, out: Path, org: str, seed: int | None, name: str = "expert"
) -> Path:
    """An expert bundle. seed=None: the identity expert (public FFN, r_i = r_pub).

    Otherwise the trainable tensors are perturbed with seeded noise, standing in for training.
    """
    model = build_training_model(anchor)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return write_bundle(out, extract_expert(model), make_meta(anchor, org, name), anchor)


@pytest.fixture
def expert_factory(anchor: Anchor, tmp_path: Path) -> Callable[..., Path]:
    def make(org: str, seed: int | None = 1, name: str = "expert") -> Path:
        return make_expert_bundle(anchor, tmp_path / "experts" / f"{org}-{name}", org, seed, name)

    return make


@pytest.fixture
def meta_for(anchor: Anchor) -> Callable[..., ExpertMeta]:
    def make(org: str, name: str = "expert") -> ExpertMeta:
        return make_meta(anchor, org, name)

    return make
