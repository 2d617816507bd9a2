/* The Linux AIO engine (libaio): the fallback where io_uring is missing or disabled. It only runs
 * asynchronously with O_DIRECT; on buffered descriptors io_submit completes the request before it
 * returns, which is still correct. */
#include "internal.h"

#ifdef VC_HAVE_AIO
#include <errno.h>
#include <libaio.h>
#include <stdlib.h>
#include <string.h>

struct aio_state {
    io_context_t ctx;
    struct iocb *iocbs;     /* one per request slot */
    struct iocb **pending;  /* queued, not yet submitted */
    unsigned *free_list;
    unsigned n_free, n_pending, cap;
    struct io_event *events;
    struct vc_io_completion *failed; /* requests io_submit refused, to hand back from reap */
    unsigned n_failed;
};

static int aio_init(struct vc_io *io, const struct vc_io_setup *setup, struct vc_error *error)
{
    struct aio_state *s = calloc(1, sizeof(*s));
    int rc;

    if (!s)
        return vc_fail(error, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "out of memory");
    s->cap = setup->max_inflight;
    s->iocbs = calloc(s->cap, sizeof(*s->iocbs));
    s->pending = calloc(s->cap, sizeof(*s->pending));
    s->free_list = calloc(s->cap, sizeof(*s->free_list));
    s->events = calloc(s->cap, sizeof(*s->events));
    s->failed = calloc(s->cap, sizeof(*s->failed));
    if (!s->iocbs || !s->pending || !s->free_list || !s->events || !s->failed) {
        rc = vc_fail(error, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "out of memory");
        goto fail;
    }
    rc = io_setup((int)s->cap, &s->ctx);
    if (rc < 0) {
        rc = vc_fail(error, -rc, VC_SIDE_NONE, VC_OP_SETUP, 0, "io_setup(%u): %s%s", s->cap, strerror(-rc),
                     rc == -EAGAIN ? " (fs.aio-max-nr is exhausted)" : "");
        goto fail;
    }
    for (unsigned i = 0; i < s->cap; i++)
        s->free_list[i] = s->cap - 1 - i;
    s->n_free = s->cap;
    io->priv = s;
    return 0;
fail:
    free(s->failed);
    free(s->iocbs);
    free(s->pending);
    free(s->free_list);
    free(s->events);
    free(s);
    return rc;
}

static int aio_queue(struct vc_io *io, const struct vc_io_request *rq)
{
    struct aio_state *s = io->priv;
    if (!s->n_free)
        return -EBUSY;
    struct iocb *cb = &s->iocbs[s->free_list[--s->n_free]];
    if (rq->op == VC_OP_READ)
        io_prep_pread(cb, rq->fd, rq->buf, rq->len, (long long)rq->offset);
    else
        io_prep_pwrite(cb, rq->fd, rq->buf, rq->len, (long long)rq->offset);
    cb->data = (void *)(uintptr_t)rq->tag;
    s->pending[s->n_pending++] = cb;
    return 0;
}

static int aio_submit(struct vc_io *io)
{
    struct aio_state *s = io->priv;
    unsigned done = 0;
    while (done < s->n_pending) {
        int rc = io_submit(s->ctx, (long)(s->n_pending - done), s->pending + done);
        if (rc == -EINTR)
            continue;
        if (rc == 0) /* nothing taken, no error: as good as EAGAIN */
            rc = -EAGAIN;
        if (rc < 0) {
            /* What was not submitted completes with the error (the engine must not wait for it). */
            for (unsigned i = done; i < s->n_pending; i++) {
                struct iocb *cb = s->pending[i];
                s->failed[s->n_failed++] = (struct vc_io_completion){(uint64_t)(uintptr_t)cb->data, rc};
                s->free_list[s->n_free++] = (unsigned)(cb - s->iocbs);
            }
            s->n_pending = 0;
            return rc;
        }
        done += (unsigned)rc;
    }
    s->n_pending = 0;
    return 0;
}

static int aio_reap(struct vc_io *io, struct vc_io_completion *out, unsigned max, unsigned min, int timeout_ms)
{
    struct aio_state *s = io->priv;
    struct timespec ts = {.tv_sec = timeout_ms / 1000, .tv_nsec = (timeout_ms % 1000) * 1000000L};
    unsigned want = VC_MIN(max, s->cap);
    if (s->n_failed) {
        unsigned n = VC_MIN(max, s->n_failed);
        memcpy(out, s->failed + s->n_failed - n, n * sizeof(*out));
        s->n_failed -= n;
        return (int)n;
    }
    int n = io_getevents(s->ctx, VC_MIN(min, want), want, s->events, &ts);

    if (n == -EINTR)
        return 0;
    if (n < 0)
        return n;
    for (int i = 0; i < n; i++) {
        struct iocb *cb = s->events[i].obj;
        out[i].tag = (uint64_t)(uintptr_t)s->events[i].data;
        out[i].res = (long)s->events[i].res; /* negative errno on failure */
        s->free_list[s->n_free++] = (unsigned)(cb - s->iocbs);
    }
    return n;
}

static void aio_fini(struct vc_io *io)
{
    struct aio_state *s = io->priv;
    if (!s)
        return;
    io_destroy(s->ctx);
    free(s->failed);
    free(s->iocbs);
    free(s->pending);
    free(s->free_list);
    free(s->events);
    free(s);
    io->priv = NULL;
}

const struct vc_io_ops vc_io_aio_ops = {
    .name = "aio",
    .engine = VC_ENGINE_AIO,
    .init = aio_init,
    .queue = aio_queue,
    .submit = aio_submit,
    .reap = aio_reap,
    .fini = aio_fini,
};
#endif
