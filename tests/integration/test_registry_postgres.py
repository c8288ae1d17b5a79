"""The registry on a real PostgreSQL server ("PostgreSQL by URL"), not only SQLite.

Protects: the registry's behaviour of tests/unit/server/test_registry.py (round trips, accepted
once, refusals change nothing, state changes, recovery, releases) holds on PostgreSQL through
psycopg 3; values PostgreSQL would refuse for length (a signer's long RFC 3339 time) are
stored; a duplicate insert racing from several threads stays idempotent (on SQLite too); a
database password never appears in an error; ``flexfed coordinator init --database
postgresql+psycopg://...`` makes a coordinator whose submissions pass ``check``.

A throwaway cluster (initdb + pg_ctl, as the ``postgres`` user when run as root) lives in a
temporary directory on a free port for the module; each test gets its own database. Without
PostgreSQL's binaries (apt install postgresql) or the driver (the ``postgres`` extra) the
PostgreSQL tests skip, saying why.
"""

from __future__ import annotations

import glob
import inspect
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from consortium import Member, Pki

# The unit tests of the registry, run again below against PostgreSQL.
from unit.server import test_registry as unit

from flexfed.common.cli import cli
from flexfed.common.errors import ConfigError
from flexfed.common.formats.anchor import Anchor
from flexfed.server.consistency import check
from flexfed.server.coordinator import Coordinator, init_coordinator
from flexfed.server.pipeline import SubmissionPipeline
from flexfed.server.registry import ExpertRecord, ExpertState, Registry, ReleaseRecord

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The unit tests' module-scoped fixtures, as they are (pytest finds them here by these names).
pki = unit.pki
server_member = unit.server_member
acme = unit.acme


# --- a throwaway PostgreSQL cluster --------------------------------------------------------


def _pg_bindir() -> Path | None:
    """The newest PostgreSQL's bin directory holding initdb and pg_ctl, if any."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")],
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if all(os.access(Path(candidate) / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    bindir: Path
    root: Path
    port: int
    as_user: list[str]  # the command prefix that runs a tool as the cluster's owner

    @property
    def data(self) -> Path:
        return self.root / "data"

    def run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            log = self.root / "server.log"
            raise RuntimeError(
                f"{tool} failed ({result.returncode}): {result.stderr}{result.stdout}"
                + (log.read_text(errors="replace") if log.is_file() else "")
            )

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[Cluster]:
    pytest.importorskip("psycopg", reason="no PostgreSQL driver (pip install -e '.[postgres]')")
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL initdb/pg_ctl under /usr/lib/postgresql/*/bin or on PATH")
    as_user: list[str] = []
    owner: str | None = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        runuser = shutil.which("runuser")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            runuser = None
        if runuser is None:
            pytest.skip("running as root without runuser or a 'postgres' user to own a cluster")
        as_user, owner = [runuser, "-u", "postgres", "--"], "postgres"
    root = Path(tempfile.mkdtemp(prefix="flexfed-pg-"))
    if owner:
        shutil.chown(root, owner, owner)
    cluster = Cluster(bindir, root, _free_port(), as_user)
    try:
        cluster.run(
            "initdb", "-D", str(cluster.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        options = (
            f"-p {cluster.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=100"
        )
        cluster.run(
            "pg_ctl", "-D", str(cluster.data), "-l", str(root / "server.log"), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield cluster
    finally:
        try:
            cluster.run("pg_ctl", "-D", str(cluster.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(root, ignore_errors=True)


_databases = itertools.count()


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> str:
    """A new, empty database in the module's cluster."""
    return pg_cluster.create_database(f"registry_{next(_databases)}")


@pytest.fixture
def coordinator(
    pg_url: str, tmp_path: Path, pki: Pki, server_member: Member, small_anchor: Anchor
) -> Iterator[Coordinator]:
    """The unit tests' coordinator, its registry on PostgreSQL."""
    config = init_coordinator(
        tmp_path / "coord",
        ca_cert=pki.ca_pem,
        crl=pki.crl_pem,
        tls_cert=server_member.cert,
        tls_key=server_member.key,
        anchor_dir=small_anchor.path,
        origin="test.example/log",
        database=pg_url,
    )
    with Coordinator(config) as c:
        assert c.registry.engine.dialect.name == "postgresql"
        yield c


# --- the registry itself -------------------------------------------------------------------

EXPERT = ExpertRecord(
    "sha256:" + "a" * 64, "acme", "code", ExpertState.ACCEPTED, 0, "b" * 64, "c" * 64,
    "d" * 64, "e" * 64, "acme (owner, serial 01)", "2025-01-01T00:00:00+00:00",
)  # fmt: skip


def test_registry_round_trips_experts_and_releases(pg_url: str) -> None:
    """tests/unit/server/test_registry.py's round trip (less SQLite's WAL pragma), on PostgreSQL."""
    registry = Registry(pg_url)
    try:
        assert registry.engine.dialect.name == "postgresql"
        assert registry.add_expert(EXPERT) == EXPERT
        assert registry.add_expert(EXPERT) == EXPERT  # idempotent
        assert registry.experts(org="acme") == [EXPERT]
        assert registry.experts(org="globex") == []
        moved = registry.set_state(EXPERT.expert_id, ExpertState.OPTED_OUT, 3, "2025-01-02")
        assert (moved.state, moved.state_log_index) == (ExpertState.OPTED_OUT, 3)
        assert registry.experts(state=ExpertState.ACCEPTED) == []
        release_v1 = ReleaseRecord(1, "sha256:" + "f" * 64, (EXPERT.expert_id,), 2, 4, "now")
        registry.add_release(release_v1)
        assert registry.releases() == [release_v1]
        assert registry.release_at(4) == release_v1
        assert registry.next_version() == 2
        with pytest.raises(ConfigError, match="clashes"):
            registry.add_release(release_v1)
        assert registry.releases() == [release_v1]  # the failed transaction left nothing
    finally:
        registry.close()
    reopened = Registry(pg_url)  # tables exist: opened again, not recreated
    try:
        assert reopened.require_expert(EXPERT.expert_id) == moved
    finally:
        reopened.close()


def test_what_a_signer_wrote_is_stored_whatever_its_length(pg_url: str) -> None:
    """A valid RFC 3339 time with nanoseconds (an owner's statement) fits its column."""
    registry = Registry(pg_url)
    try:
        long_signer = "o" * 64 + " (owner, serial " + "ab" * 20 + ")"
        record = replace(EXPERT, signer=long_signer)
        assert registry.add_expert(record) == record
        time = "2025-01-02T00:00:00.123456789123456789+00:00"  # datetime.fromisoformat: valid
        assert len(time) > 40
        assert registry.set_state(record.expert_id, ExpertState.OPTED_OUT, 1, time).state_time
        assert registry.require_expert(record.expert_id).state_time == time
        assert registry.require_expert(record.expert_id).signer == long_signer
    finally:
        registry.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/r.db"
    return str(request.getfixturevalue("pg_url"))


def test_registry_is_shared_safely_between_threads(any_url: str) -> None:
    """Several threads at once: the same expert races in, others add, change and read."""
    registry = Registry(any_url)
    workers = 8
    barrier = threading.Barrier(workers)
    results: dict[int, list[ExpertRecord]] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            own = replace(EXPERT, expert_id=f"sha256:{n:064x}", name=f"e{n}", log_index=100 + n)
            barrier.wait()
            same = registry.add_expert(EXPERT)  # everyone at once: one row, one answer
            registry.add_expert(own)
            registry.set_state(own.expert_id, ExpertState.OPTED_OUT, 200 + n, f"t{n}")
            registry.set_state(own.expert_id, ExpertState.ACCEPTED, 300 + n, f"u{n}")
            results[n] = [same, *registry.experts(org="acme")]
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert all(results[n][0] == EXPERT for n in range(workers))
        experts = registry.experts()
        assert len(experts) == workers + 1 and experts[0] == EXPERT
        assert [e.state_log_index for e in experts[1:]] == [300 + n for n in range(workers)]
        assert all(e.state is ExpertState.ACCEPTED for e in experts)
    finally:
        registry.close()


def test_a_database_password_never_appears_in_an_error() -> None:
    pytest.importorskip("psycopg", reason="no PostgreSQL driver (pip install -e '.[postgres]')")
    url = f"postgresql+psycopg://flexfed:s3cret-pw@127.0.0.1:{_free_port()}/registry"
    with pytest.raises(ConfigError, match="cannot open the registry database") as raised:
        Registry(url)
    assert "s3cret-pw" not in str(raised.value)
    assert "flexfed:***@127.0.0.1" in str(raised.value)


# --- the unit tests' submissions, refusals, recovery and releases, on PostgreSQL ------------

REUSED = [
    ("test_submission_is_accepted_once", {}),
    (
        "test_a_refusal_changes_nothing",
        {"case": "nan signed", "code": "not-finite", "reason": None},
    ),
    (
        "test_a_refusal_changes_nothing",
        {"case": "weights changed after signing", "code": "signature-invalid", "reason": None},
    ),
    ("test_not_uploaded_and_another_orgs_bundle_change_nothing", {}),
    ("test_a_second_expert_with_the_same_name_is_refused", {}),
    ("test_one_set_of_weights_is_one_expert_from_one_org", {}),
    ("test_releases_follow_the_current_crl", {}),
    ("test_recovery_restores_what_the_log_holds", {}),
    ("test_release_stores_a_signed_model_and_recovery_finishes_an_interrupted_one", {}),
]


@pytest.mark.parametrize(
    ("name", "given"), REUSED, ids=[n.removeprefix("test_") + str(g) for n, g in REUSED]
)
def test_unit_registry_behaviour(
    name: str, given: dict[str, str | None], request: pytest.FixtureRequest
) -> None:
    """The unit test ``name`` itself, with this module's PostgreSQL ``coordinator``."""
    test = getattr(unit, name)
    kwargs = {
        p: given[p] if p in given else request.getfixturevalue(p)
        for p in inspect.signature(test).parameters
    }
    test(**kwargs)


# --- end to end: the CLI -------------------------------------------------------------------


def test_cli_init_with_postgres_then_a_submission_passes_check(
    pg_url: str,
    pg_cluster: Cluster,
    tmp_path: Path,
    pki: Pki,
    server_member: Member,
    acme: Member,
    small_anchor: Anchor,
) -> None:
    root = tmp_path / "coordinator"
    result = CliRunner().invoke(
        cli,
        [
            "coordinator", "init", str(root),
            "--ca-cert", str(pki.ca_pem), "--crl", str(pki.crl_pem),
            "--tls-cert", str(server_member.cert), "--tls-key", str(server_member.key),
            "--anchor", str(small_anchor.path), "--origin", "pg.example/log",
            "--database", pg_url,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (root / "registry.db").exists()
    with Coordinator.open(root) as c:
        assert c.config.database_url == pg_url
        assert c.registry.engine.dialect.name == "postgresql"
        digest = unit.upload(c, unit.signed_bundle(small_anchor, tmp_path, acme, pki, seed=11))
        accepted = SubmissionPipeline(c).submit(digest, "acme")
        assert accepted.accepted and accepted.expert.expert_id == digest
        assert check(c) == []
    result = CliRunner().invoke(cli, ["coordinator", "check", str(root)])
    assert result.exit_code == 0, result.output

    import psycopg

    dsn = f"host=127.0.0.1 port={pg_cluster.port} user=postgres dbname={pg_url.rsplit('/', 1)[1]}"
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT org, state FROM experts WHERE expert_id = %s", (digest,))
        assert row.fetchall() == [("acme", "accepted")]
        anchor = conn.execute("SELECT digest FROM anchor WHERE id = 1").fetchone()
        assert anchor == (small_anchor.digest,)
