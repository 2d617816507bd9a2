#!/usr/bin/env bash
# Installs volcopy (and the given extras, e.g. "test") into the project's virtual environment .venv.
# The native core is compiled by pip through scikit-build-core and CMake.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=${1:-}
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet ".${extras:+[$extras]}"

# Ceph's Python bindings (rados, rbd) exist only as Debian packages (python3-rados, python3-rbd), built
# for Debian's Python 3.11 in /usr/lib/python3/dist-packages. The tests use them to run their Ceph
# cluster and os-brick's RBD connector imports them. Expose exactly these two modules to .venv, through
# a directory of symlinks named by a .pth file, not the whole of dist-packages (whose other packages
# would shadow the venv's own versions). The extension suffix must match, or the import would fail later
# with a confusing error. The directory lives inside site-packages and the .pth names it relatively, so
# a copied venv still finds its own.
debian_dist=/usr/lib/python3/dist-packages
read -r site_packages ext_suffix < <(.venv/bin/python -c \
    'import sysconfig; print(sysconfig.get_path("purelib"), sysconfig.get_config_var("EXT_SUFFIX"))')
ceph_dir=$site_packages/volcopy-debian-ceph-bindings
rm -rf "$ceph_dir"
mkdir "$ceph_dir"
for module in rados rbd; do
    if [ ! -e "$debian_dist/$module$ext_suffix" ]; then
        echo "install-python: $debian_dist/$module$ext_suffix is missing (Debian python3-$module, or the" \
            "venv's Python does not match Debian's $ext_suffix); Ceph tests will be skipped" >&2
        continue
    fi
    ln -s "$debian_dist/$module$ext_suffix" "$ceph_dir/$module$ext_suffix"
done
echo volcopy-debian-ceph-bindings > "$site_packages/volcopy-debian-ceph-bindings.pth"
