/* The sync engine: pread/pwrite, one request at a time. It also carries the unaligned pieces of any
 * engine through the page cache, so it is always compiled in. */
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

struct sync_state {
    struct vc_io_completion *done; /* completions not yet reaped, a ring */
    unsigned cap, head, count;
};

static int sync_init(struct vc_io *io, const struct vc_io_setup *setup, struct vc_error *error)
{
    struct sync_state *s = calloc(1, sizeof(*s));
    if (!s)
        return vc_fail(error, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "out of memory");
    s->cap = setup->max_inflight;
    s->done = calloc(s->cap, sizeof(*s->done));
    if (!s->done) {
        free(s);
        return vc_fail(error, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "out of memory");
    }
    io->priv = s;
    return 0;
}

static int sync_queue(struct vc_io *io, const struct vc_io_request *rq)
{
    struct sync_state *s = io->priv;
    ssize_t n;

    if (s->count == s->cap)
        return -EBUSY;
    if (rq->op == VC_OP_READ)
        n = pread(rq->fd, rq->buf, rq->len, (off_t)rq->offset);
    else
        n = pwrite(rq->fd, rq->buf, rq->len, (off_t)rq->offset);
    struct vc_io_completion *c = &s->done[(s->head + s->count++) % s->cap];
    c->tag = rq->tag;
    c->res = n < 0 ? -errno : n; /* short transfers and EINTR are retried by the engine */
    return 0;
}

static int sync_submit(struct vc_io *io)
{
    (void)io;
    return 0;
}

static int sync_reap(struct vc_io *io, struct vc_io_completion *out, unsigned max, unsigned min, int timeout_ms)
{
    struct sync_state *s = io->priv;
    unsigned n = 0;
    (void)min;
    (void)timeout_ms; /* everything queued has already completed */
    while (n < max && s->count) {
        out[n++] = s->done[s->head];
        s->head = (s->head + 1) % s->cap;
        s->count--;
    }
    return (int)n;
}

static void sync_fini(struct vc_io *io)
{
    struct sync_state *s = io->priv;
    if (s) {
        free(s->done);
        free(s);
    }
    io->priv = NULL;
}

const struct vc_io_ops vc_io_sync_ops = {
    .name = "sync",
    .engine = VC_ENGINE_SYNC,
    .init = sync_init,
    .queue = sync_queue,
    .submit = sync_submit,
    .reap = sync_reap,
    .fini = sync_fini,
};
