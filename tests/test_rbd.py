"""RBD images as volumes, through the native core's librbd endpoint, on a real single-node Ceph
(tests/ceph_cluster.py): every direction among file, block device and image, thin images, a garbage
dst, snapshots, one image under two spellings, resume after SIGKILL, an OSD stopped mid-copy, and bad
names."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import volcopy
from conftest import MiB, needs_root, needs_root_for_loop, read_all, reference_digest

SIZE = 64 * MiB
OBJECT = 4 * MiB  # rbd's default object size
# About 5% data: whole and partial MiBs at odd places, one run crossing an object boundary, and a
# zero run written inside an allocated object (read, found zero, not written as data).
DATA = [(0, MiB), (9 * MiB + 4096, 12288), (OBJECT * 5 - 512 * 1024, MiB), (40 * MiB, MiB // 2)]
ZEROS_WRITTEN = (41 * MiB, MiB)


def rbd(ceph, pool: str, image: str, *settings: str) -> str:
    return ":".join([f"rbd:{pool}/{image}", f"conf={ceph.conf}", *settings])


def layout(seed: int = 7) -> bytes:
    rng = np.random.default_rng(seed)
    content = bytearray(SIZE)
    for offset, length in DATA:
        content[offset : offset + length] = rng.bytes(length)
    return bytes(content)


def write_image(ceph, pool: str, image: str, content: bytes) -> None:
    ceph.create_image(pool, image, len(content))
    for offset, length in [*DATA, ZEROS_WRITTEN]:
        ceph.write(pool, image, offset, content[offset : offset + length])


def allocated_objects(extents) -> set[int]:
    return {
        o for offset, length in extents for o in range(offset // OBJECT, (offset + length - 1) // OBJECT + 1)
    }


@pytest.fixture
def second_pool(ceph):
    pool = ceph.new_pool()
    yield pool
    ceph.delete_pool(pool)


@pytest.fixture(scope="module")
def content():
    return layout()


@pytest.fixture
def source_image(ceph, ceph_pool, content):
    write_image(ceph, ceph_pool, "src", content)
    return rbd(ceph, ceph_pool, "src")


# ---------------------------------------------------------------- directions


def test_an_image_is_read_by_its_allocated_objects_only(ceph, ceph_pool, source_image, content):
    extents = volcopy.extents(source_image)
    objects = allocated_objects(extents)

    assert objects == allocated_objects([*DATA, ZEROS_WRITTEN])
    assert volcopy.digest(source_image) == reference_digest(content)
    result = volcopy.copy(source_image, rbd(ceph, ceph_pool, "dst"))
    assert result.bytes_read == len(objects) * OBJECT
    assert result.bytes_skipped == SIZE - len(objects) * OBJECT
    assert result.bytes_zero >= ZEROS_WRITTEN[1]
    assert result.digest == reference_digest(content)


@pytest.mark.parametrize(
    "dst_kind",
    ["new image", "garbage image", "file", pytest.param("block device", marks=needs_root_for_loop)],
)
def test_image_to_each_kind(ceph, ceph_pool, second_pool, source_image, content, dst_kind, tmp_path, request):
    if dst_kind == "file":
        dst = tmp_path / "dst.img"
    elif dst_kind == "block device":
        dst = request.getfixturevalue("loops").create(SIZE, garbage=True)
    else:
        dst = rbd(ceph, second_pool, "dst")
        if dst_kind == "garbage image":
            ceph.create_image(second_pool, "dst", SIZE)
            garbage = np.random.default_rng(3).bytes(SIZE)
            ceph.write(second_pool, "dst", 0, garbage)

    result = volcopy.copy(source_image, dst, verify=True)

    assert result.digest == reference_digest(content)
    assert volcopy.digest(dst) == reference_digest(content)
    if isinstance(dst, str) and dst.startswith("rbd:"):
        assert ceph.read(second_pool, "dst", 0, SIZE) == content
        # thin: write_zeroes gave back every object of garbage that src does not hold
        assert allocated_objects(volcopy.extents(dst)) <= allocated_objects(volcopy.extents(source_image))
    else:
        assert read_all(dst, SIZE) == content


@pytest.mark.parametrize("src_kind", ["file", pytest.param("block device", marks=needs_root_for_loop)])
def test_each_kind_to_an_image(ceph, ceph_pool, content, src_kind, tmp_path, request):
    src = tmp_path / "src.img"
    src.write_bytes(content)
    if src_kind == "block device":
        src = request.getfixturevalue("loops").attach(src)
    dst = rbd(ceph, ceph_pool, "dst")

    result = volcopy.copy(src, dst)

    assert result.engine == "threads"
    assert result.digest == reference_digest(content)
    assert ceph.read(ceph_pool, "dst", 0, SIZE) == content
    assert volcopy.digest(dst) == volcopy.digest(src)
    assert allocated_objects(volcopy.extents(dst)) == allocated_objects(DATA)


def test_snapshot_is_a_stable_source(ceph, ceph_pool, source_image, content, tmp_path):
    ceph.snapshot(ceph_pool, "src", "before")
    ceph.write(ceph_pool, "src", 0, b"\xff" * MiB)  # after the snapshot: not in it

    result = volcopy.copy(f"rbd:{ceph_pool}/src@before:conf={ceph.conf}", tmp_path / "dst.img")

    assert result.digest == reference_digest(content)
    assert read_all(tmp_path / "dst.img") == content
    with pytest.raises(volcopy.InvalidRequest, match="snapshot cannot be written"):
        volcopy.copy(tmp_path / "dst.img", f"rbd:{ceph_pool}/src@before:conf={ceph.conf}")


def test_one_image_under_two_spellings_is_refused(ceph, ceph_pool, source_image, content):
    ceph.snapshot(ceph_pool, "src", "s1")
    spellings = [
        f"rbd:{ceph_pool}/src:mon_host={ceph.mon_host.replace(':', chr(92) + ':')}",
        f"rbd:{ceph_pool}/src:conf={ceph.conf}:id=admin",
    ]
    for dst in spellings:
        with pytest.raises(volcopy.InvalidRequest, match="same volume"):
            volcopy.copy(source_image, dst)
    with pytest.raises(volcopy.InvalidRequest, match="same volume"):
        volcopy.copy(f"rbd:{ceph_pool}/src@s1:conf={ceph.conf}", source_image)
    assert ceph.read(ceph_pool, "src", 0, SIZE) == content


def test_an_image_open_elsewhere_is_not_written(ceph, ceph_pool, source_image, content):
    """librbd's exclusive lock is handed over on request: a guest's QEMU and the copy would take turns
    writing. An image another client has open (a watch) is refused, like a mounted device."""
    import rados
    import rbd as librbd

    ceph.create_image(ceph_pool, "in-use", SIZE)
    ceph.write(ceph_pool, "in-use", 0, b"guest data" * 100)
    with rados.Rados(conffile=ceph.conf) as cluster, cluster.open_ioctx(ceph_pool) as ioctx:
        with librbd.Image(ioctx, "in-use"):
            with pytest.raises(volcopy.InvalidRequest, match="open elsewhere"):
                volcopy.copy(source_image, rbd(ceph, ceph_pool, "in-use"))
            assert ceph.read(ceph_pool, "in-use", 0, 1000) == b"guest data" * 100
    volcopy.copy(source_image, rbd(ceph, ceph_pool, "in-use"))  # closed: now it may be written
    assert ceph.read(ceph_pool, "in-use", 0, SIZE) == content


def copy_in_background(src, dst, outcome: list, past: int) -> tuple[threading.Thread, threading.Event]:
    """A copy at 16 MiB/s on a thread of its own; the event is set once it has done ``past`` bytes."""
    progressed = threading.Event()

    def run() -> None:
        try:
            report = lambda done, total: done > past and progressed.set()  # noqa: E731
            outcome.append(volcopy.copy(src, dst, rate_limit=16 * MiB, progress=report))
        except BaseException as exc:  # noqa: BLE001 - the outcome is asserted by the caller
            outcome.append(exc)

    copier = threading.Thread(target=run)
    copier.start()
    return copier, progressed


def test_a_client_that_opens_dst_mid_copy_cannot_write_under_it(ceph, ceph_pool, tmp_path):
    """The in-use check sees who has dst open when the copy starts. A client that opens it later is
    refused the exclusive lock (volcopy took it explicitly, so librbd does not hand it over): its write
    fails, and dst ends equal to src. Handed over, the client's write landed and copy() returned
    success over a dst that differed from src."""
    import rados
    import rbd as librbd

    dense = np.random.default_rng(8).bytes(SIZE)
    src = tmp_path / "src.img"
    src.write_bytes(dense)
    ceph.create_image(ceph_pool, "dst", SIZE)
    outcome: list = []
    copier, progressed = copy_in_background(src, rbd(ceph, ceph_pool, "dst"), outcome, past=8 * MiB)
    try:
        assert progressed.wait(30)
        with rados.Rados(conffile=ceph.conf) as cluster, cluster.open_ioctx(ceph_pool) as ioctx:
            with librbd.Image(ioctx, "dst") as late:
                with pytest.raises(librbd.ReadOnlyImage):
                    late.write(b"late client" * 100, 0)
    finally:
        copier.join()

    assert isinstance(outcome[0], volcopy.CopyResult), outcome
    assert ceph.read(ceph_pool, "dst", 0, SIZE) == dense


def test_a_source_image_shrunk_mid_copy_ends_in_an_error(ceph, ceph_pool, tmp_path):
    """A src opened read-only has no watch: librbd never tells its handle of a resize, which kept the
    old size and read zeros past the new end; copy() returned success for bytes src no longer has.
    The size that decides comes from a handle opened at the check."""
    import rados
    import rbd as librbd

    ceph.create_image(ceph_pool, "src", SIZE)
    ceph.write(ceph_pool, "src", 0, np.random.default_rng(9).bytes(SIZE))
    shrunk = 20 * MiB + 4096
    outcome: list = []
    src, dst = rbd(ceph, ceph_pool, "src"), tmp_path / "out.img"
    copier, progressed = copy_in_background(src, dst, outcome, past=8 * MiB)
    try:
        assert progressed.wait(30)
        with rados.Rados(conffile=ceph.conf) as cluster, cluster.open_ioctx(ceph_pool) as ioctx:
            with librbd.Image(ioctx, "src") as image:
                image.resize(shrunk)
    finally:
        copier.join()

    (error,) = outcome
    assert isinstance(error, volcopy.CopyIOError), error
    assert error.errno == 5 and error.offset == shrunk
    assert f"the source shrank to {shrunk} bytes during the copy of {SIZE}" in str(error)


# ---------------------------------------------------------------- faults


def start_cli_copy(src: str, dst: str, checkpoint, rate: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "volcopy.cli", "copy", src, dst, "--checkpoint", str(checkpoint)]
    args += ["--rate", str(rate), "--json", "--dst-id", "volume-1"]  # as Cinder's driver would name dst
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("dst_between", ["kept", "made again"])
def test_copy_to_an_image_resumes_after_sigkill(ceph, ceph_pool, tmp_path, dst_between):
    """The resume takes up where the checkpoint left off, unless dst is another image under the same name
    (removed and made again: a new image id, whatever dst id the caller gives): that checkpoint is
    refused, dst left as it is, and once it is removed all of src is copied."""
    dense = np.random.default_rng(5).bytes(SIZE)
    src, dst, checkpoint = tmp_path / "src.img", rbd(ceph, ceph_pool, "dst"), tmp_path / "copy.ckpt"
    src.write_bytes(dense)
    proc = start_cli_copy(str(src), dst, checkpoint, rate=16 * MiB)  # 4 s, a checkpoint every 2 s
    deadline = time.monotonic() + 30
    while not volcopy._core.checkpoint_resume_offset(str(checkpoint)):
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if dst_between == "made again":
        ceph.remove_image(ceph_pool, "dst")
        ceph.create_image(ceph_pool, "dst", SIZE)

    if dst_between == "made again":
        refused = start_cli_copy(str(src), dst, checkpoint, rate=1 << 40)
        _, err = refused.communicate(timeout=120)
        assert refused.returncode == 1
        assert f"checkpoint {checkpoint} belongs to another copy: the destination is another volume" in err
        assert ceph.read(ceph_pool, "dst", 0, SIZE) == bytes(SIZE), "the new image was written"
        checkpoint.unlink()  # as the error asks

    proc = start_cli_copy(str(src), dst, checkpoint, rate=1 << 40)
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 0, err
    result = json.loads(out)
    if dst_between == "kept":
        assert result["resumed_from"] > 0
        assert result["bytes_read"] == SIZE - result["resumed_from"]
    else:
        assert result["resumed_from"] == 0 and result["bytes_read"] == SIZE
    assert result["digest"] == reference_digest(dense)
    assert ceph.read(ceph_pool, "dst", 0, SIZE) == dense


@pytest.mark.parametrize("stopped_side", ["src", "dst", "created dst"])
def test_an_osd_stopped_mid_copy_ends_in_a_copy_io_error(ceph, ceph_pool, tmp_path, stopped_side):
    """Each request waits at most rados_osd_op_timeout (1 s here); closing an image written to
    (its exclusive lock given back, its watch ended) waits it out again, request by request. A dst the
    copy created is then removed, which fails the same way: the image is left, and the error says so.
    Bounded either way: never a hang."""
    dense = np.random.default_rng(6).bytes(SIZE)
    local = tmp_path / "local.img"
    local.write_bytes(dense)
    image = rbd(ceph, ceph_pool, "img", "rados_osd_op_timeout=1")
    if stopped_side == "src":
        volcopy.copy(local, image)
        src, dst = image, tmp_path / "out.img"
    else:
        src, dst = local, image
        if stopped_side == "dst":
            ceph.create_image(ceph_pool, "img", SIZE)
    progressed = threading.Event()
    outcome: list = []

    def run() -> None:
        try:
            volcopy.copy(src, dst, rate_limit=8 * MiB, progress=lambda done, total: done and progressed.set())
        except BaseException as exc:  # noqa: BLE001 - the outcome is asserted below
            outcome.append(exc)

    copier = threading.Thread(target=run)
    copier.start()
    try:
        assert progressed.wait(30)
        ceph.stop_osd()
        stopped = time.monotonic()
        copier.join(60)
        assert not copier.is_alive(), "the copy hung on the stopped OSD"
        waited = time.monotonic() - stopped
    finally:
        ceph.start_osd()
        copier.join()

    assert len(outcome) == 1 and isinstance(outcome[0], volcopy.CopyIOError), outcome
    error = outcome[0]
    assert error.errno == 110  # ETIMEDOUT: rados_osd_op_timeout
    assert error.filename == str(volcopy.rbd_volume.parse(image))
    assert error.operation == ("read" if stopped_side == "src" else "write")
    bound = 1 + 10 if stopped_side == "src" else 60
    assert waited < bound, f"the operation timeout is 1 s; it took {waited:.1f} s"
    if stopped_side == "created dst":
        assert error.__notes__ == [
            f"the half-written destination {error.filename} is left: [Errno 110] cannot remove the image"
        ]


def test_an_osd_that_hangs_mid_copy_ends_in_a_copy_io_error(ceph, ceph_pool, tmp_path):
    """An OSD that stops answering without being marked down (SIGSTOP; on a real cluster, one cut off
    from this client only). With zero-copy writes librbd would complete a write only once the messenger
    let go of its buffer, which a write queued to that OSD kept until the connection's idle timeout
    (900 s): the copy waited however short the operation timeout. With librbd copying the buffers
    (its default, kept) the copy ends in a CopyIOError (12 s measured)."""
    dense = np.random.default_rng(10).bytes(SIZE)
    src = tmp_path / "src.img"
    src.write_bytes(dense)
    ceph.create_image(ceph_pool, "dst", SIZE)
    outcome: list = []
    dst = rbd(ceph, ceph_pool, "dst", "rados_osd_op_timeout=2")
    copier, progressed = copy_in_background(src, dst, outcome, past=8 * MiB)
    try:
        assert progressed.wait(30)
        ceph.osd.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        copier.join(30)
        waited = time.monotonic() - stopped
    finally:
        ceph.osd.send_signal(signal.SIGCONT)
        copier.join()

    assert waited < 30, "the copy waited for the hung OSD past every timeout"
    (error,) = outcome
    assert isinstance(error, volcopy.CopyIOError) and error.errno == 110, error  # ETIMEDOUT


def test_a_created_image_is_removed_when_the_copy_fails(ceph, ceph_pool, content, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(content)

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        volcopy.copy(src, rbd(ceph, ceph_pool, "new"), progress=stop)

    with pytest.raises(volcopy.InvalidRequest, match="does not exist"):
        volcopy.digest(rbd(ceph, ceph_pool, "new"))


# ---------------------------------------------------------------- bad input


def test_a_secret_never_shows_in_a_refusal_or_a_repr(tmp_path):
    secret = "AQBvaBFZAAAAABAA9VHgwCgQgn2dYP5f1kR5A=="  # a cephx key's shape
    for name in [f"rbd:p/i:{secret}", f"rbd:p/i:key={secret}\\", f"rbd:p/i:Key={secret}"]:
        with pytest.raises(volcopy.InvalidRequest) as refused:
            volcopy.digest(name)
        assert secret not in str(refused.value)
    spec = volcopy.rbd_volume.parse(f"rbd:p/i:key={secret}")
    assert secret not in repr(spec) and secret not in str(spec)


def test_an_image_name_is_a_read_only_value_whose_own_clients_are_not_part_of_it():
    """Names are compared, hashed and pickled (a journal, a set of names); own_clients says who holds
    the image open, not which image it is."""
    import pickle

    spec = volcopy.rbd_volume.parse("rbd:p/ns/i@s:conf=/etc/c.conf:id=u:mon_host=1.2.3.4")
    held = volcopy.rbd_volume.RBDSpec("p", "ns", "i", "s", "/etc/c.conf", "u", (("mon_host", "1.2.3.4"),), 1)
    assert spec == held and hash(spec) == hash(held) and len({spec, held}) == 1
    assert spec != volcopy.rbd_volume.RBDSpec("p", "ns", "i")
    assert pickle.loads(pickle.dumps(held)).own_clients == 1 and pickle.loads(pickle.dumps(held)) == spec
    with pytest.raises(AttributeError, match="read-only: cannot set image"):
        spec.image = "other"
    assert spec.image == "i"


@pytest.mark.parametrize(
    "name, message",
    [
        ("rbd:pool-only", "rbd:POOL"),
        ("rbd:p/i@", "snapshot name"),
        ("rbd:p/i:novalue", "KEY=VALUE"),
        ("rbd:a/b/c/d", "rbd:POOL"),
    ],
)
def test_a_malformed_name_is_refused(name, message, tmp_path):
    with pytest.raises(volcopy.InvalidRequest, match=message):
        volcopy.copy(name, tmp_path / "dst.img")


def test_bad_rbd_requests_get_clear_errors(ceph, ceph_pool, source_image, tmp_path):
    with pytest.raises(volcopy.InvalidRequest, match="pool does not exist"):
        volcopy.digest(rbd(ceph, "no-such-pool", "x"))
    with pytest.raises(volcopy.InvalidRequest, match="image does not exist"):
        volcopy.digest(rbd(ceph, ceph_pool, "absent"))
    with pytest.raises(volcopy.InvalidRequest, match="snapshot does not exist"):
        volcopy.digest(f"rbd:{ceph_pool}/src@absent:conf={ceph.conf}")
    ceph.create_image(ceph_pool, "small", SIZE // 2)
    with pytest.raises(volcopy.InvalidRequest, match="less than the"):
        volcopy.copy(source_image, rbd(ceph, ceph_pool, "small"))
    with pytest.raises(volcopy.InvalidRequest, match="threads engine"):
        volcopy.copy(source_image, tmp_path / "dst.img", engine="aio")
    with pytest.raises(volcopy.InvalidRequest, match="cannot read the Ceph configuration"):
        volcopy.digest(f"rbd:{ceph_pool}/src:conf={tmp_path}/missing.conf")
    with pytest.raises(volcopy.InvalidRequest, match="setting .* is refused"):
        volcopy.digest(rbd(ceph, ceph_pool, "src", "no_such_setting=1"))
    # nothing listens there: a bounded wait, then an I/O error naming the cluster connection
    closed = "rbd:p/i:mon_host=127.0.0.1\\:9:client_mount_timeout=2"
    with pytest.raises(volcopy.CopyIOError, match="cannot connect to the Ceph cluster"):
        volcopy.digest(closed)


def test_the_cli_names_images(ceph, ceph_pool, source_image, content, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "volcopy.cli", "copy", source_image, str(tmp_path / "dst.img"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out)["digest"] == reference_digest(content)
    out = subprocess.run(
        [sys.executable, "-m", "volcopy.cli", "digest", source_image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert reference_digest(content) in out


# ---------------------------------------------------------------- librbd loaded on first use


def _python(code: str, *args: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *args]
    return subprocess.run((wrap or []) + command, capture_output=True, text=True, timeout=120)


def test_librbd_is_loaded_only_when_an_image_is_named(ceph, ceph_pool, source_image, tmp_path):
    (tmp_path / "a.img").write_bytes(b"x" * MiB)
    code = (
        "import sys, volcopy\n"
        "maps = lambda: open('/proc/self/maps').read()\n"
        "volcopy.copy(sys.argv[1], sys.argv[2])\n"
        "print('librados' in maps(), 'librbd' in maps())\n"
        "volcopy.digest(sys.argv[3])\n"
        "print('librados' in maps(), 'librbd' in maps())\n"
    )
    out = _python(code, str(tmp_path / "a.img"), str(tmp_path / "b.img"), source_image)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["False False", "True True"]


@needs_root
def test_without_librbd_at_run_time_images_are_refused_and_files_still_copy(tmp_path):
    """librbd1 hidden in a mount namespace (an empty file bound over it), as on a host without it."""
    cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    library = next(line.split(" => ")[1] for line in cache.splitlines() if "librbd.so.1 " in line)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "a.img").write_bytes(b"y" * MiB)
    code = (
        "import sys, volcopy\n"
        "print(volcopy.copy(sys.argv[1], sys.argv[2]).digest)\n"
        "try:\n"
        "    volcopy.digest('rbd:pool/image')\n"
        "except volcopy.InvalidRequest as e:\n"
        "    print(e)\n"
    )
    script = f'mount --bind {tmp_path / "empty"} {library} && exec "$@"'
    out = _python(
        code,
        str(tmp_path / "a.img"),
        str(tmp_path / "b.img"),
        wrap=["unshare", "-m", "sh", "-c", script, "-"],
    )

    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == reference_digest(b"y" * MiB)
    assert lines[1].startswith("source rbd:pool/image: RBD: librbd.so.1 cannot be loaded (Debian: librbd1): ")


def test_ctrl_c_while_the_monitors_do_not_answer_is_raised_at_once(tmp_path):
    """librados cannot be interrupted while it waits for monitors (client_mount_timeout, 30 s by
    volcopy's default): the open runs on a thread of its own, and the CLI ends at the Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "volcopy.cli", "digest", "rbd:p/i:mon_host=127.0.0.1\\:9"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # interpreter start, then into rados_connect
    assert proc.poll() is None, proc.communicate()
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=20)
    waited = time.monotonic() - sent

    assert proc.returncode == 130, err
    assert waited < 5, f"the Ctrl-C took {waited:.1f} s (the monitors alone wait 30)"
