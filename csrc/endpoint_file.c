/* Regular files: holes come from SEEK_DATA/SEEK_HOLE, zeroing punches holes so a sparse src gives a
 * sparse dst. */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

static int file_next_data(const struct vc_endpoint *ep, uint64_t off, uint64_t end, uint64_t *start, uint64_t *stop)
{
    off_t data = lseek(ep->fd, (off_t)off, SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO) { /* no data after off */
            *start = *stop = end;
            return 0;
        }
        if (errno == EINVAL || errno == EOPNOTSUPP) { /* a file system without SEEK_DATA: all data */
            *start = off;
            *stop = end;
            return 0;
        }
        return -errno;
    }
    if ((uint64_t)data >= end) {
        *start = *stop = end;
        return 0;
    }
    off_t hole = lseek(ep->fd, data, SEEK_HOLE);
    if (hole < 0)
        return -errno;
    *start = (uint64_t)data;
    *stop = VC_MIN((uint64_t)hole, end);
    return 0;
}

static int file_zero(const struct vc_endpoint *ep, uint64_t off, uint64_t len)
{
    if (fallocate(ep->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return -errno;
    /* Some file systems cannot punch but can still zero without writing data. */
    if (fallocate(ep->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    return (errno == EOPNOTSUPP || errno == ENOSYS) ? -EOPNOTSUPP : -errno;
}

static int file_flush(const struct vc_endpoint *ep)
{
    return fdatasync(ep->fd) == 0 ? 0 : -errno;
}

static int file_size(const struct vc_endpoint *ep, uint64_t *size)
{
    struct stat st;
    if (fstat(ep->fd, &st) < 0)
        return -errno;
    *size = (uint64_t)st.st_size;
    return 0;
}

const struct vc_endpoint_ops vc_endpoint_file_ops = {
    .name = "file",
    .next_data = file_next_data,
    .zero = file_zero,
    .flush = file_flush,
    .size = file_size,
};

const struct vc_endpoint_ops *vc_endpoint_ops_for(int kind)
{
    switch (kind) {
    case VC_KIND_BLOCKDEV:
        return &vc_endpoint_blockdev_ops;
    case VC_KIND_RBD:
        return &vc_endpoint_rbd_ops;
    default:
        return &vc_endpoint_file_ops;
    }
}
