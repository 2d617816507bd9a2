"""The RBD tests' fixtures over the single-node Ceph in volcopy.bench.ceph_cluster (the class lives in
the package because ``volcopy bench`` starts the same cluster for its RBD workloads)."""

from __future__ import annotations

import os

import pytest

from volcopy.bench.ceph_cluster import WATCH_TIMEOUT, CephCluster, missing_requirements

__all__ = ["CephCluster", "missing_requirements", "ceph", "ceph_pool"]


@pytest.fixture(scope="session")
def ceph():
    """A running single-node Ceph; see CephCluster for what it offers."""
    missing = missing_requirements()
    if missing:
        pytest.skip(missing)
    cluster = CephCluster()
    # A client named by mon_host alone (as Cinder's connection_info names it) reads no conf: it learns
    # the OSDs' short watch timeout (volcopy waits it out for a killed client's watch) here.
    saved = os.environ.get("CEPH_ARGS")
    os.environ["CEPH_ARGS"] = f"--osd_client_watch_timeout={WATCH_TIMEOUT}"
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("CEPH_ARGS")
        else:
            os.environ["CEPH_ARGS"] = saved


@pytest.fixture
def ceph_pool(ceph):
    """A fresh pool for one test, deleted after it (giving its images' memory back to the OSD)."""
    pool = ceph.new_pool()
    yield pool
    ceph.delete_pool(pool)
