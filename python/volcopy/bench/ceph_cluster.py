"""A throwaway single-node Ceph: one mon and one OSD on 127.0.0.1, a private port, auth none, no mgr, the
OSD on memstore (objects held in memory), all in a temporary directory, removed after. The RBD tests
start one per session (tests/ceph_cluster.py holds their fixtures) and ``volcopy bench`` one per run of
its RBD workloads: one implementation for both, here in the package because the bench ships in it.

Pool and image work goes through the rados/rbd Python bindings (Debian's, exposed to .venv by
scripts/install-python.sh): each ``ceph`` CLI call costs about 0.5 s.

Measured on the 2-core test machine (five clusters started in a row, medians): start() 0.96 s (rbd
usable), new_pool() 0.28 s, stop_osd() 0.12 s, start_osd() 0.24 s (until healthy), stop() 0.45 s.

Settings that make it quick and keep it healthy:
- ``paxos propose interval = 0.05``: a pool is created in about 0.3 s instead of 4 s;
- no mgr: ``mon mgr mkfs grace`` is raised, or the cluster turns HEALTH_WARN after two minutes;
- size-1 pools need ``mon allow pool size one`` and ``osd pool default size = 1``;
- the mon warns when its disk has less than 30% free (a shared test machine often has), and stops
  below 5%: both are lowered, so the health the tests wait for is the OSD's;
- ``osd fast shutdown = false``: memstore keeps its objects only through a clean unmount (it saves them
  to the OSD's directory and loads them back on start), and the fast shutdown exits without one;
- ``memstore device bytes`` bounds the OSD's memory. The OSD's resident memory is about twice what its
  images hold (measured: 128 MiB written, 300 MiB resident; back to 43 MiB once the pool is deleted),
  and writes past the bound wait (the OSD is full) until the client's operation timeout. The
  ``ceph_pool`` fixture deletes its pool after each test, so the session's memory does not grow with
  the number of tests.

The daemons run in the foreground as children of the test process, so ``poll()``/``wait()`` see their
end and reap them (a daemonised one would linger as a zombie under PID 1, and ``kill -0`` would still
find it), and the kernel sends them SIGTERM if the test process dies without stopping them.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

CEPH_MON = shutil.which("ceph-mon")
CEPH_OSD = shutil.which("ceph-osd")
MONMAPTOOL = shutil.which("monmaptool")
MiB = 1 << 20
# How long the watch of a client that died (SIGKILL) outlives it (30 s by default); volcopy waits that
# long for such a watch to lapse before it calls an image in use: 3 s keeps the resume tests short.
WATCH_TIMEOUT = 3

CONFIG = """
[global]
fsid = {fsid}
mon host = {mon_host}
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = false
ms bind ipv6 = false
run dir = {directory}/run
paxos propose interval = 0.05
mon allow pool size one = true
mon allow pool delete = true
mon mgr mkfs grace = 31536000
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd client watch timeout = {watch_timeout}

[mon]
mon data = {directory}/mon-$id
log file = {directory}/log/$name.log
mon cluster log file = {directory}/log/cluster.log

[osd]
osd data = {directory}/osd-$id
log file = {directory}/log/$name.log
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd fast shutdown = false
osd op num shards = 2
osd op num threads per shard = 1

[client]
log file = {directory}/log/client.log
admin socket = {directory}/run/$name.$pid.$cctid.asok
"""

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the test process ends without stopping it."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CephCluster:
    def __init__(self, memstore_bytes: int = 512 * MiB):
        # readable by others: QEMU started by libvirt runs as another user and reads ceph.conf
        self.directory = Path(tempfile.mkdtemp(prefix="volcopy-ceph-"))
        self.directory.chmod(0o755)
        self.conf = str(self.directory / "ceph.conf")
        self.fsid = str(uuid.uuid4())
        self.port = _free_port()
        self.mon_host = f"127.0.0.1:{self.port}"
        self.memstore_bytes = memstore_bytes
        self.mon: subprocess.Popen | None = None
        self.osd: subprocess.Popen | None = None
        self.osd_uuid = str(uuid.uuid4())
        self._cluster = None  # a rados.Rados connected to the cluster, for the fixture's own work
        self._pools = 0

    # ------------------------------------------------------------ daemons

    def _spawn(self, *args: str) -> subprocess.Popen:
        with open(self.directory / "log" / "daemons.out", "ab") as out:
            return subprocess.Popen(
                list(args) + ["-f", "-c", self.conf],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )

    def _run(self, *args: str) -> None:
        done = subprocess.run(list(args) + ["-c", self.conf], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr}{done.stdout}")

    def start(self) -> None:
        (self.directory / "log").mkdir()
        (self.directory / "run").mkdir()
        Path(self.conf).write_text(
            CONFIG.format(
                fsid=self.fsid,
                mon_host=f"v2:{self.mon_host}",
                directory=self.directory,
                memstore_bytes=self.memstore_bytes,
                watch_timeout=WATCH_TIMEOUT,
            )
        )
        Path(self.conf).chmod(0o644)
        monmap = str(self.directory / "monmap")
        subprocess.run(
            [MONMAPTOOL, "--create", "--fsid", self.fsid, "--addv", "a", f"[v2:{self.mon_host}]", monmap],
            check=True,
            capture_output=True,
        )
        self._run(CEPH_MON, "--mkfs", "-i", "a", "--monmap", monmap)
        self.mon = self._spawn(CEPH_MON, "-i", "a")
        self._connect()
        # the OSD's id and uuid in the osdmap, then its (memstore) data directory
        osd_id = self._mon_command({"prefix": "osd new", "uuid": self.osd_uuid})["osdid"]
        assert osd_id == 0, osd_id
        (self.directory / "osd-0").mkdir()
        self._run(CEPH_OSD, "-i", "0", "--mkfs", "--osd-uuid", self.osd_uuid)
        self.start_osd()

    def _connect(self) -> None:
        import rados

        self._cluster = rados.Rados(conffile=self.conf)
        # never a hang: an operation on a stopped OSD fails after this long
        self._cluster.conf_set("rados_osd_op_timeout", "30")
        self._cluster.conf_set("rados_mon_op_timeout", "30")
        self._cluster.connect(timeout=30)

    def _mon_command(self, command: dict) -> dict | None:
        ret, out, err = self._cluster.mon_command(json.dumps(command | {"format": "json"}), b"", timeout=30)
        if ret != 0:
            raise RuntimeError(f"ceph {command['prefix']}: {err} ({ret})")
        return json.loads(out) if out else None

    def _osd_up(self) -> bool:
        osds = self._mon_command({"prefix": "osd dump"})["osds"]
        return bool(osds) and osds[0]["up"] == 1 and osds[0]["in"] == 1

    def start_osd(self, timeout: float = 60) -> None:
        """Starts the OSD (again, after stop_osd(): its objects are kept) and returns once it is up,
        a write and read of an object went through, and the mon reports the cluster healthy (its
        health checks lag the osdmap a little)."""
        assert self.osd is None or self.osd.poll() is not None, "the OSD is running"
        self.osd = self._spawn(CEPH_OSD, "-i", "0")
        deadline = time.monotonic() + timeout
        while not self._osd_up():
            self._wait_a_little(deadline, "come up")
        self._probe()
        while self.health() != "HEALTH_OK":
            self._wait_a_little(deadline, "become healthy")

    def _wait_a_little(self, deadline: float, what: str) -> None:
        if self.osd.poll() is not None or time.monotonic() > deadline:
            detail = self._mon_command({"prefix": "health", "detail": "detail"})
            raise RuntimeError(f"the OSD did not {what}: {detail}\n{self.log('osd.0')[-2000:]}")
        time.sleep(0.05)

    def _probe(self) -> None:
        """A write and read through the OSD: its placement groups have peered and serve I/O."""
        if "volcopy-probe" not in self._cluster.list_pools():
            self._create_pool("volcopy-probe")
        with self._cluster.open_ioctx("volcopy-probe") as ioctx:
            ioctx.write_full("probe", b"probe")
            assert ioctx.read("probe") == b"probe"

    def stop_osd(self) -> None:
        """Stops the OSD cleanly (it tells the mon it is going down, and memstore saves its objects).
        I/O to the cluster then waits until start_osd(), or fails after the client's
        rados_osd_op_timeout."""
        self._stop(self.osd)

    @staticmethod
    def _stop(process: subprocess.Popen | None, timeout: float = 30) -> None:
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Stops the OSD, then the mon (the other order leaves the OSD waiting for a mon to report its
        shutdown to), and removes everything."""
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None
        self._stop(self.osd)
        self._stop(self.mon)
        shutil.rmtree(self.directory, ignore_errors=True)

    def health(self) -> str:
        return self._mon_command({"prefix": "health"})["status"]

    def client_conf(self, **options: str) -> str:
        """A ceph.conf like ``conf`` with these client options added (say, rados_osd_op_timeout, so
        that I/O to a stopped OSD fails instead of waiting for it)."""
        lines = "".join(f"{name} = {value}\n" for name, value in options.items())
        path = self.directory / f"client-{uuid.uuid4().hex[:8]}.conf"
        path.write_text(Path(self.conf).read_text() + lines)  # the [client] section is the last one
        path.chmod(0o644)
        return str(path)

    def log(self, name: str) -> str:
        path = self.directory / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------ pools and images

    def _create_pool(self, name: str) -> None:
        import rbd

        self._cluster.create_pool(name)
        self._mon_command({"prefix": "osd pool application enable", "pool": name, "app": "rbd"})
        with self._cluster.open_ioctx(name) as ioctx:
            rbd.RBD().pool_init(ioctx, False)

    def new_pool(self) -> str:
        """A fresh pool with a unique name, ready for rbd images."""
        self._pools += 1
        name = f"volcopy-{self._pools}-{uuid.uuid4().hex[:6]}"
        self._create_pool(name)
        return name

    def delete_pool(self, name: str) -> None:
        """Removes a pool and its images, giving their memory back to the OSD."""
        self._cluster.delete_pool(name)

    def create_image(self, pool: str, name: str, size: int) -> None:
        import rbd

        with self._cluster.open_ioctx(pool) as ioctx:
            rbd.RBD().create(ioctx, name, size)

    def write(self, pool: str, image: str, offset: int, data: bytes) -> None:
        import rbd

        with self._cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image) as img:
            assert img.write(data, offset) == len(data)
            img.flush()

    def read(self, pool: str, image: str, offset: int, length: int, snapshot: str | None = None) -> bytes:
        import rbd

        with self._cluster.open_ioctx(pool) as ioctx:
            with rbd.Image(ioctx, image, snapshot=snapshot, read_only=snapshot is not None) as img:
                return img.read(offset, length)

    def snapshot(self, pool: str, image: str, snap: str) -> None:
        import rbd

        with self._cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image) as img:
            img.create_snap(snap)

    def connection_info(self, pool: str, image: str) -> dict:
        """Cinder's RBD connection_info for an image of this cluster, as its RBD driver hands it out
        (auth none here: no user, no secret)."""
        host, port = self.mon_host.rsplit(":", 1)
        return {
            "driver_volume_type": "rbd",
            "data": {
                "name": f"{pool}/{image}",
                "hosts": [host],
                "ports": [port],
                "cluster_name": "ceph",
                "auth_enabled": False,
                "auth_username": None,
                "secret_type": "ceph",
                "secret_uuid": None,
                "volume_id": f"{pool}-{image}",
            },
        }

    def spec(self, pool: str, image: str, **settings: str) -> str:
        """The image as volcopy names it, rbd:POOL/IMAGE:conf=...[:KEY=VALUE...]."""
        return f"rbd:{pool}/{image}:conf={self.conf}" + "".join(f":{k}={v}" for k, v in settings.items())

    def size(self, pool: str, image: str) -> int:
        import rbd

        with self._cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image, read_only=True) as img:
            return img.size()

    def remove_image(self, pool: str, name: str) -> None:
        """Removes an image if there is one, giving its memory back to the OSD."""
        import rbd

        with self._cluster.open_ioctx(pool) as ioctx:
            try:
                rbd.RBD().remove(ioctx, name)
            except rbd.ImageNotFound:
                pass

    def osd_io_bytes(self) -> tuple[int, int]:
        """Bytes the OSD has sent in answer to reads, and taken in with writes, so far."""
        command = json.dumps({"prefix": "perf dump", "format": "json"})
        ret, out, err = self._cluster.osd_command(0, command, b"", timeout=30)
        if ret != 0:
            raise RuntimeError(f"ceph tell osd.0 perf dump: {err} ({ret})")
        counters = json.loads(out)["osd"]
        return counters["op_r_out_bytes"], counters["op_w_in_bytes"]

    def osd_cpu_seconds(self) -> float:
        """User and system CPU the OSD has used so far (it serves every byte of every image)."""
        fields = Path(f"/proc/{self.osd.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def missing_requirements() -> str | None:
    if not (CEPH_MON and CEPH_OSD and MONMAPTOOL):
        return "needs a Ceph mon and OSD (Debian: ceph-mon ceph-osd)"
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        return (
            "needs Ceph's Python bindings in .venv "
            "(Debian python3-rados python3-rbd, then scripts/install-python.sh)"
        )
    return None
