/* The data extents of a volume, through the same endpoint tables the engine uses to skip holes. */
#include "internal.h"

int vc_extents(const struct vc_endpoint *volume, uint64_t start, uint64_t end, int64_t *out, uint32_t cap,
               uint64_t *next)
{
    const struct vc_endpoint_ops *ops = vc_endpoint_ops_for(volume->kind);
    uint32_t n = 0;

    while (start < end && n < cap) {
        uint64_t ds, de;
        int rc = ops->next_data(volume, start, end, &ds, &de);
        if (rc < 0)
            return rc;
        if (ds >= end)
            break;
        out[2 * n] = (int64_t)ds;
        out[2 * n + 1] = (int64_t)(de - ds);
        n++;
        start = de;
    }
    *next = n < cap ? end : start;
    return (int)n;
}
