"""``flexfed coordinator fleet-proxy`` in front of a real TLS ``flower-superlink``.

Protects the deployment rule of docs/flower.md ("Exposing only the Fleet API"): Flower 1.42
serves the Fleet, Control and Runtime APIs on one HTTPS port, and the Control API is
unauthenticated, so data owners must reach only ``/v1/fleet/``. A registered SuperNode that
dials the proxy comes online; ``flwr`` Control API calls pointed at the proxy fail and never
reach the SuperLink (its access log); other paths, including encoded and dot-segment tricks,
get 403 without being forwarded.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from consortium import Consortium
from test_flower import FLEXFED, SCRIPTS, Processes, environment, free_port, run, wait_for

from flexfed.server.fleet_proxy import make_proxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Setup:
    root: Path
    consortium: Consortium
    superlink_log: Path
    superlink: str  # host:port (private)
    proxy: str  # host:port data owners dial
    proxy_log: Path
    operator_env: dict[str, str]  # connections "direct" (the SuperLink) and "proxied"
    processes: Processes


@pytest.fixture(scope="module")
def setup(consortium: Consortium, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("fleet-proxy")
    processes = Processes()
    server, ca = consortium.server, consortium.pki.ca_pem
    try:
        port = free_port()
        superlink_log = root / "superlink.log"
        processes.start(
            [SCRIPTS / "superlink.sh", root / "superlink", server.cert, server.key, ca,
             "127.0.0.1", str(port)],
            environment(root / "flwr-superlink"),
            superlink_log,
        )  # fmt: skip
        proxy_log = root / "proxy.log"
        with proxy_log.open("wb") as err:
            proxy = subprocess.Popen(
                [FLEXFED, "-v", "coordinator", "fleet-proxy", "--listen", "127.0.0.1:0",
                 "--superlink", f"127.0.0.1:{port}", "--cert", str(server.cert),
                 "--key", str(server.key), "--ca", str(ca), "--server-name", "localhost"],
                stdout=subprocess.PIPE,
                stderr=err,
                env=environment(root / "flwr-proxy"),
                start_new_session=True,
            )  # fmt: skip
        processes.started.append(proxy)
        assert proxy.stdout is not None
        match = re.search(rb"serving on (127\.0\.0\.1:\d+)", proxy.stdout.readline())
        assert match, proxy_log.read_text()
        address = match.group(1).decode()
        wait_for(
            lambda: b"Uvicorn running on https://" in superlink_log.read_bytes(), 60, "SuperLink"
        )

        operator_env = environment(root / "flwr-operator")
        run([SCRIPTS / "connection.sh", "direct", f"127.0.0.1:{port}", ca], operator_env)
        run([SCRIPTS / "connection.sh", "proxied", address, ca], operator_env)

        # the owner's node: key registered by the operator (directly), node dials the proxy
        home = root / "acme"
        home.mkdir()
        key = home / "node-key"
        run([SCRIPTS / "node-key.sh", key], environment(home / "flwr"))
        run([SCRIPTS / "register-node.sh", f"{key}.pub", "acme", "direct"], operator_env)
        member = consortium.acme
        processes.start(
            [SCRIPTS / "supernode.sh", address, ca, key, home, member.cert, member.key,
             home / "work", str(free_port())],
            {**environment(home / "flwr"), "FLEXFED_DEVICE": "cpu"},
            home / "supernode.log",
        )  # fmt: skip
        yield Setup(
            root,
            consortium,
            superlink_log,
            f"127.0.0.1:{port}",
            address,
            proxy_log,
            operator_env,
            processes,
        )
    finally:
        processes.stop_all()


def nodes(setup: Setup) -> list[dict[str, object]]:
    out = run(["flwr", "supernode", "ls", "direct", "--format", "json"], setup.operator_env)
    return list(json.loads(out)["nodes"])


def control_lines(setup: Setup) -> list[str]:
    """The SuperLink's access-log lines for Control API requests."""
    return [ln for ln in setup.superlink_log.read_text().splitlines() if "/v1/control/" in ln]


NOT_FLEET = ("/docs", "openapi", "/control/", "/runtime/", "?x=1", "DELETE ", "GET /v1/fleet")


def unexpected_lines(setup: Setup) -> int:
    """The SuperLink's access-log lines for anything but Fleet POSTs and /health."""
    lines = setup.superlink_log.read_text().splitlines()
    return sum(any(marker in ln for marker in NOT_FLEET) for ln in lines)


def request(
    setup: Setup, method: str, target: str, body: bytes | None = None, via: str = ""
) -> int:
    context = ssl.create_default_context(cafile=str(setup.consortium.pki.ca_pem))
    host, port = (via or setup.proxy).rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        conn.request(method, target, body=body, headers={"Content-Type": "application/protobuf"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_registered_node_comes_online_through_the_proxy(setup: Setup) -> None:
    def online() -> bool:
        return [n.get("status") for n in nodes(setup)] == ["online"]

    wait_for(online, 45, "the SuperNode to come online through the proxy")
    log = setup.proxy_log.read_text()
    assert "forwarded POST /v1/fleet/activate-node from 127.0.0.1: 200" in log, log
    assert "forwarded POST /v1/fleet/send-node-heartbeat from 127.0.0.1: 200" in log, log


def test_control_api_through_the_proxy_is_refused_and_never_forwarded(setup: Setup) -> None:
    env = setup.operator_env
    before = control_lines(setup)
    listed = subprocess.run(
        ["flwr", "supernode", "ls", "proxied", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    answer = json.loads(listed.stdout)  # NOTE: flwr exits 0 with --format json on errors
    assert answer["success"] is False and "403 Forbidden" in answer["error-message"], answer
    rogue = setup.root / "rogue-key"
    run([SCRIPTS / "node-key.sh", rogue], env)
    registered = subprocess.run(
        ["flwr", "supernode", "register", f"{rogue}.pub", "proxied", "--name", "mallory"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert registered.returncode != 0, registered.stdout
    assert "403" in registered.stdout + registered.stderr, registered
    time.sleep(0.5)
    assert control_lines(setup) == before  # the SuperLink never saw them
    log = setup.proxy_log.read_text()
    assert "refused POST '/v1/control/list-nodes'" in log, log
    assert "refused POST '/v1/control/register-node'" in log, log
    assert "mallory" not in json.dumps(nodes(setup))  # the rogue key is not registered


def test_only_fleet_paths_and_health_are_forwarded(setup: Setup) -> None:
    before = unexpected_lines(setup)
    refused = [
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/runtime/pull-task-message"),
        ("POST", "/v1/fleet/%2e%2e/control/start-run"),
        ("POST", "/v1/fleet/../control/start-run"),
        ("POST", "/v1/fleet/get-run?x=1"),
        ("POST", "//v1/control/start-run"),
        ("GET", "/v1/fleet/get-run"),
        ("DELETE", "/v1/fleet/get-run"),
        ("POST", "https://127.0.0.1/v1/control/start-run"),
    ]
    for method, target in refused:
        assert request(setup, method, target, b"x" if method == "POST" else None) == 403, target
    log = setup.proxy_log.read_text()
    assert log.count("fleet-proxy: refused ") >= len(refused)
    for method, target in refused:
        assert f"refused {method} {target!r}" in log or f"refused {method} '/" in log
    time.sleep(0.5)
    assert unexpected_lines(setup) == before  # none reached it

    assert request(setup, "GET", "/health") == 200
    # forwarded: the SuperLink answers (not the proxy's 403), here refusing an unsigned call
    status = request(setup, "POST", "/v1/fleet/get-run", b"")
    assert status != 403 and status >= 400
    assert "forwarded POST /v1/fleet/get-run" in setup.proxy_log.read_text()


@pytest.mark.parametrize("wrong", ["server-name", "address"])
def test_an_unverified_or_unreachable_superlink_gets_502(setup: Setup, wrong: str) -> None:
    server = setup.consortium.server
    proxy = make_proxy(
        "127.0.0.1:0",
        f"127.0.0.1:{free_port()}" if wrong == "address" else setup.superlink,
        server.cert,
        server.key,
        setup.consortium.pki.ca_pem,
        "superlink.example" if wrong == "server-name" else None,  # not in the cert's SANs
    )
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        assert request(setup, "GET", "/health", via=proxy.address) == 502
        assert request(setup, "POST", "/v1/control/list-nodes", b"", via=proxy.address) == 403
    finally:
        proxy.shutdown()
        proxy.server_close()
