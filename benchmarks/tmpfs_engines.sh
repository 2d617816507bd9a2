#!/bin/bash
# W4 outside the harness: 2 GiB tmpfs to tmpfs with volcopy's sync and threads engines, nbdcopy and the
# floor (dd writing zeros to dst, reading nothing), interleaved, each onto a fresh sparse dst after the
# page cache is dropped, with the VM's freed memory kept in the VM. Prints each one's wall seconds, sorted,
# and the median.
#   usage: benchmarks/tmpfs_engines.sh [ROUNDS] [DIR]   (root, for drop_caches; DIR on tmpfs)
set -euo pipefail
rounds=${1:-6}
dir=${2:-/dev/shm/volcopy-tmpfs-engines}
python=${PYTHON:-python3}
mkdir -p "$dir"
src=$dir/src.img dst=$dir/dst.img
trap 'rm -rf "$dir"' EXIT
# Freed memory stays in the VM for the run, as in the harness (python/volcopy/bench/machine_settings.py
# says why): the reporting order goes past the largest free block, and back after.
reporting=/sys/module/page_reporting/parameters/page_reporting_order
if [[ -w $reporting ]]; then
    order=$(<"$reporting")
    awk '{print NF - 4}' /proc/buddyinfo | sort -n | tail -1 >"$reporting"
    trap 'echo "$order" >"$reporting"; rm -rf "$dir"' EXIT
fi
head -c 2G /dev/urandom >"$src"

declare -A times
run() {
    local name=$1
    shift
    rm -f "$dst" && truncate -s 2G "$dst" && sync && echo 3 >/proc/sys/vm/drop_caches
    local start
    start=$(date +%s%N)
    "$@" >/dev/null
    times[$name]+="$((($(date +%s%N) - start) / 1000000)) " # milliseconds
}
for _ in $(seq "$rounds"); do
    run "volcopy sync" "$python" -m volcopy.cli copy --engine sync "$src" "$dst"
    run "volcopy threads" "$python" -m volcopy.cli copy --engine threads "$src" "$dst"
    run "nbdcopy" nbdcopy --flush "$src" "$dst"
    run "floor (dd zeros)" dd if=/dev/zero of="$dst" bs=1M count=2048 conv=fsync,notrunc status=none
done
for name in "volcopy sync" "volcopy threads" "nbdcopy" "floor (dd zeros)"; do
    sorted=$(tr ' ' '\n' <<<"${times[$name]}" | grep . | sort -n)
    median=$(awk '{a[NR]=$1} END {print ((NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2) / 1000}' <<<"$sorted")
    printf '%-18s median %.2f s   runs: %s\n' "$name" "$median" "$(awk '{printf "%.2f ", $1 / 1000}' <<<"$sorted")"
done
