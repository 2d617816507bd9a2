"""Latency of the compute handoff on both hypervisor backends, side by side: a QEMU the agent drives over
QMP, and a libvirt domain driven through libvirt's API (as on a Nova compute host). The guest writes 4 KiB
O_DIRECT blocks all along, on a disk of --size on loop devices.

    python benchmarks/compute_handoff.py [--backend qmp|libvirt|both] [--rounds 5] [--size 1G]   (root)

Each round, on each backend:
- a move at complete: start, copy with volcopy, complete, until the overlay is merged into dst;
- a move back, overlapped: start, prepare (dst given early: libvirt mirrors the overlay while the copy
  runs), copy, complete, until merged;
- a cancel of a 32 MiB overlay: start, the guest writes 32 MiB (its writer stopped meanwhile, so that
  the order of writes stays known), the writer again, cancel, until merged back into src.
Times are from request to response (and to the end of the merge), with libvirt's events and QMP's,
never polling the hypervisor. At the end the guest's volume must equal every write applied in order.
Writes results/compute_handoff.md.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import volcopy  # noqa: E402
from compute_harness import (  # noqa: E402
    BLOCK,
    INITIAL,
    SERVER,
    TOKEN,
    Agent,
    Guest,
    LibvirtGuest,
    local,
    server_entry,
    start_libvirt_daemons,
    stop_daemons,
    wait_for,
)
from volcopy.compute import NovaCompute  # noqa: E402

MiB = 1 << 20
CANCEL_OVERLAY = 32 * MiB
RESULTS = Path(__file__).resolve().parent / "results" / "compute_handoff.md"
MEASURES = [
    ("start (request to response)", "start"),
    ("complete at complete (request to response)", "complete"),
    ("... until the overlay is merged into dst", "complete_merged"),
    ("prepare (request to response)", "prepare"),
    ("overlapped complete (request to response)", "overlapped"),
    ("... until the overlay is merged into dst", "overlapped_merged"),
    ("cancel of a 32 MiB overlay (request to response)", "cancel"),
    ("... until it is merged back into src", "cancel_merged"),
]


def loop_device(path: Path, size: int, byte: int) -> str:
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(bytes([byte]) * (64 * MiB))
    return subprocess.run(
        ["losetup", "--direct-io=on", "--find", "--show", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def timed(call):
    t0 = time.monotonic()
    result = call()
    return result, time.monotonic() - t0


class Run:
    """One backend's guest and agent, and the times of its rounds."""

    def __init__(self, backend: str, workdir: Path, volumes: list[str], size: int):
        guest_class = LibvirtGuest if backend == "libvirt" else Guest
        self.guest = guest_class(workdir, backend, volumes[0], size)
        self.volumes, self.on, self.moves = volumes, 0, 0
        self.times: dict[str, list[float]] = {key: [] for _, key in MEASURES}
        self.overlays: list[int] = []
        self.agent: Agent | None = None
        self.compute: NovaCompute | None = None

    def start(self, workdir: Path) -> None:
        self.guest.start()
        self.agent = Agent(workdir, {SERVER: server_entry(self.guest, self.attachment)})
        self.agent.start()
        self.compute = NovaCompute(endpoint=self.agent.url, token=TOKEN)
        self.guest.start_writer()

    @property
    def attachment(self) -> str:
        return f"att-{self.moves}"

    def _wait(self, attachment: str, state: str, since: float) -> float:
        wait_for(
            lambda: self.compute.migration_state(SERVER, attachment)["state"] == state,
            timeout=600,
            interval=0.005,
            what=state,
        )
        return time.monotonic() - since

    def move(self, overlapped: bool) -> None:
        src, dst = self.volumes[self.on], self.volumes[1 - self.on]
        src_att, dst_att = self.attachment, f"att-{self.moves + 1}"
        answer, took = timed(lambda: self.compute.migration_start(SERVER, src_att))
        self.times["start"].append(took)
        generation = answer["generation"]
        if overlapped:
            _, took = timed(
                lambda: self.compute.migration_prepare(SERVER, src_att, dst_att, local(dst), generation)
            )
            self.times["prepare"].append(took)
        volcopy.copy(src, dst)
        t0 = time.monotonic()
        self.compute.migration_complete(SERVER, src_att, dst_att, local(dst), generation)
        kind = "overlapped" if overlapped else "complete"
        self.times[kind].append(time.monotonic() - t0)
        self.times[f"{kind}_merged"].append(self._wait(src_att, "completed", t0))
        self.on, self.moves = 1 - self.on, self.moves + 1

    def cancel(self) -> None:
        generation = self.compute.migration_start(SERVER, self.attachment)["generation"]
        self.guest.stop_writer()
        self.guest.fill(0, CANCEL_OVERLAY // BLOCK, 0x5A)
        self.guest.start_writer()
        self.overlays.append(
            self.compute.migration_state(SERVER, self.attachment)["bytes_written_since_start"]
        )
        t0 = time.monotonic()
        self.compute.migration_cancel(SERVER, self.attachment, generation)
        self.times["cancel"].append(time.monotonic() - t0)
        self.times["cancel_merged"].append(self._wait(self.attachment, "cancelled", t0))

    def finish(self, size: int) -> tuple[int, int, bool]:
        """(writes, I/O errors, the volume equals every write applied in order)."""
        self.guest.stop_writer()
        writes, errors, model = len(self.guest.writes), len(self.guest.errors), self.guest.model
        self.stop()
        with open(self.volumes[self.on], "rb") as f:
            return writes, errors, f.read(size) == model

    def stop(self) -> None:
        if self.agent:
            self.agent.stop()
        self.guest.stop()


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values) * 1000:.0f} ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["qmp", "libvirt", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", default="1G")
    args = parser.parse_args()
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1]]
    backends = ["qmp", "libvirt"] if args.backend == "both" else [args.backend]

    daemons = start_libvirt_daemons() if "libvirt" in backends else []
    summaries = {}
    try:
        for backend in backends:
            workdir = Path(tempfile.mkdtemp(prefix=f"volcopy-handoff-{backend}-"))
            volumes = [
                loop_device(workdir / "a.img", size, INITIAL),
                loop_device(workdir / "b.img", size, 0x3C),
            ]
            run = Run(backend, workdir, volumes, size)
            try:
                run.start(workdir)
                for round_ in range(args.rounds):
                    run.move(overlapped=False)
                    run.move(overlapped=True)
                    run.cancel()
                    print(
                        f"{backend} round {round_}: "
                        + ", ".join(
                            f"{key} {values[-1] * 1000:.0f} ms" for key, values in run.times.items() if values
                        ),
                        flush=True,
                    )
                summaries[backend] = (run, *run.finish(size))
            finally:
                run.stop()
                for device in volumes:
                    subprocess.run(["losetup", "-d", device], check=False)
                shutil.rmtree(workdir)
    finally:
        stop_daemons(daemons)

    lines = [
        "# Compute handoff latency, QMP and libvirt",
        "",
        f"`python benchmarks/compute_handoff.py --backend {args.backend} --rounds {args.rounds} "
        f"--size {args.size}`, {time.strftime('%Y-%m-%d')}, {platform.node()}, kernel "
        f"{platform.release()}, {os.cpu_count()} CPUs; QEMU with TCG (nested KVM hangs the guest here), "
        f"disk {args.size} on loop devices with direct I/O, the guest writing 4 KiB O_DIRECT blocks all "
        "along. Milliseconds: median (min-max).",
        "",
        "| ms | " + " | ".join(backends) + " |",
        "|---|" + "---|" * len(backends),
    ]
    for label, key in MEASURES:
        lines.append(f"| {label} | " + " | ".join(cell(summaries[b][0].times[key]) for b in backends) + " |")
    lines.append(
        "| overlay at cancel, MiB (median) | "
        + " | ".join(f"{statistics.median(summaries[b][0].overlays) / MiB:.1f}" for b in backends)
        + " |"
    )
    lines.append("")
    for backend in backends:
        _, writes, errors, correct = summaries[backend]
        lines.append(
            f"{backend}: guest writes completed {writes}; guest I/O errors {errors}; final volume equals "
            f"every write applied in order: {correct}."
        )
    lines.append("")
    report = "\n".join(lines)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
