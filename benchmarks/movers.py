"""The data movers at scale, on this host: aggregate throughput with 1, 2 and 4 movers, the scheduling
overhead per job, and the time a takeover takes.

    python benchmarks/movers.py [--rounds 3] [--size 64M] [--bandwidth 32M]   (root: PostgreSQL as postgres)

Redis and PostgreSQL are started as the tests start them (tests/redis_server.py, postgres_server.py),
and every mover is a `volcopy mover` process (tests/mover_processes.py) with one slot and a bandwidth
budget of --bandwidth, so that the scaling is measured apart from this machine's CPUs: N movers should
give about N x one mover's budget. The volumes are files on a tmpfs.

- **Throughput.** For 1, 2 and 4 movers: 2 migrations per mover, submitted at once
  (``Migrator(fleet_url=...).submit``); the aggregate is their bytes over the time from the first submit
  to the last completion.
- **Submit to first byte.** For each migration: from the submit() call to its copy step's start in the
  journal (the mover has claimed the job, taken the migration's lock, and opens the volumes).
- **Takeover.** One migration of 4 x --size on mover-a, SIGKILLed once it is half copied (the engine
  has saved a checkpoint by then: one every 2 s); mover-b takes it over. Times from the kill to mover-b's
  claim, and to its copy step's start; and the bytes copied again (at most the 2 s between checkpoints,
  and the second that bytes_done may lag).

Writes results/movers.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from postgres_server import PostgresServer  # noqa: E402

from compute_harness import wait_for  # noqa: E402
from mover_processes import CLAIM_EXPIRY, MoverProcesses, coordination_url  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from volcopy.migration.migrator import Migrator  # noqa: E402
from volcopy.units import format_size, parse_size  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "movers.md"
MOVER_COUNTS = (1, 2, 4)
JOBS_PER_MOVER = 2


def fleet(workdir: Path, redis, postgres, label: str) -> tuple[MoverProcesses, Migrator]:
    """Movers (none started yet) and a Migrator of a group and a journal of their own."""
    journal = postgres.new_database()
    group = f"bench-{label}-{os.urandom(3).hex()}"
    migrator = Migrator(
        journal,
        checkpoint_dir=str(workdir / "checkpoints"),
        fleet_url=coordination_url(redis.url),
        fleet_group=group,
    )
    return MoverProcesses(workdir, redis, group, journal=journal), migrator


def stop(processes: MoverProcesses, migrator: Migrator, workdir: Path) -> None:
    migrator.close()
    processes.stop_all()
    for path in workdir.glob("*.img"):
        path.unlink()


def copy_started_at(migrator: Migrator, migration_id: str, run: int = 0) -> float | None:
    copies = [s for s in migrator.steps(migration_id) if s.name == "copy"]
    return copies[run].intended_at.timestamp() if len(copies) > run else None


def throughput_round(workdir: Path, redis, postgres, movers: int, size: int, bandwidth: int) -> dict:
    processes, migrator = fleet(workdir, redis, postgres, str(movers))
    try:
        for number in range(movers):
            processes.start(f"mover-{number}", ["file"], slots=1, bandwidth=str(bandwidth), wait=False)
        for mover in processes.started:
            mover.wait_joined()
        jobs = movers * JOBS_PER_MOVER
        for number in range(jobs):
            (workdir / f"src-{number}.img").write_bytes(os.urandom(size))
        submitted = []
        began = time.time()
        for number in range(jobs):
            at = time.time()
            m = migrator.submit(str(workdir / f"src-{number}.img"), str(workdir / f"dst-{number}.img"))
            submitted.append((m.id, at))
        wait_for(
            lambda: all(migrator.status(i).finished for i, _ in submitted), 600, 0.1, "the migrations ended"
        )
        ended = max(migrator.status(i).finished_at.timestamp() for i, _ in submitted)
        for migration_id, _ in submitted:
            assert migrator.status(migration_id).state == "completed", migrator.status(migration_id).reason
        first_byte = [copy_started_at(migrator, i) - at for i, at in submitted]
        # the first wave: a job that waited for a busy mover's slot waited for the copy before it too
        return {
            "rate": jobs * size / (ended - began),
            "first_byte": sorted(first_byte)[:movers],
        }
    finally:
        stop(processes, migrator, workdir)


def takeover_round(workdir: Path, redis, postgres, size: int, bandwidth: int) -> dict:
    processes, migrator = fleet(workdir, redis, postgres, "takeover")
    try:
        first = processes.start("mover-a", ["file"], slots=1, bandwidth=str(bandwidth))
        (workdir / "src.img").write_bytes(os.urandom(size))
        m = migrator.submit(str(workdir / "src.img"), str(workdir / "dst.img"))
        processes.start("mover-b", ["file"], slots=1, bandwidth=str(bandwidth))
        wait_for(lambda: migrator.status(m.id).bytes_done >= size // 2, 120, what="half copied")
        done_at_kill = migrator.status(m.id).bytes_done
        first.kill()
        killed = time.time()
        wait_for(lambda: migrator.journal.placement(m.id).run_by == "mover-b", 120, what="taken over")
        claimed = time.time()
        copying = wait_for(lambda: copy_started_at(migrator, m.id, run=1), 120, what="copying again")
        ended = wait_for(lambda: (s := migrator.status(m.id)).finished and s, 600, what="ended")
        assert ended.state == "completed", ended.reason
        return {
            "claimed": claimed - killed,
            "copying": copying - killed,
            "again": max(0, done_at_kill - ended.resumed_from),
        }
    finally:
        stop(processes, migrator, workdir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=parse_size, default=parse_size("64M"), help="each migration's volume")
    parser.add_argument("--bandwidth", type=parse_size, default=parse_size("32M"), help="each mover's budget")
    args = parser.parse_args()

    redis, postgres = RedisServer(), PostgresServer()
    redis.start()
    postgres.start()
    tmpfs = Path(tempfile.mkdtemp(prefix="volcopy-bench-movers-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", str(tmpfs)], check=True)
    rates: dict[int, list[float]] = {n: [] for n in MOVER_COUNTS}
    first_bytes: list[float] = []
    takeovers: list[dict] = []
    try:
        for round_number in range(args.rounds):
            for movers in MOVER_COUNTS:
                found = throughput_round(tmpfs, redis, postgres, movers, args.size, args.bandwidth)
                rates[movers].append(found["rate"])
                first_bytes += found["first_byte"]
                print(
                    f"round {round_number + 1}: {movers} mover(s): {format_size(found['rate'])}/s", flush=True
                )
            takeovers.append(takeover_round(tmpfs, redis, postgres, 4 * args.size, args.bandwidth))
            print(f"round {round_number + 1}: takeover {takeovers[-1]}", flush=True)
    finally:
        subprocess.run(["umount", "-l", str(tmpfs)], check=False)
        redis.stop()
        postgres.stop()

    one = statistics.median(rates[1])
    lines = [
        "# Data movers: throughput, scheduling overhead, takeover",
        "",
        f"`python benchmarks/movers.py {' '.join(sys.argv[1:])}` on {platform.node()} ({os.cpu_count()} "
        "CPUs), "
        f"{time.strftime('%Y-%m-%d')}. Every mover has 1 slot and a budget of "
        f"{format_size(args.bandwidth)}/s; {JOBS_PER_MOVER} migrations of {format_size(args.size)} per "
        "mover, files on a tmpfs; Redis and PostgreSQL on this host. Medians of the rounds (min-max).",
        "",
        "| movers | aggregate | vs 1 mover | ideal |",
        "| --- | --- | --- | --- |",
    ]
    for movers in MOVER_COUNTS:
        median = statistics.median(rates[movers])
        lines.append(
            f"| {movers} | {format_size(median)}/s ({format_size(min(rates[movers]))}/s-"
            f"{format_size(max(rates[movers]))}/s) | {median / one:.2f} x | {movers} x |"
        )
    lines += [
        "",
        "| measure | median | min | max |",
        "| --- | --- | --- | --- |",
        _row("submit to first byte (s), the first wave of each run", first_bytes),
        _row("takeover: kill to the other mover's claim (s)", [t["claimed"] for t in takeovers]),
        _row("takeover: kill to its copy's start (s)", [t["copying"] for t in takeovers]),
        _row("takeover: bytes copied again (MiB)", [t["again"] / (1 << 20) for t in takeovers]),
        "",
        f"The claim expiry is {CLAIM_EXPIRY:g} s and the membership timeout 2 s (tests/mover_processes.py): "
        "a takeover waits for the claim to lapse, then for the next conductor round (0.5 s). The claim is "
        "seen by polling the journal for the new mover's name, written once it holds the migration's "
        "lock, just before its copy starts: the two takeover times are one moment seen twice.",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _row(name: str, values: list[float]) -> str:
    return f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"


if __name__ == "__main__":
    sys.exit(main())
