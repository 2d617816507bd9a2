/* Block devices: no holes to ask about (zero detection decides), zeroing that keeps a thin device thin
 * where it can (see blockdev_zero). */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "internal.h"

static int blockdev_next_data(const struct vc_endpoint *ep, uint64_t off, uint64_t end, uint64_t *start, uint64_t *stop)
{
    (void)ep;
    *start = off;
    *stop = end;
    return 0;
}

/* First a punched hole: on a block device it is a write-zeroes request that may unmap and never falls
 * back to writing (a thin device stays thin, and the zeros are guaranteed, unlike a plain discard); a
 * device without it refuses. Then BLKZEROOUT, which may write zeros but never unmaps: a loop device
 * turns it into FALLOC_FL_ZERO_RANGE of its file, which stays allocated. */
static int blockdev_zero(const struct vc_endpoint *ep, uint64_t off, uint64_t len)
{
    uint64_t range[2] = {off, len};

    /* Both want whole 512-byte sectors; an unaligned tail is written as zeros by the caller. */
    if (off % 512 || len % 512)
        return -EOPNOTSUPP;
    if (fallocate(ep->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != EINVAL && errno != ENOTTY)
        return -errno;
    if (ioctl(ep->fd, BLKZEROOUT, range) == 0)
        return 0;
    return (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOTTY) ? -EOPNOTSUPP : -errno;
}

static int blockdev_flush(const struct vc_endpoint *ep)
{
    /* fsync on a block device writes back its page cache and flushes the device's volatile cache. */
    return fsync(ep->fd) == 0 ? 0 : -errno;
}

static int blockdev_size(const struct vc_endpoint *ep, uint64_t *size)
{
    return ioctl(ep->fd, BLKGETSIZE64, size) == 0 ? 0 : -errno;
}

const struct vc_endpoint_ops vc_endpoint_blockdev_ops = {
    .name = "blockdev",
    .next_data = blockdev_next_data,
    .zero = blockdev_zero,
    .flush = blockdev_flush,
    .size = blockdev_size,
};
