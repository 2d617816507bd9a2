"""The migration journal on SQLite and on a real PostgreSQL server: schema and its version, one
migration per volume enforced by the database under concurrent attempts, claims released at the end,
steps in order, clear errors for an unreachable or foreign journal."""

from __future__ import annotations

import multiprocessing
import uuid

import pytest
from sqlalchemy import inspect, text

from volcopy.migration import Journal, JournalError, Migration, VolumeBusy
from volcopy.migration import journal as j


def row(src_key: str, dst_key: str) -> Migration:
    return Migration(
        id=str(uuid.uuid4()),
        state=j.PENDING,
        src_key=src_key,
        dst_key=dst_key,
        src={"path": src_key},
        dst={"path": dst_key},
        attachments=[],
        options={},
        owner="test:1:1",
    )


def test_schema_is_created_with_its_version(journal_url):
    journal = Journal(journal_url)
    tables = set(inspect(journal.engine).get_table_names())
    assert {"volcopy_schema", "volcopy_migrations", "volcopy_steps", "volcopy_volume_claims"} <= tables
    Journal(journal_url)  # opening an existing journal changes nothing
    with journal.engine.connect() as c:
        assert c.execute(text("SELECT version FROM volcopy_schema")).scalars().all() == [j.SCHEMA_VERSION]


@pytest.mark.parametrize("spelling", ["{}", "file:{}?uri=true"])
def test_a_new_sqlite_journal_is_its_owners_alone(tmp_path, spelling):
    """It keeps what reaches the volumes (CHAP passwords, Ceph keys): mode 0600, its WAL too."""
    journal = Journal("sqlite:///" + spelling.format(tmp_path / "journal.sqlite"))
    journal.create(row("path:/dev/a", "path:/dev/b"))

    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"journal.sqlite": 0o600, "journal.sqlite-wal": 0o600, "journal.sqlite-shm": 0o600}


def test_a_journal_of_another_schema_version_is_refused(journal_url):
    journal = Journal(journal_url)
    with journal.engine.begin() as c:
        c.execute(text("UPDATE volcopy_schema SET version = 99"))
    with pytest.raises(JournalError, match=r"schema version \[99\]; this volcopy knows 1"):
        Journal(journal_url)


def _claim(url: str, barrier, results, index: int) -> None:
    journal = Journal(url)
    barrier.wait()
    try:
        journal.create(row("volume:shared-src", f"volume:dst-{index}"))
        results.put(("won", index))
    except VolumeBusy as exc:
        results.put(("busy", exc.migration_id))


def test_one_migration_per_volume_is_enforced_by_the_database(journal_url):
    """Eight processes try to migrate the same volume at the same moment: exactly one gets it."""
    Journal(journal_url)  # the schema first, so that the race is on the claim only
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(8), context.Queue()
    processes = [context.Process(target=_claim, args=(journal_url, barrier, results, i)) for i in range(8)]
    for p in processes:
        p.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for p in processes:
        p.join()
    won = [index for kind, index in outcomes if kind == "won"]
    assert len(won) == 1, outcomes
    winner = Journal(journal_url).claimant("volume:shared-src")
    assert all(holder == winner for kind, holder in outcomes if kind == "busy")


def test_dst_of_a_running_migration_cannot_be_another_ones_src(journal_url):
    journal = Journal(journal_url)
    first = journal.create(row("path:/a", "path:/b"))
    with pytest.raises(VolumeBusy, match=f"already in migration {first.id}"):
        journal.create(row("path:/b", "path:/c"))


def test_a_finished_migration_releases_its_volumes(journal_url):
    journal = Journal(journal_url)
    first = journal.create(row("path:/a", "path:/b"))
    journal.update(first.id, state=j.CANCELLED, reason="test")
    second = journal.create(row("path:/a", "path:/b"))
    assert journal.claimant("path:/a") == second.id
    ended = journal.get(first.id)
    assert ended.state == j.CANCELLED and ended.finished_at is not None
    assert [m.id for m in journal.list(unfinished_only=True)] == [second.id]


def test_steps_are_recorded_intended_then_ended_in_order(journal_url):
    journal = Journal(journal_url)
    m = journal.create(row("path:/a", "path:/b"))
    first = journal.step_intended(m.id, "start", "server/att")
    journal.step_ended(first, j.DONE)
    second = journal.step_intended(m.id, "copy")
    journal.step_ended(second, j.FAILED, "CopyIOError: gone")
    third = journal.step_intended(m.id, "cancel", "server/att")
    steps = journal.steps(m.id)
    assert [(s.id, s.name, s.status, s.detail) for s in steps] == [
        (first, "start", j.DONE, None),
        (second, "copy", j.FAILED, "CopyIOError: gone"),
        (third, "cancel", j.INTENDED, None),
    ]
    assert steps[0].ended_at is not None and steps[2].ended_at is None


def test_progress_and_a_cancel_request_go_through_the_journal(journal_url):
    journal = Journal(journal_url)
    m = journal.create(row("path:/a", "path:/b"))
    assert journal.report_progress(m.id, 1 << 20, 4 << 20, 5e8) is False
    journal.update(m.id, cancel_requested=True)
    assert journal.report_progress(m.id, 2 << 20, 4 << 20, 5e8) is True
    seen = Journal(journal_url).get(m.id)  # as another process sees it
    assert (seen.bytes_done, seen.bytes_total, seen.percent) == (2 << 20, 4 << 20, 50.0)


def test_an_unreachable_journal_is_one_clear_error(tmp_path):
    with pytest.raises(JournalError, match="unreachable: .*refused"):
        Journal("postgresql+psycopg://nobody@127.0.0.1:1/journal")
    with pytest.raises(JournalError, match="unreachable"):
        Journal(f"sqlite:///{tmp_path}/no/such/dir/journal.sqlite")
    with pytest.raises(JournalError, match="cannot use journal"):
        Journal("nosuchdb://x")


def test_only_one_process_takes_over_a_migration(journal_url):
    journal = Journal(journal_url)
    m = journal.create(row("path:/a", "path:/b"))
    assert journal.take_over(m.id, "test:1:1", "host:2:5") is True
    assert journal.take_over(m.id, "test:1:1", "host:3:7") is False, "a second recoverer saw the old owner"
    assert journal.get(m.id).owner == "host:2:5"


def test_a_volume_key_never_holds_the_secrets_of_its_connection_info():
    """The key of a volume without a volume_id is shown (migrations list, step targets): a hash of its
    connection_info, never its auth_password; the same volume gets the same key."""
    from volcopy.migration.volumes import VolumeRef

    info = {"driver_volume_type": "iscsi", "data": {"target_iqn": "iqn.x", "auth_password": "s3cret-pw"}}
    key = VolumeRef(connection_info=info).key

    assert "s3cret-pw" not in key and key.startswith("iscsi:")
    same = {"driver_volume_type": "iscsi", "data": {"auth_password": "s3cret-pw", "target_iqn": "iqn.x"}}
    assert VolumeRef(connection_info=same).key == key
    other = {"driver_volume_type": "iscsi", "data": {"target_iqn": "iqn.y", "auth_password": "s3cret-pw"}}
    assert VolumeRef(connection_info=other).key != key


def _open_journal_when_told(url: str, go, failures) -> None:
    go.wait()
    try:
        Journal(url)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        failures.put(repr(exc))


def test_many_processes_opening_a_new_sqlite_journal_at_once_all_open_it(tmp_path):
    """A fleet of movers starting together on a new SQLite journal: each creates the missing tables,
    SQLite one table per transaction, and a process that loses the race on one table tries again."""
    url = f"sqlite:///{tmp_path}/journal.sqlite"
    context = multiprocessing.get_context("fork")
    go, failures = context.Event(), context.Queue()
    processes = [context.Process(target=_open_journal_when_told, args=(url, go, failures)) for _ in range(6)]
    for process in processes:
        process.start()
    go.set()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0] * 6
    assert failures.empty(), failures.get()
