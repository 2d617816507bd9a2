"""The migration orchestrator on detached volumes (no compute call): files, loop devices and os-brick
connection_info; the FICLONE fast path on XFS and a driver's clone; cancel on failure; one migration
per volume; cancel and progress from another process; recover() after SIGKILL at each failure point;
bad input refused before anything is recorded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

import volcopy
from conftest import MiB, fill_garbage, needs_root, needs_root_for_loop, read_all, write_layout
from volcopy.errors import InvalidRequest
from volcopy.migration import Journal, MigrationCancelled, Migrator

VOLCOPY = [sys.executable, "-m", "volcopy.cli"]


def local(path) -> dict:
    return {"driver_volume_type": "local", "data": {"device_path": str(path)}}


def cli(*args, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        VOLCOPY + [str(a) for a in args], capture_output=True, text=True, timeout=120, env=env
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def source(workdir) -> tuple[str, bytes]:
    path = workdir / "src.img"
    content = write_layout(
        path, 48 * MiB, [(0, 3 * MiB), (10 * MiB, 7 * MiB + 4096), (40 * MiB, 8 * MiB)], seed=5
    )
    return str(path), content


@needs_root_for_loop
def test_a_detached_file_moves_onto_a_loop_device(journal_url, source, loops):
    src, content = source
    dst = loops.create(64 * MiB, garbage=True)

    m = Migrator(journal_url).migrate(src, dst)

    assert m.state == "completed" and m.dst_valid and m.copy_path == "copy"
    assert read_all(dst, len(content)) == content
    assert m.src_digest == m.dst_digest == volcopy.digest(src)
    assert (m.bytes_done, m.bytes_total, m.percent) == (len(content), len(content), 100.0)
    steps = Migrator(journal_url).steps(m.id)
    assert [(s.name, s.status) for s in steps] == [("copy", "done"), ("verify", "done")], (
        "dst read back by default; no compute step for a detached volume"
    )
    assert not os.path.exists(m.checkpoint)


@needs_root_for_loop
def test_connection_info_volumes_are_attached_through_os_brick(journal_url, source, loops):
    src, content = source
    src_device = loops.attach(src)
    dst = loops.create(48 * MiB, garbage=True)

    with_chap = local(src_device)
    with_chap["data"]["auth_password"] = "chap-secret"  # as iSCSI's connection_info carries it

    m = Migrator(journal_url).migrate(with_chap, local(dst), verify=True)

    assert m.state == "completed" and read_all(dst) == content
    assert [s.name for s in Migrator(journal_url).steps(m.id)] == ["copy", "verify"]
    shown = cli("migrations", "--journal", journal_url, "show", m.id, "--json").stdout
    assert json.loads(shown)["src"]["connection_info"]["data"]["auth_password"] == "***"
    # --journal after the action too, where a user types it
    assert "chap-secret" not in shown + cli("migrations", "show", m.id, "--journal", journal_url).stdout
    with pytest.raises(MigrationCancelled, match="Invalid InitiatorConnector protocol"):
        Migrator(journal_url).migrate(local(src_device), {"driver_volume_type": "nosuch", "data": {}})


@pytest.fixture
def xfs(loops, workdir):
    """An XFS file system with reflink, the kind of backend that clones instead of copying."""
    device = loops.create(512 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", device], check=True)
    mountpoint = workdir / "xfs"
    mountpoint.mkdir()
    subprocess.run(["mount", device, str(mountpoint)], check=True)
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], check=True)


@needs_root
def test_files_on_a_reflink_file_system_are_cloned_not_copied(xfs, workdir):
    content = write_layout(xfs / "src.img", 128 * MiB, [(0, 128 * MiB)], seed=6)
    os.sync()
    free_before = shutil.disk_usage(xfs).free

    m = Migrator(f"sqlite:///{workdir}/journal.sqlite").migrate(
        str(xfs / "src.img"), str(xfs / "dst.img"), verify=False
    )

    assert m.state == "completed" and m.copy_path == "clone"
    assert read_all(xfs / "dst.img") == content
    assert m.dst_digest is None, "a clone is near instant: with verify=False nothing is read"
    os.sync()
    assert free_before - shutil.disk_usage(xfs).free < 8 * MiB, "dst does not share src's extents"


@needs_root
def test_a_larger_dst_on_a_reflink_file_system_gets_src_cloned_into_its_start(xfs, workdir):
    content = write_layout(xfs / "src.img", 64 * MiB, [(0, 64 * MiB)], seed=9)
    with open(xfs / "dst.img", "wb") as f:
        f.truncate(96 * MiB)
    os.sync()
    free_before = shutil.disk_usage(xfs).free

    m = Migrator(f"sqlite:///{workdir}/journal.sqlite").migrate(
        str(xfs / "src.img"), str(xfs / "dst.img"), verify=True
    )

    assert m.copy_path == "clone" and os.path.getsize(xfs / "dst.img") == 96 * MiB
    assert m.src_digest == m.dst_digest == volcopy.digest(xfs / "src.img")
    assert read_all(xfs / "dst.img", 64 * MiB) == content
    os.sync()
    assert free_before - shutil.disk_usage(xfs).free < 8 * MiB, "dst does not share src's extents"


def test_files_on_a_file_system_without_reflink_are_copied(source, workdir):
    src, content = source
    m = Migrator(f"sqlite:///{workdir}/journal.sqlite").migrate(src, str(workdir / "dst.img"))
    assert m.copy_path == "copy" and read_all(workdir / "dst.img") == content
    clone = next(s for s in Migrator(f"sqlite:///{workdir}/journal.sqlite").steps(m.id) if s.name == "clone")
    assert clone.detail == "the file system cannot share extents"


def test_a_drivers_clone_is_used_and_checked(source, workdir):
    src, content = source
    migrator = Migrator(f"sqlite:///{workdir}/journal.sqlite")

    m = migrator.migrate(src, str(workdir / "dst.img"), clone=lambda s, d: shutil.copyfile(s, d) and True)
    assert m.copy_path == "driver-clone" and read_all(workdir / "dst.img") == content
    assert [s.name for s in migrator.steps(m.id)] == ["clone", "verify"], "a driver's clone is read back"

    def wrong_clone(s, d):
        shutil.copyfile(s, d)
        with open(d, "r+b") as f:
            f.seek(11 * MiB)
            f.write(b"stale")
        return True

    with pytest.raises(MigrationCancelled, match="dst differs from src") as raised:
        migrator.migrate(src, str(workdir / "dst2.img"), clone=wrong_clone)
    failed = migrator.status(raised.value.migration_id)
    assert failed.state == "cancelled" and not failed.dst_valid


@needs_root_for_loop
def test_a_failed_copy_ends_cancelled_and_frees_the_volumes(journal_url, source, loops):
    src, content = source
    too_small = loops.create(16 * MiB)
    migrator = Migrator(journal_url)

    with pytest.raises(MigrationCancelled, match="the copy failed") as raised:
        migrator.migrate(src, too_small)

    m = migrator.status(raised.value.migration_id)
    assert m.state == "cancelled" and not m.dst_valid and "copy failed" in m.reason
    assert not os.path.exists(m.checkpoint)
    big_enough = loops.create(48 * MiB)
    assert migrator.migrate(src, big_enough).state == "completed"  # src was released
    assert read_all(big_enough) == content


def test_cancel_busy_and_progress_from_other_processes(workdir):
    """A slow migration runs in this process; other processes see its progress, are refused a second
    migration of the same volume, and cancel it."""
    write_layout(workdir / "src.img", 64 * MiB, [(0, 64 * MiB)], seed=7)
    url = f"sqlite:///{workdir}/journal.sqlite"
    migrator, outcome = Migrator(url), {}

    def run():
        try:
            migrator.migrate(str(workdir / "src.img"), str(workdir / "dst.img"), rate_limit=4 * MiB)
        except MigrationCancelled as exc:
            outcome["cancelled"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    journal = Journal(url)
    running = _wait(lambda: [m for m in journal.list() if m.bytes_done > 0], "progress in the journal")[0]
    seen, deadline = [], time.monotonic() + 3.5
    while time.monotonic() < deadline:  # progress rows, as another reader sees them
        m = journal.get(running.id)
        if not seen or m.updated_at != seen[-1][0]:
            seen.append((m.updated_at, m.bytes_done))
        time.sleep(0.05)

    shown = json.loads(cli("migrations", "--journal", url, "show", running.id, "--json").stdout)
    busy = cli("migrate", workdir / "src.img", workdir / "other.img", "--journal", url, check=False)
    cancelled = cli("migrations", "--journal", url, "cancel", running.id, "--wait", "30")
    thread.join(timeout=30)

    assert shown["state"] == "copying" and 0 < shown["bytes_done"] < shown["bytes_total"] == 64 * MiB
    assert shown["steps"][-1]["name"] == "copy" and shown["steps"][-1]["status"] == "intended"
    gaps = [(b[0] - a[0]).total_seconds() for a, b in zip(seen, seen[1:], strict=False)]
    assert len(seen) >= 3 and min(gaps) >= 0.9, f"progress rows {gaps} s apart; at most one a second"
    assert busy.returncode == 1 and f"already in migration {running.id}" in busy.stderr
    assert busy.stderr.count("\n") == 1
    assert cancelled.stdout.strip() == f"migration {running.id}: cancelled"
    assert outcome["cancelled"].reason == "cancelled on request"
    assert not os.path.exists(workdir / "other.img")


def _wait(predicate, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("point", ["after-record", "mid-copy", "after-copy", "before-finish"])
def test_recover_finishes_a_detached_migration_killed_at(point, journal_url, workdir):
    write_layout(workdir / "src.img", 64 * MiB, [(0, 64 * MiB)], seed=8)
    fill_garbage(workdir / "dst.img", 64 * MiB)
    url, checkpoints = journal_url, ["--checkpoint-dir", workdir / "checkpoints"]
    env = dict(os.environ, VOLCOPY_FAILPOINT=point)

    # Slow enough at mid-copy for the engine's first checkpoint (after 2 s) to come before half-way.
    rate = ["--rate", "12M"] if point == "mid-copy" else []
    killed = cli(
        "migrate",
        workdir / "src.img",
        workdir / "dst.img",
        "--journal",
        url,
        *checkpoints,
        *rate,
        env=env,
        check=False,
    )
    assert killed.returncode == -9, killed.stderr
    assert Journal(url).list()[0].state != "completed"

    recovered = Migrator(url).recover()

    assert [m.state for m in recovered] == ["completed"]
    assert read_all(workdir / "dst.img") == read_all(workdir / "src.img")
    if point == "mid-copy":
        assert recovered[0].resumed_from > 0, "the copy started again instead of resuming"
    assert Migrator(url).recover() == [], "nothing is left to recover"


def migration_killed_mid_copy(journal_url, workdir):
    """A 64 MiB migration from the CLI, killed halfway with a checkpoint in the journal: src, dst."""
    src, dst = workdir / "src.img", workdir / "dst.img"
    write_layout(src, 64 * MiB, [(0, 64 * MiB)], seed=9)
    fill_garbage(dst, 64 * MiB)
    killed = cli(
        "migrate", src, dst, "--journal", journal_url, "--checkpoint-dir", workdir / "host-a",
        "--rate", "12M", env=dict(os.environ, VOLCOPY_FAILPOINT="mid-copy"), check=False,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    return src, dst


def recover_killed_at(point: str, journal_url, checkpoint_dir: str) -> None:
    """recover() on another host (a process with its own checkpoint directory), killed at point."""
    on_host = f"import volcopy.migration as m; m.Migrator({journal_url!r}, checkpoint_dir={checkpoint_dir!r})"
    died = subprocess.run(
        [sys.executable, "-c", on_host + ".recover()"],
        env=dict(os.environ, VOLCOPY_FAILPOINT=point),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert died.returncode == -9, died.stderr


def test_a_journal_checkpoint_that_does_not_hold_here_is_copied_over_from_the_start(journal_url, workdir):
    """Another host's checkpoint, taken from the journal, whose fingerprint of src no longer holds (src
    changed since), is dropped for a copy from the start: also when the first run here died between
    taking it and opening it, so that the file here is already the journal's copy."""
    src, dst = migration_killed_mid_copy(journal_url, workdir)
    assert Journal(journal_url).checkpoint_pieces(Journal(journal_url).list()[0].id)
    os.utime(src, ns=(time.time_ns(), time.time_ns()))  # src changed: the checkpoint is no longer its copy's

    host_b = str(workdir / "host-b")
    recover_killed_at("checkpoint-restored", journal_url, host_b)
    recovered = Migrator(journal_url, checkpoint_dir=host_b).recover()

    assert [(m.state, m.resumed_from) for m in recovered] == [("completed", 0)], recovered[0].reason
    assert read_all(dst) == read_all(src)


def test_bad_input_is_refused_before_anything_is_recorded(source, workdir):
    src, _ = source
    url = f"sqlite:///{workdir}/journal.sqlite"
    migrator = Migrator(url)
    dst = str(workdir / "dst.img")
    cases = [
        (lambda: migrator.migrate(src, dst, attachments=[("s", "a", "b")]), "needs a compute"),
        (lambda: migrator.migrate(src, dst, attachments=[("s", "a")]), "must be \\(server_id"),
        (lambda: migrator.migrate(src, src), "same volume"),
        (lambda: migrator.migrate(str(workdir / "missing.img"), dst), "does not exist"),
        (lambda: migrator.migrate(src, str(workdir / "no" / "dst.img")), "does not exist"),
        (lambda: migrator.migrate(src, {"data": {}}), "a path, rbd:POOL/IMAGE or Cinder connection_info"),
        (lambda: migrator.migrate(src, dst, speed=3), "unknown copy option"),
        (lambda: migrator.migrate(src, dst, block_size=3), "block_size"),
        (lambda: migrator.migrate(src, dst, rate_limit=volcopy.RateLimit(1)), "not a RateLimit"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            call()
    assert migrator.list() == []


def test_cli_errors_are_one_line(workdir, source):
    url = f"sqlite:///{workdir}/journal.sqlite"
    unknown = cli("migrations", "--journal", url, "show", "no-such-id", check=False)
    unreachable = cli("migrations", "--journal", "postgresql+psycopg://x@127.0.0.1:1/j", "list", check=False)
    no_compute = cli(
        "migrate", source[0], workdir / "dst.img", "--attach", "s:a:b", "--journal", url, check=False
    )
    bad_attach = cli(
        "migrate", source[0], workdir / "dst.img", "--attach", "s:a", "--journal", url, check=False
    )
    for proc, message in [
        (unknown, "no migration no-such-id in journal"),
        (unreachable, "journal postgresql+psycopg://x@127.0.0.1:1/j is unreachable"),
        (no_compute, "needs the compute: --compute-url"),
        (bad_attach, "--attach wants SERVER:SRC_ATTACHMENT:DST_ATTACHMENT"),
    ]:
        assert proc.returncode == 1 and proc.stderr.startswith("volcopy: error: ") and message in proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr


def test_a_journal_holding_an_earlier_checkpoint_file_has_it_replaced_whole(journal_url, workdir):
    """The journal holds pieces of a checkpoint file the engine will not resume (here an older
    version's: no valid header, digests where the new file's records go). The first sync of the new
    file replaces them all, rather than only the pieces at its own offsets: a later takeover resumes,
    instead of laying the old bytes over the new records and copying from the start again."""
    src, dst = migration_killed_mid_copy(journal_url, workdir)
    journal = Journal(journal_url)
    [m] = journal.list()
    journal.drop_checkpoint_pieces(m.id, as_owner=m.owner)
    journal.save_checkpoint_pieces(m.id, [(0, bytes(1024)), (4096 + 24, b"\xff" * 4096)], as_owner=m.owner)

    recover_killed_at("mid-copy", journal_url, str(workdir / "host-b"))
    recovered = Migrator(journal_url, checkpoint_dir=str(workdir / "host-c")).recover()

    assert [m.state for m in recovered] == ["completed"], recovered[0].reason
    assert recovered[0].resumed_from > 0, "the takeover copied from the start"
    assert read_all(dst) == read_all(src)
