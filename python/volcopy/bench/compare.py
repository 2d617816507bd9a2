"""volcopy against dd, qemu-img convert, nbdcopy, cp and the fio limit, on the same workloads in one run.

    volcopy bench [--rounds 5] [--scale 1.0] [--only W1,W3] [--workdir DIR]     (root: loop devices)

Every tool runs on every case in interleaved rounds (A B C A B C ...) after a warm-up round, each on a
freshly reset destination with the page cache dropped; wall time, user+sys CPU and peak RSS come from
wait4(). Every output is checked against the source's digest: a wrong copy is reported wrong, not fast.
Writes results/compare.md and results/compare.png under the benchmarks folder (or --results).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..digest import digest
from ..units import format_size
from .machine_settings import freed_memory_kept, huge_pages_for_fio
from .tools import (
    LIMIT,
    READ_FLOOR,
    TOOLS,
    WRITE_FLOOR,
    YARDSTICKS,
    Case,
    fio_start_up,
    read_floor,
    volcopy,
    volcopy_verify,
    write_floor,
)
from .workloads import make_dense, make_sparse

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


# ---------------------------------------------------------------- setting up and resetting


def _loop(path: Path, read_only: bool = False) -> str:
    args = ["losetup", "--direct-io=on", "--find", "--show"] + (["--read-only"] if read_only else [])
    return subprocess.run(args + [str(path)], check=True, capture_output=True, text=True).stdout.strip()


def _garbage(path: str, size: int) -> None:
    block = np.random.default_rng(7).bytes(64 * MiB)
    fd = os.open(path, os.O_WRONLY)
    try:
        for at in range(0, size, len(block)):
            os.pwrite(fd, block[: min(len(block), size - at)], at)
        os.fsync(fd)
    finally:
        os.close(fd)


def reset(case: Case) -> None:
    if case.dst_is_device:
        if case.garbage:
            _garbage(case.dst, case.size)
        else:  # a loop device discards by punching its backing file: it reads as zeros after
            subprocess.run(["blkdiscard", case.dst], check=True)
    else:
        if os.path.exists(case.dst):
            os.unlink(case.dst)
        with open(case.dst, "wb") as f:
            f.truncate(case.size)


def drop_caches() -> None:
    os.sync()
    if os.geteuid() == 0:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")


class Workbench:
    """Generates the sources once and owns the loop devices."""

    def __init__(self, workdir: Path, scale: float):
        self.workdir, self.scale = workdir, scale
        self.devices: list[str] = []
        self.data: dict[str, tuple[tuple[int, int], ...]] = {}  # a sparse source's data extents
        workdir.mkdir(parents=True, exist_ok=True)

    def size(self, nominal: int) -> int:
        return max(MiB, int(nominal * self.scale) // MiB * MiB)

    def source(
        self,
        name: str,
        size: int,
        allocated: float | None = None,
        allocated_bytes: int | None = None,
        directory: Path | None = None,
    ) -> tuple[str, int]:
        path = (directory or self.workdir) / name
        if allocated is None:
            if not (path.exists() and path.stat().st_size == size):
                make_dense(str(path), size)
            return str(path), size
        extents = make_sparse(str(path), size, allocated, allocated_bytes=allocated_bytes)
        self.data[str(path)] = tuple((int(offset), int(length)) for offset, length in extents)
        return str(path), sum(length for _, length in extents)

    def device(self, backing: str, size: int | None = None, read_only: bool = False) -> str:
        if size is not None:
            with open(backing, "wb") as f:
                f.truncate(size)
        device = _loop(Path(backing), read_only)
        self.devices.append(device)
        return device

    def close(self) -> None:
        for device in self.devices:
            subprocess.run(["losetup", "-d", device], check=False)


def _case(
    name: str,
    workload: str,
    src: str,
    dst: str,
    size: int,
    allocated: int,
    *,
    device: bool = False,
    garbage: bool = False,
    data: tuple[tuple[int, int], ...] = (),
) -> Case:
    return Case(
        name,
        workload,
        src,
        dst,
        size,
        allocated,
        dst_is_device=device,
        dst_zero=not garbage,
        garbage=garbage,
        file_to_file=not device,
        data=data,
    )


def make_cases(bench: Workbench, only: set[str], tmpfs: Path) -> list[Case]:
    w, cases = bench.workdir, []
    if "W1" in only:
        size = bench.size(4 * GiB)
        src, _ = bench.source("w1-src.img", size)
        cases.append(
            _case(f"W1 dense {format_size(size)} file to file", "W1", src, str(w / "w1-dst.img"), size, size)
        )
    sparse_size = bench.size(16 * GiB)
    if "W2" in only or "W3" in only:
        src, allocated = bench.source("w2-src.img", sparse_size, allocated=0.05)
        if "W2" in only:
            cases.append(
                _case(
                    f"W2 sparse {format_size(sparse_size)} (5%) file to file",
                    "W2",
                    src,
                    str(w / "w2-dst.img"),
                    sparse_size,
                    allocated,
                    data=bench.data[src],
                )
            )
        if "W3" in only:  # the W2 image behind a loop device: no SEEK_DATA, zero detection decides
            src_dev = bench.device(src, read_only=True)
            dst_dev = bench.device(str(w / "w3-dst-backing.img"), sparse_size)
            for garbage in (False, True):
                label = "garbage" if garbage else "zeroed"
                cases.append(
                    _case(
                        f"W3 sparse {format_size(sparse_size)} loop to {label} loop",
                        "W3",
                        src_dev,
                        dst_dev,
                        sparse_size,
                        allocated,
                        device=True,
                        garbage=garbage,
                        data=bench.data[src],
                    )
                )
    if "W4" in only:
        size = bench.size(2 * GiB)
        src, _ = bench.source("volcopy-bench-w4-src.img", size, directory=tmpfs)
        cases.append(
            _case(
                f"W4 dense {format_size(size)} tmpfs to tmpfs",
                "W4",
                src,
                str(tmpfs / "volcopy-bench-w4-dst.img"),
                size,
                size,
            )
        )
    if "W5" in only:  # time must follow the allocated bytes, not the size
        allocated_bytes = int(bench.size(16 * GiB) * 0.05)
        for nominal in (4, 16, 64):
            size = bench.size(nominal * GiB)
            src, allocated = bench.source(
                f"w5-sparse-{nominal}.img", size, allocated=0.0, allocated_bytes=allocated_bytes
            )
            cases.append(
                _case(
                    f"W5 sparse {format_size(size)} ({format_size(allocated)} data) file to file",
                    "W5",
                    src,
                    str(w / f"w5-sparse-{nominal}-dst.img"),
                    size,
                    allocated,
                    data=bench.data[src],
                )
            )
        for nominal in (1, 2, 4):
            size = bench.size(nominal * GiB)
            src, _ = bench.source(f"w5-dense-{nominal}.img", size)
            cases.append(
                _case(
                    f"W5 dense {format_size(size)} file to file",
                    "W5",
                    src,
                    str(w / f"w5-dense-{nominal}-dst.img"),
                    size,
                    size,
                )
            )
    for case in cases:  # fio's I/O logs go with the workloads, and are removed with them
        case.scratch = str(w)
    return cases


# ---------------------------------------------------------------- measuring


def measure(argv: list[str]) -> tuple[float, float, int, int, str]:
    """Wall seconds, user+sys CPU seconds, peak RSS bytes, exit status and stderr's end, of one command.

    The peak RSS comes from GNU time, which forks the tool from a small process: a child of this Python
    would carry Python's own peak into its count (exec keeps the old address space's high-water mark)."""
    with tempfile.NamedTemporaryFile(prefix="volcopy-bench-rss-") as rss_file:
        started = time.monotonic()
        proc = subprocess.Popen(
            ["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file.name, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        rss_kib = int((Path(rss_file.name).read_text().split() or ["0"])[-1])
    return seconds, usage.ru_utime + usage.ru_stime, rss_kib * 1024, proc.returncode, stderr.decode()[-300:]


def run_case(case: Case, tools: dict, rounds: int, results: Results, expected: str) -> None:
    runs = results.runs.setdefault(case.name, {})
    results.cases[case.name] = case
    for round_ in range(rounds + 1):  # round 0 warms up and is not recorded
        for name, tool in tools.items():
            argv = tool(case)
            if argv is None:
                continue
            reset(case)
            drop_caches()
            seconds, cpu, rss, status, stderr = measure(argv)
            correct = None
            if name in YARDSTICKS and status:  # a yardstick that failed would look fast
                raise RuntimeError(f"{name} failed on {case.name}: {stderr}")
            if name not in YARDSTICKS:
                correct = status == 0 and digest(case.dst, length=case.size) == expected
            if round_:
                runs.setdefault(name, []).append(Run(seconds, cpu, rss, correct, stderr if status else ""))
        print(f"  {case.name}: round {round_}/{rounds} done", flush=True)


# The sweep's grid: at most 32 MiB in flight, so that any of them could be a default within 64 MiB of RSS.
SWEEP_GEOMETRIES = [(bs, qd) for bs in (1, 2, 4, 8) for qd in (2, 4, 8, 16, 32) if bs * qd <= 32]


def _sweep_cases(bench: Workbench, tmpfs: Path) -> list[tuple[str, Case]]:
    """W1's case on the disk, W4's on tmpfs and, as root, W3's onto a zeroed device."""
    only = {"W1", "W4"} | ({"W3"} if os.geteuid() == 0 else set())
    cases = {case.workload: case for case in make_cases(bench, only, tmpfs) if not case.garbage}
    where = (("W1", "disk"), ("W4", "tmpfs"), ("W3", "device"))
    return [(f"{label}: {cases[w].name}", cases[w]) for w, label in where if w in cases]


def sweep(bench: Workbench, tmpfs: Path, rounds: int, memory: str) -> str:
    """volcopy alone over block sizes and queue depths, rounds interleaved over the grid."""
    lines = [
        "# Block size and queue depth sweep",
        "",
        f"`volcopy bench --sweep --rounds {rounds} --scale {bench.scale}`, "
        f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {machine()}. Each round runs `volcopy copy` once at every "
        "point of the grid (start-up included, page cache dropped, dst reset); median wall seconds and "
        "median user+sys CPU seconds of the rounds, and the highest peak RSS. The device is W3's case: "
        "a loop device (direct I/O) has no SEEK_DATA, so every byte is read and zero detection decides."
        + memory,
        "",
    ]
    for title, case in _sweep_cases(bench, tmpfs):
        runs: dict[tuple[int, int], list] = {g: [] for g in SWEEP_GEOMETRIES}
        for _ in range(rounds):
            for (block_size, depth), found in runs.items():
                reset(case)
                drop_caches()
                argv = volcopy(case, "--block-size", f"{block_size}M", "--queue-depth", str(depth))
                seconds, cpu, rss, status, stderr = measure(argv)
                if status:
                    raise RuntimeError(f"volcopy failed in the sweep ({title}): {stderr}")
                found.append((seconds, cpu, rss))
        lines += [
            f"## {title}",
            "",
            "| block size | queue depth | in flight | median s | GiB/s | CPU s | peak RSS |",
            "|---|---|---|---|---|---|---|",
        ]
        for (block_size, depth), found in runs.items():
            seconds = statistics.median(r[0] for r in found)
            lines.append(
                f"| {block_size} MiB | {depth} | {block_size * depth} MiB | {seconds:.3f} | "
                f"{case.size / GiB / seconds:.2f} | {statistics.median(r[1] for r in found):.3f} | "
                f"{format_size(max(r[2] for r in found))} |"
            )
        lines.append("")
        if not case.dst_is_device:
            os.unlink(case.src)
            os.unlink(case.dst)
    return "\n".join(lines)


def throttle_check(bench: Workbench, results: Results) -> tuple[float, float]:
    """volcopy at --rate 100M on a dense file: the measured average against the target."""
    size = bench.size(1 * GiB)
    src, _ = bench.source("w1-src.img", bench.size(4 * GiB))
    dst = str(bench.workdir / "throttle-dst.img")
    case = _case("throttle", "T", src, dst, size, size)
    reset(case)
    target = 100 * 1000 * 1000
    argv = volcopy(case, "--rate", str(target), "--length", str(size))
    seconds, *_ = measure(argv)
    return size / seconds, target


def compare(bench: Workbench, only: set[str], tmpfs: Path, rounds: int, throttle: bool):
    """Every tool on every case of the chosen workloads; then, unless told not to, the throttle."""
    results = Results()
    results.fio_start_up = statistics.median(measure(fio_start_up(str(bench.workdir)))[0] for _ in range(3))
    for case in make_cases(bench, only, tmpfs):
        expected = digest(case.src, length=case.size)
        tools = dict(TOOLS)
        if case.workload == "W4":
            tools["volcopy --verify"] = volcopy_verify
            tools[WRITE_FLOOR] = write_floor
            tools[READ_FLOOR] = read_floor
        if case.workload == "W5":  # the scaling question is volcopy's; dd would read every hole
            tools = {k: v for k, v in tools.items() if k in ("volcopy", "qemu-img", "nbdcopy", LIMIT)}
        print(f"{case.name}", flush=True)
        run_case(case, tools, rounds, results, expected)
    return results, (throttle_check(bench, results) if throttle else None)


# ---------------------------------------------------------------- the report


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


def report(results: Results, command: str, where: str, memory: str, throttle) -> str:
    lines = [
        "# volcopy against its peers",
        "",
        f"`{command}` on {time.strftime('%Y-%m-%d %H:%M')} UTC.",
        "",
        f"Machine: {machine()}. {where}. Loop devices with direct I/O. Page cache dropped before every run."
        + memory,
        "",
        "Times are wall seconds (median and min-max over the rounds); CPU is user+sys seconds per GiB of "
        "volume; RSS is the peak of the process (for volcopy, the Python interpreter included). "
        "The fio limit moves the data only (for a sparse source, its extents at their offsets); its times "
        f"include fio's own start-up, {results.fio_start_up:.3f} s (fio reading 1 MiB, median of 3). "
        "On tmpfs (W4) it runs inline on one CPU and is no limit; there are two floors instead: dd writing "
        "zeros to dst (filling dst's fresh pages, reading nothing) and a dd per CPU reading its share of src "
        "(writing nothing).",
        "",
    ]
    verdicts = []
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
        fastest = _fastest_correct_peer(runs)
        if case.workload in ("W1", "W2") and limit:
            verdicts.append(Verdict(f"{name}: volcopy / fio limit", ours / limit, 1.10))
            if fastest:
                verdicts.append(
                    Verdict(f"{name}: volcopy / fastest correct peer ({fastest[0]})", ours / fastest[1], 1.00)
                )
        floors = WRITE_FLOOR in runs and READ_FLOOR in runs
        if case.workload in ("W3", "W4") and fastest:
            verdicts.append(
                Verdict(
                    f"{name}: volcopy / fastest correct peer ({fastest[0]})",
                    ours / fastest[1],
                    0.70,
                    _median(runs[WRITE_FLOOR]) / fastest[1] if floors else None,
                )
            )
            if "qemu-img" in runs:
                qemu = _cpu(runs["qemu-img"])
                verdicts.append(
                    Verdict(
                        f"{name}: volcopy CPU / qemu-img CPU",
                        _cpu(runs["volcopy"]) / qemu,
                        0.60,
                        (_cpu(runs[WRITE_FLOOR]) + _cpu(runs[READ_FLOOR])) / qemu if floors else None,
                    )
                )
        if "volcopy --verify" in runs:
            verdicts.append(
                Verdict(
                    f"{name}: volcopy --verify / volcopy",
                    _median(runs["volcopy --verify"]) / ours,
                    1.15,
                    (ours + _median(runs[READ_FLOOR])) / ours if floors else None,
                )
            )
        verdicts.append(
            Verdict(f"{name}: volcopy peak RSS (MiB)", max(r.rss for r in runs["volcopy"]) / MiB, 64.0)
        )
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
        "Where a floor is given, it is the same ratio for the floors alone, as if a tool cost nothing but "
        "them: the write floor for wall time; the read and the write floor for CPU (a copy that hashes its "
        "data must read it into its memory and write it out); the copy plus the read floor for verify (one "
        "more read, of dst). A target below its floor is out of reach on this machine for such a copy.",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="volcopy bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every workload's size")
    parser.add_argument("--only", default="W1,W2,W3,W4,W5", help="workloads to run, e.g. W1,W3")
    parser.add_argument("--workdir", default="/var/tmp/volcopy-bench", help="on the disk to measure")
    parser.add_argument("--tmpfs", default="/dev/shm", help="a tmpfs for W4")
    parser.add_argument("--results", default="benchmarks/results", help="where compare.md and compare.png go")
    parser.add_argument("--no-throttle", action="store_true", help="skip the 100 MB/s throttle check")
    parser.add_argument("--keep", action="store_true", help="keep the generated volumes")
    parser.add_argument(
        "--sweep", action="store_true", help="only sweep volcopy's queue depth and block size"
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    workdir, tmpfs, results_dir = Path(args.workdir), Path(args.tmpfs), Path(args.results)
    tmpfs.mkdir(parents=True, exist_ok=True)
    bench = Workbench(workdir, args.scale)
    where = f"Files on {filesystem(workdir)} ({workdir}); W4 on {filesystem(tmpfs)} ({tmpfs})"
    try:
        with freed_memory_kept() as memory:
            if args.sweep:
                text = sweep(bench, tmpfs, args.rounds, memory)
            else:
                with huge_pages_for_fio() as fio_memory:
                    results, throttle = compare(bench, only, tmpfs, args.rounds, not args.no_throttle)
    finally:
        bench.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            for leftover in tmpfs.glob("volcopy-bench-*"):
                leftover.unlink()
    results_dir.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        (results_dir / "sweep.md").write_text(text)
        print(text)
        return 0
    command = "volcopy bench " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, command.strip(), where, memory + fio_memory, throttle)
    (results_dir / "compare.md").write_text(text)
    try:
        chart(results, results_dir / "compare.png")
    except ImportError:
        print("matplotlib is not installed: no chart (pip install volcopy[bench])")
    print(text)
    return 0
