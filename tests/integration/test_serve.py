"""``flexfed serve`` as a real process on 127.0.0.1, spoken to by the ``openai`` client.

Protects: the OpenAI-compatible endpoint answers completions (plain and streamed) whose text is
exactly the opted-out model's greedy continuation when the request excludes an expert; every
answer names the experts that served it; the server's own ``--exclude`` cannot be undone by a
request; bad requests get 400/404 with a message and the server keeps serving.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexfed.common.formats.anchor import Anchor
from flexfed.common.moe.assembly import assemble
from flexfed.common.moe.optout import optout

pytestmark = pytest.mark.integration

FLEXFED = Path(sys.executable).parent / "flexfed"
PROMPT = "The quick brown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moe(small_anchor: Anchor, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_expert_bundle

    root = tmp_path_factory.mktemp("serve")
    experts = [
        make_expert_bundle(small_anchor, root / org, org, seed)
        for seed, org in enumerate(["acme", "globex"], start=1)
    ]
    assemble(small_anchor, experts, root / "moe", top_k=2)
    optout(root / "moe", ["globex"], root / "no-globex")
    return root / "moe"


def greedy(model_dir: Path, max_tokens: int) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=257)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def start(model_dir: Path, *extra: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [str(FLEXFED), "serve", str(model_dir), "--port", str(port), "--device", "cpu", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    assert json.load(r) == {"status": "ok", "model": "flexfed"}
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    raise AssertionError(f"flexfed serve did not come up:\n{out}") from None
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(moe: Path) -> Iterator[str]:
    yield from start(moe)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_completion_excluding_an_expert_is_the_opted_out_models(server: str, moe: Path) -> None:
    api = client(server)
    got = api.completions.create(
        model="flexfed",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"flexfed": {"exclude_orgs": ["globex"]}},
    )
    assert got.choices[0].text == greedy(moe.parent / "no-globex", 8)
    assert got.choices[0].finish_reason == "length"
    assert got.usage is not None and got.usage.completion_tokens == 8
    assert got.model_extra is not None
    assert got.model_extra["flexfed"] == {"experts": ["public", "acme/expert"]}

    full = api.completions.create(model="flexfed", prompt=PROMPT, max_tokens=8, temperature=0)
    assert full.choices[0].text == greedy(moe, 8)
    assert full.model_extra is not None
    assert full.model_extra["flexfed"] == {"experts": ["public", "acme/expert", "globex/expert"]}


def test_streaming_gives_the_same_text(server: str, moe: Path) -> None:
    stream = client(server).completions.create(
        model="flexfed",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"flexfed": {"include_orgs": ["acme"]}},
    )
    chunks = list(stream)
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == greedy(moe.parent / "no-globex", 8)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_and_experts_are_listed(server: str) -> None:
    assert [m.id for m in client(server).models.list()] == ["flexfed"]
    with urllib.request.urlopen(f"{server}/v1/experts", timeout=10) as r:
        experts = json.load(r)["experts"]
    assert [(e["slot"], e["org"], e["license"], e["served_by_default"]) for e in experts] == [
        (0, None, None, True),
        (1, "acme", "test", True),
        (2, "globex", "test", True),
    ]


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server: str) -> None:
    api = client(server)
    with pytest.raises(openai.BadRequestError, match="no expert of umbrella"):
        api.completions.create(
            model="flexfed",
            prompt=PROMPT,
            max_tokens=2,
            extra_body={"flexfed": {"exclude_orgs": ["umbrella"]}},
        )
    with pytest.raises(openai.BadRequestError, match=r"max_tokens must be in 1\.\.4096"):
        api.completions.create(model="flexfed", prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        api.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    request = urllib.request.Request(
        f"{server}/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    assert json.load(err.value)["error"]["message"] == "the request body is not JSON"
    ok = api.completions.create(model="flexfed", prompt=PROMPT, max_tokens=2, temperature=0)
    assert ok.usage is not None and ok.usage.completion_tokens == 2


def test_the_servers_exclusion_cannot_be_undone_by_a_request(moe: Path) -> None:
    for base in start(moe, "--exclude", "globex"):
        got = client(base).completions.create(
            model="flexfed",
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            extra_body={"flexfed": {"include_orgs": ["globex", "acme"]}},
        )
        assert got.model_extra is not None
        assert got.model_extra["flexfed"] == {"experts": ["public", "acme/expert"]}
        assert got.choices[0].text == greedy(moe.parent / "no-globex", 6)
