/* Failures: the first one is what the caller hears about (errno, side, operation, offset, message);
 * every one lowers the floor that a checkpoint may never pass, and a failed flush ends checkpointing. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "engine.h"

int vc_fail(struct vc_error *e, int err, int side, int op, uint64_t offset, const char *fmt, ...)
{
    if (e && !e->err) {
        va_list ap;
        e->err = err;
        e->side = side;
        e->op = op;
        e->offset = offset;
        va_start(ap, fmt);
        vsnprintf(e->message, sizeof(e->message), fmt, ap);
        va_end(ap);
    }
    return -err;
}

static void record(struct engine *g, int err, int side, int op, uint64_t offset)
{
    if (!g->status)
        g->status = -err;
    /* A failed flush may have lost any write since the last good one, and Linux reports a writeback
     * error only once: a second flush would succeed over the lost data. */
    if (op == VC_OP_FLUSH)
        g->flush_failed = true;
    else if (side == VC_SIDE_SRC || side == VC_SIDE_DST)
        g->fail_floor = VC_MIN(g->fail_floor, offset);
}

int fail_with(struct engine *g, int err, int side, int op, uint64_t offset, const char *fmt, ...)
{
    if (!g->e->err) {
        va_list ap;
        g->e->err = err;
        g->e->side = side;
        g->e->op = op;
        g->e->offset = offset;
        va_start(ap, fmt);
        vsnprintf(g->e->message, sizeof(g->e->message), fmt, ap);
        va_end(ap);
    }
    record(g, err, side, op, offset);
    return -1;
}

int fail(struct engine *g, int err, int side, int op, uint64_t offset, const char *what)
{
    const char *name = side == VC_SIDE_SRC ? "source" : side == VC_SIDE_DST ? "destination" : "checkpoint";
    if (side == VC_SIDE_NONE || op == VC_OP_FLUSH) /* a flush covers everything written: no offset */
        return fail_with(g, err, side, op, offset, "%s failed%s%s: %s", what, side == VC_SIDE_NONE ? "" : " on the ",
                         side == VC_SIDE_NONE ? "" : name, strerror(err));
    return fail_with(g, err, side, op, offset, "%s failed on the %s at offset %llu: %s", what, name,
                     (unsigned long long)offset, strerror(err));
}
