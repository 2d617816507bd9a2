"""The build: an engine whose library is missing is left out, and the build says so; it never fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_build_without_liburing_libaio_and_librbd_leaves_those_out(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--target",
            str(target),
            "-v",
            "--config-settings=cmake.define.VOLCOPY_WITH_URING=OFF",
            "--config-settings=cmake.define.VOLCOPY_WITH_AIO=OFF",
            "--config-settings=cmake.define.VOLCOPY_WITH_RBD=OFF",
            f"--config-settings=build-dir={tmp_path / 'build'}",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "io_uring engine left out" in build.stdout + build.stderr
    assert "aio engine left out" in build.stdout + build.stderr
    assert "rbd endpoint left out" in build.stdout + build.stderr

    check = (
        # an editable install of volcopy hooks imports ahead of PYTHONPATH: take the hook out
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Redirect' not in type(f).__name__]\n"
        "import volcopy, volcopy._core as c\n"
        "print(volcopy.__file__)\n"
        "print(c.engine_unavailable_reason('io_uring'))\n"
        "print(c.engine_unavailable_reason('aio'))\n"
        "print(c.engine_unavailable_reason('sync'))\n"
        "import sys; open(sys.argv[1], 'wb').write(b'x' * 3000000)\n"
        "print(volcopy.copy(sys.argv[1], sys.argv[2]).engine)\n"
        "try:\n"
        "    volcopy.copy(sys.argv[1], sys.argv[2], engine='io_uring')\n"
        "except volcopy.EngineUnavailable as e:\n"
        "    print(e)\n"
        "try:\n"
        "    volcopy.digest('rbd:pool/image')\n"
        "except volcopy.InvalidRequest as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout.splitlines()

    assert out[0].startswith(str(target)), f"imported {out[0]}, not the build under test"
    assert "built without liburing" in out[1]
    assert "built without libaio" in out[2]
    assert out[3] == "None"
    assert out[4] == "threads", "auto falls back to what was built"
    assert "io_uring is not available here" in out[5]
    assert (
        out[6]
        == "source rbd:pool/image: RBD: volcopy was built without librbd (install librbd-dev and rebuild)"
    )
