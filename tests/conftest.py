"""Shared fixtures: tiny anchors of both families and expert bundles, all built in code; a
consortium PKI and real gRPC servers with mutual TLS on 127.0.0.1 (integration tests).

NOTE: the only conftest.py: test modules import helpers from it (``from conftest import ...``),
which would resolve to whichever conftest pytest imported last if there were several.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
from consortium import Consortium, Member, Pki

from flexfed.common.api.tls import CHANNEL_OPTIONS, server_credentials
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.bundle import ExpertMeta, write_bundle
from flexfed.common.moe.training_model import build_training_model, extract_expert
from flexfed.common.public.tiny import build_anchor
from flexfed.common.trust.ca import issue_certificate
from flexfed.common.trust.keys import generate_key_and_csr

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

    Otherwise the trainable tensors are perturbed with seeded noise (std 0.01, about half the
    anchor weights' std: what training moves them by, within the plausibility gates),
    standing in for training.
    """
    model = build_training_model(anchor)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return write_bundle(out, extract_expert(model), make_meta(anchor, org, name), anchor)


def build_small_anchor(family: str, tmp_path_factory: pytest.TempPathFactory) -> Anchor:
    """A small anchor (hidden 16, 2 layers) for tests about services, not about the model."""
    return build_anchor(
        family,
        tmp_path_factory.mktemp(f"small-anchor-{family}") / "anchor",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
    )


@pytest.fixture(scope="module")
def small_anchor(tmp_path_factory: pytest.TempPathFactory) -> Anchor:
    """One small olmo2 anchor per module (a module may override it with another family)."""
    return build_small_anchor("olmo2", tmp_path_factory)


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


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Consortium:
    pki = Pki(tmp_path_factory.mktemp("consortium"))
    out = pki.root / "members" / "server"
    req = generate_key_and_csr("consortium", out, "operator")
    cert = issue_certificate(
        pki.ca_dir,
        req.csr,
        "operator",
        out=out / "cert.pem",
        san_dns=["localhost"],
        san_ip=["127.0.0.1"],
    )
    server = Member("consortium", "operator", req.key, cert.path)
    return Consortium(
        pki=pki,
        server=server,
        operator=pki.member("consortium", "operator", name="operator"),
        acme=pki.member("acme"),
        globex=pki.member("globex"),
        auditor=pki.member("audit-co", "auditor"),
    )


Adder = Callable[[grpc.Server], None]


@pytest.fixture
def serve(consortium: Consortium) -> Iterator[Callable[..., str]]:
    """Start a real gRPC server on 127.0.0.1 with mTLS; returns its ``host:port``.

    ``serve(add1, add2, ...)``: each ``add`` registers a servicer, e.g.
    ``lambda s: artifact_pb2_grpc.add_ArtifactServiceServicer_to_server(servicer, s)``.
    """
    servers: list[grpc.Server] = []

    def start(*adders: Adder, workers: int = 8) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(workers), options=CHANNEL_OPTIONS)
        for add in adders:
            add(server)
        creds = server_credentials(
            consortium.server.cert, consortium.server.key, consortium.pki.ca_pem
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None)
