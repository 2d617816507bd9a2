"""The RBD tests' fixtures over the single-node Ceph in volcopy.bench.ceph_cluster (the class lives in
the package because ``volcopy bench`` starts the same cluster for its RBD workloads)."""

from __future__ import annotations

import pytest

from volcopy.bench.ceph_cluster import CephCluster, missing_requirements

__all__ = ["CephCluster", "missing_requirements", "ceph", "ceph_pool"]


@pytest.fixture(scope="session")
def ceph():
    """A running single-node Ceph; see CephCluster for what it offers."""
    missing = missing_requirements()
    if missing:
        pytest.skip(missing)
    cluster = CephCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def ceph_pool(ceph):
    """A fresh pool for one test, deleted after it (giving its images' memory back to the OSD)."""
    pool = ceph.new_pool()
    yield pool
    ceph.delete_pool(pool)
