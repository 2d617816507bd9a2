"""The benchmark harness on tiny sizes: every tool runs on every workload, every copy is checked, and the
report and chart are written; on RBD too, on a cluster the harness starts and stops. (Performance itself
is shown by running the harness, never by a test.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import needs_root_for_loop
from volcopy.bench import compare, machine_settings, rbd_compare, rbd_report, rbd_tools, sweep
from volcopy.bench.workbench import Workbench

PEERS = ["dd", "qemu-img", "nbdcopy", "fio", "blkdiscard", "/usr/bin/time"]
# The harness changes settings of the whole machine for a run and puts back what it found: two runs at
# once (pytest-xdist workers) would put back each other's changes. One worker runs them all.
pytestmark = pytest.mark.xdist_group("machine-settings")


def _machine_settings() -> tuple[str, ...]:
    """The settings the harness changes for a run (machine_settings.py), as they are now."""
    paths = [machine_settings.NR_HUGEPAGES, machine_settings.PAGE_REPORTING / "page_reporting_order"]
    return tuple(path.read_text() if path.exists() else "" for path in paths)


def _tiny(tmp_path) -> list[str]:
    """One round at 1/256 of the issue's sizes, everything under tmp_path."""
    return [
        "--rounds",
        "1",
        "--scale",
        str(1 / 256),
        "--workdir",
        str(tmp_path / "work"),
        "--tmpfs",
        str(tmp_path / "shm"),
        "--results",
        str(tmp_path / "results"),
    ]


@needs_root_for_loop
@pytest.mark.skipif(
    any(shutil.which(p) is None for p in PEERS),
    reason="needs the peers: dd, qemu-img (qemu-utils), nbdcopy (libnbd-bin), fio, blkdiscard, GNU time",
)
def test_harness_runs_every_tool_on_every_workload_and_checks_every_copy(tmp_path):
    results = tmp_path / "results"
    settings_before = _machine_settings()
    rc = compare.main([*_tiny(tmp_path), "--no-throttle"])

    assert rc == 0
    assert _machine_settings() == settings_before  # what the harness holds for the run, it puts back
    text = (results / "compare.md").read_text()
    for workload in ("W1 ", "W1-hot ", "part-hot ", "W2", "W3", "W4", "W5", "W6 ", "W6-dense ", "W7 "):
        assert f"## {workload}" in text
    verdicts = [
        line.split(" | ") for line in text.split("## Targets")[1].splitlines() if line.startswith("| T")
    ]
    # every target of the performance issue has its verdicts, each on the workload it names
    assert sorted({v[0].split()[1] for v in verdicts}) == [f"T{k}" for k in range(1, 9)]
    [w6] = [v for v in verdicts if v[0].startswith("| T8 W6: volcopy on the sparse volume")]
    assert w6[0].endswith("<= 1.20") and w6[2] != "-"  # its floor, from fio
    [w7_wall, w7_rss] = [v for v in verdicts if v[0].startswith("| T7 W7 ")]
    w7 = text.split("## W7 ", 1)[1].split("\n## ", 1)[0]
    assert "| floor: Python starts and exits | n/a |" in w7 and "| fio limit |" not in w7
    # T7's floor is Python parsing the command line with argparse, shown in W7's table
    [parses] = [row.split(" | ") for row in w7.splitlines() if row.startswith("| floor: Python parses copy")]
    assert w7_wall[0].endswith("median wall seconds <= 0.05") and w7_wall[2] == f"{float(parses[2]):.3f}"
    assert w7_rss[0].endswith("peak RSS (MiB) <= 25.00") and float(w7_rss[2]) > 0
    for verified in ("W1", "W2", "W3", "W4"):  # each has its verify row
        section = text.split(f"## {verified} ", 1)[1].split("\n## ", 1)[0]
        assert "| volcopy --verify | yes |" in section
    assert (
        "T1 W1-hot dense 16.0 MiB file to file, src in the page cache: volcopy / fastest correct peer" in text
    )
    for tool in (
        "| volcopy |",
        "| dd |",
        "| qemu-img |",
        "| nbdcopy |",
        "| cp |",
        "| fio limit |",
        "| volcopy --verify |",
        "| floor: dd zeros to dst |",
        "| floor: dd reads src |",
        "| floor: fio reads src |",
    ):
        assert tool in text
    # T3 (W2 and W3's two): verify's floor is the copy and fio's read; T4 (W1) is against its floor
    verify_floors = [v[2] for v in verdicts if "--verify / volcopy" in v[0]]
    assert len(verify_floors) == 3 and "-" not in verify_floors
    assert (
        "T4 W1 dense 16.0 MiB file to file: volcopy --verify / (fio limit + fio's read of dst) <= 1.10"
        in text
    )
    assert "| volcopy | yes |" in text and "| volcopy | **WRONG** |" not in text
    assert "| target | measured | floor | verdict |" in text
    assert (results / "compare.png").stat().st_size > 10_000


@needs_root_for_loop
def test_sweep_covers_disk_tmpfs_and_a_device_at_every_point_of_the_grid(tmp_path):
    results = tmp_path / "results"
    rc = compare.main(["--sweep", *_tiny(tmp_path)])

    assert rc == 0
    text = (results / "sweep.md").read_text()
    sections = text.split("\n## ")[1:]
    assert [s.split(":")[0] for s in sections] == ["disk", "tmpfs", "device"]
    for section in sections:
        rows = [line for line in section.splitlines() if line.startswith("| ") and "MiB |" in line]
        assert len(rows) == len(sweep.SWEEP_GEOMETRIES)
    assert not (tmp_path / "work").exists()  # the generated volumes and loop devices are gone


# ---------------------------------------------------------------- the RBD workloads (R1-R4)

RBD_MISSING = rbd_compare.missing_tools()
needs_rbd_peers = pytest.mark.skipif(RBD_MISSING is not None, reason=RBD_MISSING or "")


def _ceph_daemons_of_this_process() -> list[str]:
    """The ceph-mon and ceph-osd processes this test process started and has not reaped."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, rest = stat.read_text().rsplit(")", 1)
        except OSError:  # ended meanwhile
            continue
        if int(rest.split()[1]) == os.getpid() and name.split("(", 1)[1] in ("ceph-mon", "ceph-osd"):
            found.append(stat.parent.name)
    return found


@needs_rbd_peers
def test_rbd_workloads_run_every_tool_on_a_cluster_of_their_own_and_check_every_copy(tmp_path):
    results = tmp_path / "results"
    session_cluster = _ceph_daemons_of_this_process()  # the RBD tests' own, when they ran first
    rc = compare.main(["--only", "R1,R2,R3,R4", *_tiny(tmp_path)])

    assert rc == 0
    text = (results / "rbd.md").read_text()
    sections = [line for line in text.splitlines() if line.startswith("## R")]
    assert [s.split()[1] for s in sections] == ["R1", "R2", "R3", "R3", "R4", "R4"]
    assert "Load averages:" in text
    for tool in (
        "| volcopy | yes |",
        "| rbd export/import | yes |",
        "| qemu-img | yes |",
        "| Cinder's path (os-brick) | yes |",
        "| rbd deep cp (beside: Ceph's own copy) | yes |",
        "| limit: rbd bench read + write | n/a |",
        "| limit: fio read + write (librbd's C API) | n/a |",
        "| os-brick's import, in Cinder's path | n/a |",
    ):
        assert tool in text
    assert "**WRONG**" not in text
    assert text.count("| volcopy | yes |") == 6
    assert "| target | measured | floor | verdict |" in text
    assert "R1 16.0 MiB (5%) RBD to RBD: volcopy / fastest client peer" in text
    assert "R2 dense 4.0 MiB RBD to RBD: volcopy / rbd bench limit <= 1.10" in text
    assert (results / "rbd.png").stat().st_size > 10_000
    assert not (tmp_path / "work").exists()
    assert _ceph_daemons_of_this_process() == session_cluster  # the harness's is stopped and reaped


def _wrong_copy(case: rbd_tools.RBDCase) -> list[str]:
    """A real command that ends well and leaves dst holding the wrong bytes (rbd bench's pattern)."""
    dst = case.dst_rbd
    total = str(case.size)
    return ["rbd", "-c", dst.conf, "bench", "--io-type", "write", "--io-total", total, dst.image_spec]


@needs_rbd_peers
def test_a_wrong_or_failed_copy_is_reported_wrong_and_is_no_peer(ceph, tmp_path, monkeypatch):
    tools = {
        "volcopy": rbd_tools.TOOLS["volcopy"],
        "writes the wrong bytes": rbd_tools.Tool(_wrong_copy),
        "fails": rbd_tools.Tool(lambda case: ["sh", "-c", "echo no cluster here >&2; exit 3"]),
        rbd_tools.LIMIT: rbd_tools.TOOLS[rbd_tools.LIMIT],
    }
    monkeypatch.setattr(rbd_compare, "TOOLS", tools)
    bench = Workbench(tmp_path / "work", 1 / 256)

    results = rbd_compare.compare(ceph, bench, {"R1", "R2"}, rounds=1)

    r1, r2 = (results.runs[name] for name in results.runs)
    for runs in (r1, r2):
        assert [run.correct for run in runs["volcopy"]] == [True]
        assert [run.correct for run in runs["writes the wrong bytes"]] == [False]
        assert [(run.correct, run.error.strip()) for run in runs["fails"]] == [(False, "no cluster here")]
    text = rbd_report.report(results, "test", "here", "")
    assert "| writes the wrong bytes | **WRONG** |" in text and "| fails | **WRONG** |" in text
    assert "fastest client peer" not in text  # no correct peer: no verdict against a wrong one


@needs_rbd_peers
def test_a_failed_limit_stops_the_run(ceph, tmp_path, monkeypatch):
    """A yardstick that failed would look fast: the run ends, naming it and the case."""
    tools = {rbd_tools.LIMIT: rbd_tools.Tool(lambda case: ["sh", "-c", "echo no OSD >&2; exit 1"])}
    monkeypatch.setattr(rbd_compare, "TOOLS", tools)
    bench = Workbench(tmp_path / "work", 1 / 256)

    failed = r"^limit: rbd bench read \+ write failed on R2 dense 4.0 MiB RBD to RBD: no OSD"
    with pytest.raises(RuntimeError, match=failed):
        rbd_compare.compare(ceph, bench, {"R2"}, rounds=1)
