"""volcopy against dd, qemu-img convert, nbdcopy, cp and the fio limit, on the same workloads in one run.

    volcopy bench [--rounds 5] [--scale 1.0] [--only W1,W3] [--workdir DIR]     (root: loop devices)
    volcopy bench --only R1,R2,R3,R4 [--rounds 3]          (Ceph RBD: a single-node cluster for the run)

Every tool runs on every case in interleaved rounds (A B C A B C ...) after a warm-up round, each on a
freshly reset destination with the page cache dropped (W1-hot and part-hot then read all or half of src
back into it, as a source just written or downloaded would be; W7, a command's start-up, keeps it); wall
time, user+sys CPU and peak RSS come from wait4(). Every output is checked against the source's digest:
a wrong copy is reported wrong, not fast.
Writes results/compare.md and results/compare.png under the benchmarks folder (or --results).

R1-R4 are the same on Ceph RBD (rbd_compare.py): RBD to RBD with 5% data (R1) and dense (R2), file to
RBD (R3), RBD to file (R4), against rbd export | import, rbd deep cp, qemu-img's rbd driver and Cinder's
own path, on a single-node Ceph the harness starts; they go to results/rbd.md and rbd.png.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

from ..digest import digest
from . import rbd_compare, rbd_report
from .machine_settings import freed_memory_kept, huge_pages_for_fio
from .report import Results, Run, chart, filesystem, report
from .sweep import sweep
from .tools import (
    ARGPARSE_FLOOR,
    DISK_READ_FLOOR,
    LIMIT,
    PYTHON_FLOOR,
    READ_FLOOR,
    TOOLS,
    W7_MORE_ROUNDS,
    WRITE_FLOOR,
    YARDSTICKS,
    Case,
    disk_read_floor,
    fio_start_up,
    python_parses_copy,
    python_start_up,
    read_floor,
    volcopy,
    volcopy_as_typed,
    volcopy_verify,
    write_floor,
)
from .workbench import Workbench, build_case, drop_caches, make_cases, measure, reset, warm

GiB = 1 << 30
FILE_WORKLOADS = ("W1", "W1-hot", "part-hot", "W2", "W3", "W4", "W5", "W6", "W7")
VERIFIED = ("W1", "W2", "W3", "W4")  # workloads also run with volcopy --verify


def run_case(case: Case, tools: dict, rounds: int, results: Results, expected: str) -> None:
    runs = results.runs.setdefault(case.name, {})
    results.cases[case.name] = case
    for round_ in range(rounds + 1):  # round 0 warms up and is not recorded
        for name, tool in tools.items():
            argv = tool(case)
            if argv is None:
                continue
            reset(case)
            # W7 times the commands' own start-up as on a host that has run them before: with the cache
            # dropped it would time the disk reading their programs (Python's modules most of all)
            if case.workload != "W7":
                drop_caches()
            if case.resident:
                warm(case)
            seconds, cpu, rss, status, stderr = measure(argv)
            correct = None
            if name in YARDSTICKS and status:  # a yardstick that failed would look fast
                raise RuntimeError(f"{name} failed on {case.name}: {stderr}")
            if name not in YARDSTICKS:
                correct = status == 0 and digest(case.dst, length=case.size) == expected
            if round_:
                runs.setdefault(name, []).append(Run(seconds, cpu, rss, correct, stderr if status else ""))
        print(f"  {case.name}: round {round_}/{rounds} done", flush=True)


def throttle_check(bench: Workbench) -> tuple[float, float]:
    """volcopy at --rate 100M on a dense file: the measured average against the target."""
    size = bench.size(1 * GiB)
    src, _ = bench.source("w1-src.img", bench.size(4 * GiB))
    dst = str(bench.workdir / "throttle-dst.img")
    case = build_case("throttle", "T", src, dst, size, size)
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
        if case.workload in VERIFIED:
            tools["volcopy --verify"] = volcopy_verify
            if case.workload != "W4":
                tools[DISK_READ_FLOOR] = disk_read_floor
        if case.workload == "W4":
            tools[WRITE_FLOOR] = write_floor
            tools[READ_FLOOR] = read_floor
        if case.resident:  # the fio limit reads src from the disk: not the yardstick of a cached source
            tools.pop(LIMIT)
        if case.workload == "W6":  # dd would read 8 TiB of holes
            tools.pop("dd")
        if case.workload == "W5":  # the scaling question is volcopy's; dd would read every hole
            tools = {k: v for k, v in tools.items() if k in ("volcopy", "qemu-img", "nbdcopy", LIMIT)}
        if case.workload == "W7":  # fio's start-up alone is ten times a command's target: no yardstick
            tools.pop(LIMIT)
            tools["volcopy"] = volcopy_as_typed
            tools[PYTHON_FLOOR] = python_start_up
            tools[ARGPARSE_FLOOR] = python_parses_copy
        print(f"{case.name}", flush=True)
        run_case(case, tools, rounds * W7_MORE_ROUNDS if case.workload == "W7" else rounds, results, expected)
    return results, (throttle_check(bench) if throttle else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="volcopy bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every workload's size")
    parser.add_argument(
        "--only",
        default=",".join(FILE_WORKLOADS),
        help=f"workloads to run, of {','.join(FILE_WORKLOADS)}, or R1,R2,R3,R4 (Ceph RBD)",
    )
    parser.add_argument("--workdir", default="/var/tmp/volcopy-bench", help="on the disk to measure")
    parser.add_argument("--tmpfs", default="/dev/shm", help="a tmpfs for W4")
    parser.add_argument(
        "--results",
        default="benchmarks/results",
        help="where the reports go (compare.md, rbd.md, sweep.md, and charts)",
    )
    parser.add_argument("--no-throttle", action="store_true", help="skip the 100 MB/s throttle check")
    parser.add_argument("--keep", action="store_true", help="keep the generated volumes")
    parser.add_argument(
        "--sweep", action="store_true", help="only sweep volcopy's queue depth and block size"
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - {*FILE_WORKLOADS, *rbd_compare.RBD_WORKLOADS}
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    rbd_only, file_only = only & set(rbd_compare.RBD_WORKLOADS), only - set(rbd_compare.RBD_WORKLOADS)
    workdir, tmpfs, results_dir = Path(args.workdir), Path(args.tmpfs), Path(args.results)
    tmpfs.mkdir(parents=True, exist_ok=True)
    bench = Workbench(workdir, args.scale)
    where = f"Files on {filesystem(workdir)} ({workdir}); W4 on {filesystem(tmpfs)} ({tmpfs})"
    command = "volcopy bench " + " ".join(argv if argv is not None else sys.argv[1:])
    texts, charts = {}, {}  # file name -> report text; file name -> results to chart
    try:
        with freed_memory_kept() as memory:
            if args.sweep:
                texts["sweep.md"] = sweep(bench, tmpfs, args.rounds, memory)
            if rbd_only and not args.sweep:
                rbd_results = rbd_compare.run(bench, rbd_only, args.rounds)
                where_rbd = f"Files on {filesystem(workdir)} ({workdir})"
                texts["rbd.md"] = rbd_report.report(rbd_results, command.strip(), where_rbd, memory)
                charts["rbd.png"] = rbd_results
            if file_only and not args.sweep:
                with huge_pages_for_fio() as fio_memory:
                    results, throttle = compare(bench, file_only, tmpfs, args.rounds, not args.no_throttle)
                texts["compare.md"] = report(results, command.strip(), where, memory + fio_memory, throttle)
                charts["compare.png"] = results
    finally:
        bench.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            for leftover in tmpfs.glob("volcopy-bench-*"):
                leftover.unlink()
    results_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (results_dir / name).write_text(text)
        print(text)
    for name, results in charts.items():
        try:
            chart(results, results_dir / name)
        except ImportError:
            print("matplotlib is not installed: no chart (pip install volcopy[bench])")
            break
    return 0
