"""The volcopy command as a user runs it: JSON results, a live progress bar on a terminal, one-line
errors with a non-zero status and no traceback."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

from conftest import MiB, fill_garbage, read_all, reference_digest, write_layout

VOLCOPY = [sys.executable, "-m", "volcopy.cli"]


def run(*args, check=True):
    proc = subprocess.run(VOLCOPY + [str(a) for a in args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_copy_json_prints_the_result(workdir):
    content = write_layout(workdir / "src.img", 9 * MiB + 1, [(MiB, 2 * MiB), (8 * MiB, MiB + 1)], seed=1)
    fill_garbage(workdir / "dst.img", 10 * MiB)

    result = json.loads(
        run(
            "copy",
            workdir / "src.img",
            workdir / "dst.img",
            "--json",
            "--verify",
            "--block-size",
            "2M",
            "--queue-depth",
            "4",
        ).stdout
    )

    assert result["digest"] == reference_digest(content)
    assert result["verified"] is True
    assert result["block_size"] == 2 * MiB and result["queue_depth"] == 4
    assert result["bytes_skipped"] > 0
    assert read_all(workdir / "dst.img", len(content)) == content


def test_copy_summary_names_what_happened(workdir):
    write_layout(workdir / "src.img", 3 * MiB, [(0, MiB)], seed=2)

    out = run(
        "copy", workdir / "src.img", workdir / "dst.img", "--no-sparse", "--no-direct", "--engine", "sync"
    ).stdout

    assert "engine          sync, page cache" in out
    assert "holes skipped   0 B" in out
    assert "verified        no" in out


def run_on_terminal(*args) -> tuple[int, str]:
    """Runs volcopy with its stdout and stderr on a pseudo-terminal; returns its exit code and output."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.execv(sys.executable, VOLCOPY + [str(a) for a in args])
    output = b""
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        output += data
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode()


def test_copy_on_a_terminal_shows_a_live_progress_bar(workdir):
    write_layout(workdir / "src.img", 24 * MiB, [(0, 24 * MiB)], seed=3)
    code, text = run_on_terminal(
        "copy", workdir / "src.img", workdir / "dst.img", "--rate", "40M", "--verify"
    )

    assert code == 0, text
    assert text.count("\r[") >= 3, "the bar is redrawn as the copy goes"
    assert "100.0%" in text and "ETA" in text and "/s" in text
    assert "verified        yes" in text


def test_migrate_on_a_terminal_shows_a_live_progress_bar(workdir):
    write_layout(workdir / "src.img", 24 * MiB, [(0, 24 * MiB)], seed=3)
    journal = f"sqlite:///{workdir}/journal.sqlite"
    code, text = run_on_terminal(
        "migrate", workdir / "src.img", workdir / "dst.img", "--rate", "40M", "--journal", journal
    )

    assert code == 0, text
    assert text.count("\r[") >= 3 and "100.0%" in text
    assert "state        completed" in text and "dst valid    yes" in text
    assert read_all(workdir / "dst.img") == read_all(workdir / "src.img")


def test_digest_and_verify_commands(workdir):
    content = write_layout(workdir / "src.img", 2 * MiB + 3, [(0, 2 * MiB + 3)], seed=4)
    run("copy", workdir / "src.img", workdir / "dst.img")

    assert run("digest", workdir / "src.img").stdout.strip() == reference_digest(content)
    assert "reads back identical" in run("verify", workdir / "src.img", workdir / "dst.img").stdout
    with open(workdir / "dst.img", "r+b") as f:
        f.seek(MiB + 10)
        f.write(b"X")
    failed = run("verify", workdir / "src.img", workdir / "dst.img", check=False)
    assert failed.returncode == 1
    assert "differs" in failed.stderr and str(MiB + 10) in failed.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["copy", "{w}/missing.img", "{w}/dst.img"], "does not exist"),
        (["copy", "{w}/src.img", "{w}/src.img"], "are the same volume"),
        (["copy", "{w}/src.img", "{w}"], "is a directory"),
        (["copy", "{w}/src.img", "{w}/dst.img", "--block-size", "3K"], "block_size must be"),
        (["copy", "{w}/src.img", "{w}/dst.img", "--rate", "fast"], "not a size"),
        (["copy", "{w}/src.img", "{w}/dst.img", "--engine", "spdk"], "invalid choice"),
        (["digest", "{w}/missing.img"], "does not exist"),
    ],
)
def test_errors_are_one_line_with_non_zero_status(args, message, workdir):
    write_layout(workdir / "src.img", MiB, [(0, MiB)], seed=5)

    proc = run(*[a.format(w=workdir) for a in args], check=False)

    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("volcopy")]
    assert len(lines) == 1


def test_a_copy_imports_only_what_it_uses(workdir):
    """A command's start-up is most of a short copy (the bench's W7): dataclasses (with inspect), typing,
    numpy and the other commands' modules (the migration's, the movers') cost more than the copy of a
    MiB. The copy must still be right."""
    content = write_layout(workdir / "src.img", MiB, [(0, MiB)], seed=7)
    probe = (
        "import sys, runpy; sys.argv = ['volcopy', 'copy', sys.argv[1], sys.argv[2]]\n"
        "try:\n    runpy.run_module('volcopy.cli', run_name='__main__')\n"
        "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "heavy = ('dataclasses', 'inspect', 'typing', 'numpy', 'shutil', 'json',\n"
        "         'volcopy.migration', 'volcopy.movers')\n"
        "print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe, str(workdir / "src.img"), str(workdir / "dst.img")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (shown.returncode, shown.stderr) == (0, "[]\n")
    assert read_all(workdir / "dst.img", MiB) == content
