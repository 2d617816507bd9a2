"""The same-backend fast path: two files on one file system that shares extents are cloned, not copied.

FICLONE makes dst share src's extents (XFS with reflink, btrfs, OCFS2, NFS 4.2 and others): the
whole volume in one call, whatever its size. Where the file system cannot, the caller copies.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

FICLONE = 0x40049409  # _IOW(0x94, 9, int), from linux/fs.h
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}


def can_clone(src: str, dst: str) -> bool:
    """Both regular files on one file system, dst missing or at least as large as src."""
    src_stat = os.stat(src)
    if not stat.S_ISREG(src_stat.st_mode):
        return False
    try:
        dst_stat = os.stat(dst)
    except FileNotFoundError:
        return os.stat(os.path.dirname(os.path.abspath(dst))).st_dev == src_stat.st_dev
    return (
        stat.S_ISREG(dst_stat.st_mode)
        and dst_stat.st_dev == src_stat.st_dev
        and dst_stat.st_size >= src_stat.st_size
    )


def clone_file(src: str, dst: str) -> bool:
    """Clones src onto dst and makes it durable; False (dst untouched) when the file system cannot."""
    created = not os.path.exists(dst)
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            src_size, dst_size = os.fstat(src_fd).st_size, os.fstat(dst_fd).st_size
            if dst_size > src_size:  # the first src_size bytes only: dst keeps its size, as a volume does
                fcntl.ioctl(dst_fd, FICLONERANGE, struct.pack("qQQQ", src_fd, 0, src_size, 0))
            else:
                fcntl.ioctl(dst_fd, FICLONE, src_fd)
            os.fsync(dst_fd)
            return True
        except OSError as exc:
            if exc.errno not in NOT_SUPPORTED:
                raise
            return False
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
        if created and os.path.exists(dst) and os.path.getsize(dst) == 0 and os.path.getsize(src) > 0:
            os.unlink(dst)  # a clone that did not happen leaves no empty file behind
