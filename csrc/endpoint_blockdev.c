/* Block devices: no holes to ask about (zero detection decides), zeroing through BLKZEROOUT, which the
 * device may offload (a loop device turns it into a fallocate of its backing file). */
#include <errno.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "internal.h"

static int blockdev_next_data(int fd, uint64_t off, uint64_t end, uint64_t *start, uint64_t *stop)
{
    (void)fd;
    *start = off;
    *stop = end;
    return 0;
}

static int blockdev_zero(int fd, uint64_t off, uint64_t len)
{
    uint64_t range[2] = {off, len};

    /* BLKZEROOUT wants 512-byte sectors; an unaligned tail is written as zeros by the caller. */
    if (off % 512 || len % 512)
        return -EOPNOTSUPP;
    if (ioctl(fd, BLKZEROOUT, range) == 0)
        return 0;
    return (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOTTY) ? -EOPNOTSUPP : -errno;
}

static int blockdev_flush(int fd)
{
    /* fsync on a block device writes back its page cache and flushes the device's volatile cache. */
    return fsync(fd) == 0 ? 0 : -errno;
}

static int blockdev_size(int fd, uint64_t *size)
{
    return ioctl(fd, BLKGETSIZE64, size) == 0 ? 0 : -errno;
}

const struct vc_endpoint_ops vc_endpoint_blockdev_ops = {
    .name = "blockdev",
    .next_data = blockdev_next_data,
    .zero = blockdev_zero,
    .flush = blockdev_flush,
    .size = blockdev_size,
};
