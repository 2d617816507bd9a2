"""The benchmark harness on tiny sizes: every tool runs on every workload, every copy is checked, and the
report and chart are written. (Performance itself is shown by running the harness, never by a test.)"""

from __future__ import annotations

import shutil

import pytest

from conftest import needs_root_for_loop
from volcopy.bench import compare, machine_settings, sweep

PEERS = ["dd", "qemu-img", "nbdcopy", "fio", "blkdiscard", "/usr/bin/time"]


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
    for workload in ("## W1", "## W2", "## W3", "## W4", "## W5"):
        assert workload in text
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
    ):
        assert tool in text
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
