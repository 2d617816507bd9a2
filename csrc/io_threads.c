/* The threads engine: pread/pwrite on a small pool of worker threads, the way QEMU's aio=threads works.
 *
 * It exists for files in memory (tmpfs, ramfs). There every transfer is a memcpy done by whichever CPU
 * asks for it: io_uring and aio complete such requests inline, on the one thread that submits them, so
 * the copy runs on one CPU however deep the queue. Workers put the other CPUs to work: a read of one
 * slot runs beside the write of another. Writes to a file in memory hold its inode lock, so a second
 * write would only make its worker wait while reads are queued: in memory, one write runs at a time
 * and the other workers read. The engine's own thread keeps the zero scan and the hash.
 *
 * 2 GiB tmpfs to tmpfs on 2 CPUs, `volcopy copy --engine E` (benchmarks/tmpfs_engines.sh 8), medians of 8
 * interleaved runs: sync 1.13 s, threads 0.86 s (nbdcopy, two threads of pread/pwrite: 0.83 s).
 *
 * It also carries the requests to an RBD image (rq->rbd): those go to librbd's own asynchronous I/O at
 * once, and librbd's thread puts their completions into the same ring as the workers', so one wait
 * covers both sides of a copy between a file and an image.
 *
 * The queues are this copy's own, under this copy's own lock: nothing is shared between copies. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define MAX_WORKERS 8

struct ring {
    struct vc_io_request *entries; /* cap of them */
    unsigned head, count;
};

struct threads_state {
    pthread_mutex_t lock;
    pthread_cond_t work_ready; /* a request was queued, or the pool is stopping */
    pthread_cond_t work_done;  /* a request completed */
    unsigned cap;              /* the engine never has more than this many requests out */
    struct ring reads, writes; /* requests not yet taken by a worker */
    struct vc_io_completion *completed; /* a ring of cap entries */
    unsigned completed_head, completed_count;
    bool one_write_at_a_time;
    unsigned writing; /* writes a worker is running */
    bool stopping;
    pthread_t workers[MAX_WORKERS];
    unsigned n_workers;
};

static struct vc_io_request ring_take(struct ring *r, unsigned cap)
{
    struct vc_io_request rq = r->entries[r->head];
    r->head = (r->head + 1) % cap;
    r->count--;
    return rq;
}

/* Writes first (they free the engine's slots), unless one is running where only one may. */
static struct ring *next_work(struct threads_state *s)
{
    if (s->writes.count && !(s->one_write_at_a_time && s->writing))
        return &s->writes;
    return s->reads.count ? &s->reads : NULL;
}

static void complete_locked(struct threads_state *s, uint64_t tag, int64_t res)
{
    s->completed[(s->completed_head + s->completed_count++) % s->cap] = (struct vc_io_completion){.tag = tag, .res = res};
    pthread_cond_signal(&s->work_done);
}

/* On librbd's thread. */
static void rbd_done(void *ctx, uint64_t tag, int64_t res)
{
    struct threads_state *s = ctx;
    pthread_mutex_lock(&s->lock);
    complete_locked(s, tag, res);
    pthread_mutex_unlock(&s->lock);
}

static void *worker(void *arg)
{
    struct threads_state *s = arg;
    struct ring *from;

    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!(from = next_work(s)) && !s->stopping)
            pthread_cond_wait(&s->work_ready, &s->lock);
        if (!from)
            break; /* stopping; a write still waiting is taken by the worker running the one before */
        struct vc_io_request rq = ring_take(from, s->cap);
        bool write = rq.op == VC_OP_WRITE;
        s->writing += write;
        pthread_mutex_unlock(&s->lock);

        ssize_t n = write ? pwrite(rq.fd, rq.buf, rq.len, (off_t)rq.offset)
                          : pread(rq.fd, rq.buf, rq.len, (off_t)rq.offset);
        int64_t res = n < 0 ? -errno : n; /* short transfers and EINTR are retried by the engine */

        pthread_mutex_lock(&s->lock);
        s->writing -= write;
        complete_locked(s, rq.tag, res);
        if (write && s->writes.count)
            pthread_cond_signal(&s->work_ready); /* the next write may go now */
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

static void stop_workers(struct threads_state *s)
{
    pthread_mutex_lock(&s->lock);
    s->stopping = true;
    pthread_cond_broadcast(&s->work_ready);
    pthread_mutex_unlock(&s->lock);
    for (unsigned i = 0; i < s->n_workers; i++)
        pthread_join(s->workers[i], NULL);
    s->n_workers = 0;
}

static void free_state(struct threads_state *s)
{
    pthread_cond_destroy(&s->work_done);
    pthread_cond_destroy(&s->work_ready);
    pthread_mutex_destroy(&s->lock);
    free(s->reads.entries);
    free(s->writes.entries);
    free(s->completed);
    free(s);
}

/* One worker per CPU: each transfer keeps its CPU busy, more workers would only take turns. */
static unsigned worker_count(unsigned max_inflight)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned n = cpus > 0 ? (unsigned)cpus : 1;
    return VC_MAX(1u, VC_MIN(VC_MIN(n, (unsigned)MAX_WORKERS), max_inflight));
}

static int threads_init(struct vc_io *io, const struct vc_io_setup *setup, struct vc_error *error)
{
    struct threads_state *s = calloc(1, sizeof(*s));
    pthread_condattr_t attr;
    sigset_t all, saved;

    if (!s)
        return vc_fail(error, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "out of memory");
    s->cap = setup->max_inflight;
    s->one_write_at_a_time = setup->one_write_at_a_time;
    s->reads.entries = calloc(s->cap, sizeof(struct vc_io_request));
    s->writes.entries = calloc(s->cap, sizeof(struct vc_io_request));
    s->completed = calloc(s->cap, sizeof(*s->completed));
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->work_ready, NULL);
    /* reap's timeout is measured on the monotonic clock: a change of the wall clock must not stall it. */
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&s->work_done, &attr);
    pthread_condattr_destroy(&attr);
    if (!s->reads.entries || !s->writes.entries || !s->completed) {
        free_state(s);
        return vc_fail(error, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "out of memory");
    }

    /* Workers block every signal: a Ctrl-C must reach the caller's thread (Python's handler), not a
     * worker in the middle of a pwrite. They inherit the mask they are created with. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    unsigned want = worker_count(setup->max_inflight);
    int rc = 0;
    while (s->n_workers < want && (rc = pthread_create(&s->workers[s->n_workers], NULL, worker, s)) == 0)
        s->n_workers++;
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    if (rc) {
        stop_workers(s);
        free_state(s);
        return vc_fail(error, rc, VC_SIDE_NONE, VC_OP_SETUP, 0, "cannot start an I/O thread: %s", strerror(rc));
    }
    io->priv = s;
    return 0;
}

static int threads_queue(struct vc_io *io, const struct vc_io_request *rq)
{
    struct threads_state *s = io->priv;
    struct ring *r = rq->op == VC_OP_WRITE ? &s->writes : &s->reads;
    if (rq->rbd) {
        int rc = vc_rbd_aio(rq->rbd, rq->op, rq->buf, rq->len, rq->offset, rbd_done, s, rq->tag);
        if (rc < 0) /* as a completion: the engine names the side and offset that failed */
            rbd_done(s, rq->tag, rc);
        return 0;
    }
    pthread_mutex_lock(&s->lock);
    if (r->count == s->cap) {
        pthread_mutex_unlock(&s->lock);
        return -EBUSY;
    }
    r->entries[(r->head + r->count++) % s->cap] = *rq;
    pthread_cond_signal(&s->work_ready);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int threads_submit(struct vc_io *io)
{
    (void)io; /* a queued request is already on its way */
    return 0;
}

static int threads_reap(struct vc_io *io, struct vc_io_completion *out, unsigned max, unsigned min,
                        int timeout_ms)
{
    struct threads_state *s = io->priv;
    struct timespec deadline;
    unsigned n = 0;

    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&s->lock);
    while (s->completed_count < min) {
        int rc = timeout_ms < 0 ? pthread_cond_wait(&s->work_done, &s->lock)
                                : pthread_cond_timedwait(&s->work_done, &s->lock, &deadline);
        if (rc == ETIMEDOUT)
            break;
    }
    while (n < max && s->completed_count) {
        out[n++] = s->completed[s->completed_head];
        s->completed_head = (s->completed_head + 1) % s->cap;
        s->completed_count--;
    }
    pthread_mutex_unlock(&s->lock);
    return (int)n;
}

static void threads_fini(struct vc_io *io)
{
    struct threads_state *s = io->priv;
    if (s) {
        stop_workers(s);
        free_state(s);
    }
    io->priv = NULL;
}

const struct vc_io_ops vc_io_threads_ops = {
    .name = "threads",
    .engine = VC_ENGINE_THREADS,
    .init = threads_init,
    .queue = threads_queue,
    .submit = threads_submit,
    .reap = threads_reap,
    .fini = threads_fini,
};
