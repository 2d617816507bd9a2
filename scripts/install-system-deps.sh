#!/usr/bin/env bash
# Installs every Debian package volcopy needs to build, run and be tested, on a fresh Debian 12 as root.
# Idempotent: a package already present costs nothing but dpkg's check.
set -euo pipefail

packages=(
    # build: a virtual environment to install into, Python's headers, the native core's libraries
    # (liburing is linked statically from liburing-dev; libaio1 comes with libaio-dev)
    python3-venv python3-dev gcc make liburing-dev libaio-dev libxxhash-dev
    # run and test: loop devices, file systems, the peers the benchmarks compare against
    util-linux mount e2fsprogs fio qemu-utils qemu-system-x86 libnbd-bin time
    # the compute handoff tests: a real guest (a kernel, lz4 to unpack it, and busybox for its initramfs)
    linux-image-cloud-amd64 busybox-static lz4
    # the compute side through libvirt: libvirtd and virtlogd (the tests start them), and what the
    # libvirt-python binding builds against
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-dev pkg-config
    # the compute agent's TLS tests make a CA and certificates with the openssl command
    openssl
    # the migration journal's tests: a real PostgreSQL server; XFS for the reflink (FICLONE) fast path
    postgresql xfsprogs
    # device faults and power loss under the engine: nbdkit (error filter, a Python plugin) behind nbdfuse
    nbdkit nbdkit-plugin-python nbdfuse fuse3
    # Ceph RBD: librbd for the native endpoint (optional at build time), a one-mon one-OSD cluster for
    # the tests, the rbd command and Python bindings (Debian-only) for the peers and os-brick's RBD
    # connector, and QEMU's rbd block driver for the compute handoff
    librbd-dev ceph-mon ceph-osd ceph-common python3-rados python3-rbd qemu-block-extra
    # the data movers' coordination (tooz groups, TaskFlow's jobboard): the tests start their own Redis
    # and etcd, and run movers on hosts of their own (network namespaces and veth links: ip)
    redis-server etcd-server iproute2
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-system-deps: need root to install: ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
