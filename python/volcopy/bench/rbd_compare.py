"""The RBD workloads of ``volcopy bench``, on a single-node Ceph the harness starts for them:

    R1  RBD to RBD, a 4 GiB image with 5% data        R3  file to RBD, the same two volumes
    R2  RBD to RBD, a dense 1 GiB image                 R4  RBD to file, the same two volumes

Every tool in rbd_tools.py runs on every case in interleaved rounds after a warm-up round, each onto a
fresh dst (removed and, unless the tool makes its own, created empty again), with the page cache
dropped. Every output is checked against the source's digest. Beside the tool's own wall time, CPU and
RSS, each run records the CPU the OSD spent meanwhile: the cluster runs on the same CPUs as the tools.

A source image is imported from its generated file with ``rbd import`` (not with the tool under test)
and checked against the file's digest; it and dst are removed after their case, so that the OSD, which
holds every object in memory, only ever holds one case's images.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from ..digest import digest
from ..rbd_volume import RBDSpec, is_rbd, parse
from ..units import format_size
from .ceph_cluster import CephCluster, missing_requirements
from .rbd_tools import TOOLS, YARDSTICKS, RBDCase, Tool
from .report import Run
from .workbench import Workbench, drop_caches, measure

GiB = 1 << 30
MiB = 1 << 20
RBD_WORKLOADS = ("R1", "R2", "R3", "R4")
PEERS = ("rbd", "qemu-img", "fio", "/usr/bin/time")


@dataclass
class RBDRun(Run):
    """A run, and what the OSD did meanwhile: it serves every byte, on the same CPUs as the tool."""

    osd_cpu: float = 0.0  # seconds
    osd_read: int = 0  # bytes sent in answer to reads
    osd_written: int = 0  # bytes taken in with writes


@dataclass
class RBDResults:
    runs: dict[str, dict[str, list[RBDRun]]] = field(default_factory=dict)  # case -> tool -> runs
    cases: dict[str, RBDCase] = field(default_factory=dict)
    load: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = field(
        default_factory=dict
    )  # case -> load averages at its start and its end
    cluster: str = ""


def missing_tools() -> str | None:
    """What the RBD workloads need and this machine lacks, or None."""
    missing = missing_requirements()
    if missing:
        return missing
    absent = [tool for tool in PEERS if shutil.which(tool) is None]
    if absent:
        return "needs the peers: " + ", ".join(absent) + " (Debian ceph-common, qemu-utils, fio, time)"
    qemu = subprocess.run(["qemu-img", "--help"], capture_output=True, text=True).stdout
    if " rbd " not in qemu:
        return "needs QEMU's rbd block driver (Debian qemu-block-extra)"
    if importlib.util.find_spec("os_brick") is None:  # found, not imported: it drags eventlet in
        return "needs os-brick for Cinder's path (pip install volcopy[openstack])"
    return None


def memstore_bytes(bench: Workbench) -> int:
    """The OSD's bound: the largest case's src and a dst written in full (Cinder's path writes every
    byte, zeros included), and room to spare."""
    return 2 * bench.size(4 * GiB) + 512 * MiB


def _image(pool: str, name: str, conf: str) -> str:
    return str(RBDSpec(pool, "", name, conf=conf))


def make_cases(
    bench: Workbench, only: set[str], cluster: CephCluster, src_pool: str, dst_pool: str
) -> list[RBDCase]:
    """The cases of the chosen workloads, each with its source file generated (an image's source file
    is imported into src_pool before its case)."""
    w, cases, conf = bench.workdir, [], cluster.conf
    fio_conf = cluster.client_conf(rbd_cache="false")
    sparse_size, dense_size = bench.size(4 * GiB), bench.size(1 * GiB)
    volumes = []
    if only & {"R1", "R3", "R4"}:
        path, allocated = bench.source("rbd-sparse.img", sparse_size, allocated=0.05)
        volumes.append(("sparse", path, sparse_size, allocated, f"{format_size(sparse_size)} (5%)"))
    if only & {"R2", "R3", "R4"}:
        path, _ = bench.source("rbd-dense.img", dense_size)
        volumes.append(("dense", path, dense_size, dense_size, f"dense {format_size(dense_size)}"))
    for kind, path, size, allocated, label in volumes:
        image = _image(src_pool, f"src-{kind}", conf)
        dense = kind == "dense"
        directions = {
            "R1": (not dense, image, _image(dst_pool, "dst", conf), "RBD to RBD"),
            "R2": (dense, image, _image(dst_pool, "dst", conf), "RBD to RBD"),
            "R3": (True, path, _image(dst_pool, "dst", conf), "file to RBD"),
            "R4": (True, image, str(w / f"rbd-{kind}-dst.img"), "RBD to file"),
        }
        for workload, (applies, src, dst, how) in directions.items():
            if workload in only and applies:
                name = f"{workload} {label} {how}"
                case = RBDCase(
                    name, workload, src, dst, size, allocated, dense, generated=path, fio_conf=fio_conf
                )
                cases.append(case)
    order = {w: i for i, w in enumerate(RBD_WORKLOADS)}
    return sorted(cases, key=lambda c: (order[c.workload], not c.dense))


def reset(cluster: CephCluster, case: RBDCase, tool: Tool) -> None:
    """dst removed, and created empty again unless the tool makes its own."""
    spec = case.dst_rbd
    if spec:
        cluster.remove_image(spec.pool, spec.image)
        if not tool.makes_dst:
            cluster.create_image(spec.pool, spec.image, case.size)
        return
    if os.path.exists(case.dst):
        os.unlink(case.dst)
    if not tool.makes_dst:
        with open(case.dst, "wb") as f:
            f.truncate(case.size)


def import_source(cluster: CephCluster, spec: RBDSpec, path: str) -> None:
    """The generated file as an image, by ``rbd import`` (which leaves runs of zeros unallocated)."""
    cluster.remove_image(spec.pool, spec.image)
    subprocess.run(
        ["rbd", "-c", spec.conf, "import", "--no-progress", path, spec.image_spec],
        check=True,
        capture_output=True,
    )


def run_case(cluster: CephCluster, case: RBDCase, rounds: int, results: RBDResults, expected: str) -> None:
    runs = results.runs.setdefault(case.name, {})
    results.cases[case.name] = case
    for round_ in range(rounds + 1):  # round 0 warms up and is not recorded
        for name, tool in TOOLS.items():
            argv = tool.command(case)
            if argv is None:
                continue
            reset(cluster, case, tool)
            drop_caches()
            cpu_before, (read_before, written_before) = cluster.osd_cpu_seconds(), cluster.osd_io_bytes()
            seconds, cpu, rss, status, stderr = measure(argv)
            osd_cpu, (read, written) = cluster.osd_cpu_seconds() - cpu_before, cluster.osd_io_bytes()
            correct = None
            if name in YARDSTICKS and status:  # a yardstick that failed would look fast
                raise RuntimeError(f"{name} failed on {case.name}: {stderr}")
            if name not in YARDSTICKS:
                correct = status == 0 and digest(case.dst, length=case.size) == expected
            if round_:
                error = stderr if status else ""
                osd = (osd_cpu, read - read_before, written - written_before)
                runs.setdefault(name, []).append(RBDRun(seconds, cpu, rss, correct, error, *osd))
        print(f"  {case.name}: round {round_}/{rounds} done", flush=True)


def compare(cluster: CephCluster, bench: Workbench, only: set[str], rounds: int) -> RBDResults:
    results = RBDResults()
    src_pool, dst_pool = cluster.new_pool(), cluster.new_pool()
    for case in make_cases(bench, only, cluster, src_pool, dst_pool):
        source = case.src_rbd
        if source:
            import_source(cluster, source, case.generated)
        expected = digest(case.src, length=case.size)
        if source and expected != digest(case.generated, length=case.size):
            raise RuntimeError(f"{case.src} does not hold what rbd import was given ({case.generated})")
        print(case.name, flush=True)
        started = os.getloadavg()
        run_case(cluster, case, rounds, results, expected)
        results.load[case.name] = (started, os.getloadavg())
        for name in (case.src, case.dst):
            if is_rbd(name):
                spec = parse(name)
                cluster.remove_image(spec.pool, spec.image)
            elif name == case.dst and os.path.exists(name):
                os.unlink(name)
    cluster.delete_pool(src_pool)
    cluster.delete_pool(dst_pool)
    return results


def run(bench: Workbench, only: set[str], rounds: int) -> RBDResults:
    """Starts the cluster, compares, stops it."""
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"the RBD workloads {missing}")
    cluster = CephCluster(memstore_bytes=memstore_bytes(bench))
    try:
        cluster.start()
        results = compare(cluster, bench, only, rounds)
        results.cluster = cluster_description(cluster)
        return results
    finally:
        cluster.stop()


def cluster_description(cluster: CephCluster) -> str:
    version = subprocess.run(["ceph-osd", "--version"], capture_output=True, text=True).stdout.split()
    release = " ".join(version[2:3] + version[4:5]) if len(version) > 4 else "unknown version"
    return (
        f"Ceph {release}: one mon and one OSD on 127.0.0.1 (memstore, objects held in the OSD's memory, "
        f"bound {format_size(cluster.memstore_bytes)}; 2 op shards x 1 thread), size-1 pools, no cephx, "
        "the cluster's default image features and 4 MiB objects"
    )
