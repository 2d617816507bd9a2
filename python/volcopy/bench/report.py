"""The report of a comparison: Markdown tables with the targets' verdicts, and a chart."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..units import format_size
from .tools import (
    ARGPARSE_FLOOR,
    DISK_READ_FLOOR,
    LIMIT,
    READ_FLOOR,
    W7_MORE_ROUNDS,
    WRITE_FLOOR,
    YARDSTICKS,
    Case,
)

GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Run:
    seconds: float
    cpu: float
    rss: int  # bytes
    correct: bool | None  # None: not a copy (the fio limit)
    error: str = ""


@dataclass
class Results:
    runs: dict[str, dict[str, list[Run]]] = field(default_factory=dict)  # case -> tool -> runs
    cases: dict[str, Case] = field(default_factory=dict)
    fio_start_up: float = 0.0  # seconds, median of a few runs


def _median(runs: list[Run]) -> float:
    return statistics.median(r.seconds for r in runs)


def _cpu(runs: list[Run]) -> float:
    return statistics.median(r.cpu for r in runs)


@dataclass
class Verdict:
    label: str
    value: float
    bound: float  # the target: value <= bound
    floor: float | None = None  # the same ratio for the floors alone, where there are floors


def _fastest_correct_peer(runs: dict[str, list[Run]]) -> tuple[str, float] | None:
    peers = [
        (name, _median(rs))
        for name, rs in runs.items()
        if name not in ("volcopy", "volcopy --verify", *YARDSTICKS) and all(r.correct for r in rs)
    ]
    return min(peers, key=lambda p: p[1]) if peers else None


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    memory = next(
        int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")
    )
    return f"{cpu}, {os.cpu_count()} CPUs, {format_size(memory)} memory, Linux {platform.release()}"


def filesystem(path: Path) -> str:
    out = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", str(path)], capture_output=True, text=True
    ).stdout.splitlines()
    return " ".join(out[0].split()) if out else "unknown"  # the first of stacked mounts


def _peak_rss(runs: list[Run]) -> float:
    return max(r.rss for r in runs) / MiB


def _verdicts(results: Results) -> list[Verdict]:
    """The targets of the performance issue (14), numbered as it numbers them: T1 ... T8."""
    verdicts = []
    for name, runs in results.runs.items():
        case = results.cases[name]
        ours = _median(runs["volcopy"])
        limit = _median(runs[LIMIT]) if LIMIT in runs else None
        fastest = _fastest_correct_peer(runs)
        verify = _median(runs["volcopy --verify"]) if "volcopy --verify" in runs else None
        read_back = None  # verify's one more read, of dst: dd's on tmpfs; on the disk fio's, start-up off
        if READ_FLOOR in runs:
            read_back = _median(runs[READ_FLOOR])
        elif DISK_READ_FLOOR in runs:
            read_back = _median(runs[DISK_READ_FLOOR]) - results.fio_start_up
        if case.workload == "W1" and limit:
            verdicts.append(Verdict(f"T1 {name}: volcopy / fio limit", ours / limit, 1.10))
        if case.resident and fastest:
            verdicts.append(
                Verdict(
                    f"{'T1' if case.resident == 1.0 else 'T2'} {name}: volcopy / fastest correct peer "
                    f"({fastest[0]})",
                    ours / fastest[1],
                    1.00,
                )
            )
        if case.workload in ("W2", "W3") and verify and read_back is not None:
            verdicts.append(
                Verdict(
                    f"T3 {name}: volcopy --verify / volcopy", verify / ours, 1.15, (ours + read_back) / ours
                )
            )
        # T4: read src, write dst, read dst
        if case.workload == "W1" and limit and verify and read_back is not None:
            verdicts.append(
                Verdict(
                    f"T4 {name}: volcopy --verify / (fio limit + fio's read of dst)",
                    verify / (limit + read_back),
                    1.10,
                )
            )
        if case.workload == "W4" and fastest:
            floor = max(_median(runs[READ_FLOOR]), _median(runs[WRITE_FLOOR]))
            verdicts += [
                Verdict(
                    f"T5 {name}: volcopy / fastest correct peer ({fastest[0]})",
                    ours / fastest[1],
                    1.00,
                    floor / fastest[1],
                ),
                Verdict(
                    f"T5 {name}: volcopy / the larger of the read and the write floor", ours / floor, 1.15
                ),
            ]
        if case.workload == "W3" and not case.garbage and "qemu-img" in runs:
            verdicts.append(
                Verdict(
                    f"T6 {name}: volcopy CPU / qemu-img CPU",
                    _cpu(runs["volcopy"]) / _cpu(runs["qemu-img"]),
                    0.60,
                )
            )
        if case.workload == "W7":
            start_up = runs[ARGPARSE_FLOOR]  # a Python command line tool's least: start, parse, exit
            verdicts += [
                Verdict(f"T7 {name}: volcopy median wall seconds", ours, 0.05, _median(start_up)),
                Verdict(
                    f"T7 {name}: volcopy peak RSS (MiB)",
                    _peak_rss(runs["volcopy"]),
                    25.0,
                    _peak_rss(start_up),
                ),
            ]
        if case.workload == "W6":
            verdicts.append(Verdict(f"T8 {name}: volcopy peak RSS (MiB)", _peak_rss(runs["volcopy"]), 64.0))
    sparse = [n for n, c in results.cases.items() if c.workload == "W6"]
    dense = [n for n, c in results.cases.items() if c.workload == "W6-dense"]
    if sparse and dense:
        sparse_runs, dense_runs = results.runs[sparse[0]], results.runs[dense[0]]
        # the floor: the fio limit moves the same data, scattered over the sparse volume or packed
        limits = LIMIT in sparse_runs and LIMIT in dense_runs
        verdicts.append(
            Verdict(
                "T8 W6: volcopy on the sparse volume / volcopy on its data alone (dense)",
                _median(sparse_runs["volcopy"]) / _median(dense_runs["volcopy"]),
                1.20,
                (_median(sparse_runs[LIMIT]) - results.fio_start_up)
                / (_median(dense_runs[LIMIT]) - results.fio_start_up)
                if limits
                else None,
            )
        )
    return verdicts


def report(results: Results, command: str, where: str, memory: str, throttle) -> str:
    lines = [
        "# volcopy against its peers",
        "",
        f"`{command}` on {time.strftime('%Y-%m-%d %H:%M')} UTC.",
        "",
        f"Machine: {machine()}. {where}. Loop devices with direct I/O. Page cache dropped before every run "
        "(then, for W1-hot and part-hot, all or every other 16 MiB of src read into it)." + memory,
        "",
        "Times are wall seconds (median and min-max over the rounds); CPU is user+sys seconds per GiB of "
        "volume; RSS is the peak of the process (for volcopy, the Python interpreter included). "
        "The fio limit moves the data only (for a sparse source, its extents at their offsets); its times "
        f"include fio's own start-up, {results.fio_start_up:.3f} s (fio reading 1 MiB, median of 3). "
        "On tmpfs (W4) it runs inline on one CPU and is no limit; there are two floors instead: dd writing "
        "zeros to dst (filling dst's fresh pages, reading nothing) and a dd per CPU reading its share of src "
        f"(writing nothing). W7 (a command's fixed cost) runs {W7_MORE_ROUNDS} times as many rounds, "
        "since a start-up varies by milliseconds from run to run, and keeps the page cache: it times the "
        "commands' start-up, not the disk reading their programs.",
        "",
    ]
    for name, runs in results.runs.items():
        case = results.cases[name]
        ours = _median(runs["volcopy"])
        limit = _median(runs[LIMIT]) if LIMIT in runs else None
        lines += [
            f"## {name}",
            "",
            "| tool | correct | median s | min-max s | x volcopy | x fio limit | CPU s/GiB | peak RSS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for tool, rs in runs.items():
            med = _median(rs)
            correct = (
                "n/a" if rs[0].correct is None else ("yes" if all(r.correct for r in rs) else "**WRONG**")
            )
            cpu = _cpu(rs) / (case.size / GiB)
            rss = max(r.rss for r in rs)
            spread = f"{min(r.seconds for r in rs):.3f}-{max(r.seconds for r in rs):.3f}"
            versus_limit = f"{med / limit:.2f}" if limit else "-"
            lines.append(
                f"| {tool} | {correct} | {med:.3f} | {spread} | {med / ours:.2f} | {versus_limit} | "
                f"{cpu:.3f} | {format_size(rss)} |"
            )
        lines.append("")
    verdicts = _verdicts(results)
    if throttle:
        measured, target = throttle
        verdicts.append(
            Verdict(
                f"throttled to 100 MB/s: measured {measured / 1e6:.1f} MB/s, |ratio - 1|",
                abs(measured / target - 1),
                0.05,
            )
        )
    lines += [
        "## Targets",
        "",
        "T1 to T8 are the performance issue's targets, numbered as it numbers them. Where a floor is given, "
        "it is the same figure for the floors alone, as if a tool cost nothing but them: for T3, the copy "
        "plus one more read, of dst (fio's, its start-up taken off, of src laid out as dst is); for T5, the "
        "larger of the read and the write floor; for T7, this Python starting, parsing the same command line "
        "with argparse (the standard library's parser, which volcopy uses) and exiting; for T8's time, the "
        "fio limit on the sparse volume over the fio limit on its data packed, their "
        "start-up taken off. A target below its floor is out of reach on this machine for such a copy; for "
        "verify, only as far as the copy leaves neither the disk nor a CPU idle for the read-back to use.",
        "",
        "| target | measured | floor | verdict |",
        "|---|---|---|---|",
    ]
    for v in verdicts:
        verdict = "met" if v.value <= v.bound else "**missed**"
        if v.value > v.bound and v.floor is not None and v.floor > v.bound:
            verdict += ": the floor is above the target"
        floor = "-" if v.floor is None else f"{v.floor:.3f}"
        lines.append(f"| {v.label} <= {v.bound:.2f} | {v.value:.3f} | {floor} | {verdict} |")
    return "\n".join(lines) + "\n"


def chart(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results.runs)
    tools = sorted({t for runs in results.runs.values() for t in runs}, key=lambda t: (t != "volcopy", t))
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(names) * max(1, len(tools) / 3) + 2))
    height = 0.8 / len(tools)
    for k, tool in enumerate(tools):
        values = [_median(results.runs[n][tool]) if tool in results.runs[n] else 0 for n in names]
        ax.barh([i + k * height for i in range(len(names))], values, height, label=tool)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median wall seconds (log scale; shorter is better)")
    ax.legend(fontsize=8)
    ax.set_title(f"volcopy and its peers ({machine()})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
