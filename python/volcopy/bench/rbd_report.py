"""The report of the RBD comparison (rbd_compare.py): a table per case, and the targets' verdicts."""

from __future__ import annotations

import os
import statistics
import time

from ..units import format_size
from .rbd_compare import RBDResults, RBDRun
from .rbd_tools import BESIDE, CINDER, CINDER_START_UP, FIO_LIMIT, LIMIT, YARDSTICKS
from .report import Verdict, _cpu, _median, machine

GiB = 1 << 30
OSD_BYTES = ("osd_read", "osd_written")


def _fastest_client_peer(runs: dict[str, list[RBDRun]]) -> tuple[str, float] | None:
    """The fastest correct copy that moves the bytes through a client: not volcopy, not the limit, not
    Ceph's own deep copy."""
    peers = [
        (name, _median(rs))
        for name, rs in runs.items()
        if name not in ("volcopy", *YARDSTICKS, *BESIDE) and all(r.correct for r in rs)
    ]
    return min(peers, key=lambda p: p[1]) if peers else None


def _load(averages: tuple[float, float, float]) -> str:
    return " / ".join(f"{a:.2f}" for a in averages)


def _correct(runs: list[RBDRun]) -> str:
    if runs[0].correct is None:
        return "n/a"
    return "yes" if all(r.correct for r in runs) else "**WRONG**"


def report(results: RBDResults, command: str, where: str, memory: str) -> str:
    lines = [
        "# volcopy against its peers on Ceph RBD",
        "",
        f"`{command}` on {time.strftime('%Y-%m-%d %H:%M')} UTC.",
        "",
        f"Machine: {machine()}. {where}. Page cache dropped before every run.{memory}",
        "",
        f"The cluster: {results.cluster}. It runs on the same {os.cpu_count()} CPUs as the tools, which "
        "are shared with other work: each case gives the load averages (1, 5 and 15 minutes) at its start "
        "and its end.",
        "",
        "Times are wall seconds (median and min-max over the rounds). Client CPU is the user+sys seconds "
        "of the tool's processes, OSD CPU the OSD's over the same run (both per GiB of volume); OSD read "
        "and written are the bytes the OSD sent for reads and took in with writes (its perf counters "
        "op_r_out_bytes and op_w_in_bytes), medians; RSS is "
        "the peak of the tool's process (for volcopy, the Python interpreter included). Each tool writes "
        "onto a new dst: an empty image or sparse file, or none where the tool makes its own "
        "(`rbd import`, `rbd deep cp`, `rbd export`). The limits move the data only, a reader of src and "
        "a writer of dst at once, 1 MiB x 32 as volcopy runs, for dense volumes only: `rbd bench` on an "
        "image (fio on a file), the limit the targets name; and fio, with its rbd engine on an image "
        "(librbd's C API, which volcopy uses too). `rbd bench` does less per byte than a copy of real "
        "data can: it writes the same buffer again and again, whose checksum Ceph computes once and "
        "caches, and it reads into librbd's buffers, where the C API copies every byte read into the "
        "caller's; the fio limit pays both, and is given as the floor of the limit's target. "
        "Cinder's path is os-brick's RBD file wrapper 4 MiB at a "
        "time (python/volcopy/bench/cinder_path.py); its times include Python importing os-brick, "
        "which Cinder pays once when its service starts: that import is measured in the same rounds "
        "(os-brick's import row), and the target below is judged on Cinder's median less its median.",
        "",
    ]
    verdicts, unjudged = [], []
    for name, runs in results.runs.items():
        case = results.cases[name]
        gib = case.size / GiB
        ours = _median(runs["volcopy"])
        limit = _median(runs[LIMIT]) if LIMIT in runs else None
        start, end = results.load[name]
        lines += [
            f"## {name}",
            "",
            f"{format_size(case.allocated)} of data in {format_size(case.size)}. "
            f"Load averages: {_load(start)} at the start, {_load(end)} at the end.",
            "",
            "| tool | correct | median s | min-max s | x volcopy | x rbd bench limit | client CPU s/GiB | "
            "OSD CPU s/GiB | OSD read | OSD written | peak RSS |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for tool, rs in runs.items():
            med = _median(rs)
            spread = f"{min(r.seconds for r in rs):.3f}-{max(r.seconds for r in rs):.3f}"
            versus_limit = f"{med / limit:.2f}" if limit else "-"
            label = f"{tool} (beside: Ceph's own copy)" if tool in BESIDE else tool
            osd = statistics.median(r.osd_cpu for r in rs) / gib
            read, written = (format_size(statistics.median(getattr(r, k) for r in rs)) for k in OSD_BYTES)
            rss = format_size(max(r.rss for r in rs))
            lines.append(
                f"| {label} | {_correct(rs)} | {med:.3f} | {spread} | {med / ours:.2f} | {versus_limit} | "
                f"{_cpu(rs) / gib:.3f} | {osd:.3f} | {read} | {written} | {rss} |"
            )
        lines.append("")
        fastest = _fastest_client_peer(runs)
        if case.workload == "R1" and fastest:
            verdicts.append(
                Verdict(f"{name}: volcopy / fastest client peer ({fastest[0]})", ours / fastest[1], 0.70)
            )
        fio_limit = _median(runs[FIO_LIMIT]) if FIO_LIMIT in runs else None
        if case.workload == "R2" and limit:
            floor = fio_limit / limit if fio_limit else None
            verdicts.append(Verdict(f"{name}: volcopy / rbd bench limit", ours / limit, 1.10, floor))
        if CINDER in runs:
            cinder = _median(runs[CINDER]) - _median(runs[CINDER_START_UP])
            label = f"{name}: volcopy / (Cinder's path - os-brick's import), 5 x faster"
            fastest_limit = min((t for t in (limit, fio_limit) if t), default=None)
            if cinder > 0:
                floor = fastest_limit / cinder if fastest_limit else None
                verdicts.append(Verdict(label, ours / cinder, 0.20, floor))
            else:  # a volume so small that the import's spread is larger than the copy
                unjudged.append(f"{label}: not judged, Cinder's path took no longer than os-brick's import")
    lines += [
        "## Targets",
        "",
        "Where a floor is given, it is the same ratio for a limit alone, as if volcopy cost nothing but "
        "moving the data: against the rbd bench limit, the fio limit's ratio (real data through librbd's "
        "C API); against Cinder's path, the faster limit's. A target below its floor is out of reach for "
        "a client of this cluster through that interface.",
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
    if unjudged:
        lines += ["", *(f"- {line}" for line in unjudged)]
    return "\n".join(lines) + "\n"
