/* Built instead of endpoint_rbd.c when librbd was not found: every RBD call says so. */
#include <errno.h>
#include <stddef.h>

#include "internal.h"

#define WHY "RBD: volcopy was built without librbd (install librbd-dev and rebuild)"

int vc_rbd_compiled(void)
{
    return 0;
}

int vc_rbd_open(const struct vc_rbd_spec *spec, int flags, uint64_t create_size, struct vc_rbd **out, int *created,
                struct vc_error *error)
{
    *out = NULL;
    *created = 0;
    return vc_fail(error, EOPNOTSUPP, VC_SIDE_NONE, VC_OP_SETUP, 0, WHY);
}

int vc_rbd_info(struct vc_rbd *image, struct vc_rbd_info *info)
{
    return -EOPNOTSUPP;
}

int64_t vc_rbd_read(struct vc_rbd *image, void *buf, uint64_t len, uint64_t offset)
{
    return -EOPNOTSUPP;
}

int vc_rbd_remove(struct vc_rbd *image)
{
    return -EOPNOTSUPP;
}

void vc_rbd_close(struct vc_rbd *image)
{
}

int vc_rbd_aio(struct vc_rbd *image, int op, void *buf, uint32_t len, uint64_t offset,
               void (*done)(void *ctx, uint64_t tag, int64_t res), void *ctx, uint64_t tag)
{
    return -EOPNOTSUPP;
}

/* No image can be opened, so no copy ever reaches these. */
static int no_next_data(const struct vc_endpoint *ep, uint64_t off, uint64_t end, uint64_t *start, uint64_t *stop)
{
    return -EOPNOTSUPP;
}

static int no_zero(const struct vc_endpoint *ep, uint64_t off, uint64_t len)
{
    return -EOPNOTSUPP;
}

static int no_flush(const struct vc_endpoint *ep)
{
    return -EOPNOTSUPP;
}

static int no_size(const struct vc_endpoint *ep, uint64_t *size)
{
    return -EOPNOTSUPP;
}

const struct vc_endpoint_ops vc_endpoint_rbd_ops = {
    .name = "rbd (not built)",
    .next_data = no_next_data,
    .zero = no_zero,
    .flush = no_flush,
    .size = no_size,
};

int vc_rbd_deep_copy(struct vc_rbd *src, struct vc_rbd *dst, int (*progress)(void *ctx, uint64_t done, uint64_t total),
                     void *progress_ctx, struct vc_error *error)
{
    return vc_fail(error, EOPNOTSUPP, VC_SIDE_NONE, VC_OP_SETUP, 0, WHY);
}
