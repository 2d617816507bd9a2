/* Progress reports, cancellation, and checkpoints.
 *
 * The checkpoint rule: the saved watermark never passes a unit still in a slot, a range still waiting
 * to be zeroed, or the lowest offset any failure touched, and it is saved only right after a successful
 * flush of dst. Once a flush has failed nothing more is saved: Linux reports a writeback error once, so
 * a later flush could succeed over writes that were lost. */
#include <errno.h>
#include <time.h>

#include "engine.h"

#define PROGRESS_NS 100000000ull        /* progress (and the callback's cancel) every 100 ms */
#define CHECKPOINT_NS 2000000000ull     /* checkpoint at least every 2 s ... */
#define CHECKPOINT_BYTES (256ull << 20) /* ... and every 256 MiB */

bool stop_requested(struct engine *g)
{
    if (!g->status && g->p->cancel && __atomic_load_n(g->p->cancel, __ATOMIC_RELAXED))
        fail_with(g, ECANCELED, VC_SIDE_NONE, VC_OP_NONE, g->pos, "cancelled");
    return g->status != 0;
}

void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Everything below it is done in dst (but maybe not durable yet). */
static uint64_t watermark(struct engine *g)
{
    uint64_t w = VC_MIN(g->pos, g->fail_floor);
    for (unsigned i = 0; i < g->n_slots; i++)
        if (g->slots[i].state != SLOT_FREE)
            w = VC_MIN(w, g->slots[i].start);
    if (g->zero_pending.len)
        w = VC_MIN(w, g->zero_pending.off);
    if (w >= g->end)
        return g->end;
    return g->p->extents ? VC_ROUND_DOWN(w, VC_ALIGN) : VC_ROUND_DOWN(w, VC_CHUNK_SIZE);
}

int save_checkpoint(struct engine *g)
{
    g->ckpt_last_ns = vc_now_ns();
    g->ckpt_last_done = g->done;
    if (!g->status && zero_flush(g) < 0)
        return -1;
    uint64_t w = watermark(g);
    if (g->flush_failed || w <= g->ckpt_watermark)
        return 0;
    /* dst first: a checkpoint must never be ahead of what dst durably holds. */
    int rc = g->dst_ops->flush(&g->p->dst);
    if (rc < 0)
        return fail(g, -rc, VC_SIDE_DST, VC_OP_FLUSH, 0, "flush");
    rc = vc_checkpoint_save(&g->ckpt, w, g->digest ? g->p->chunk_digests : NULL);
    if (rc < 0)
        return fail(g, -rc, VC_SIDE_CHECKPOINT, VC_OP_CHECKPOINT, w, "saving the checkpoint");
    g->ckpt_watermark = w;
    return 0;
}

/* A rate limit another thread changed (a mover sharing its budget among its copies). The size of a
 * read stays as the first limit made it: a higher rate only means more of them. */
static void follow_rate(struct engine *g)
{
    uint64_t rate = __atomic_load_n(g->p->rate_live, __ATOMIC_RELAXED);
    if (rate && rate != g->throttle.rate)
        vc_throttle_set(&g->throttle, rate, VC_MAX(g->io_max, rate / 20));
}

void tick(struct engine *g)
{
    uint64_t now = vc_now_ns();
    /* Below end: the flush at the end publishes end, once dst holds all of it. */
    if (g->p->written_until)
        __atomic_store_n(g->p->written_until, VC_MIN(watermark(g), g->end - 1), __ATOMIC_RELEASE);
    if (g->p->rate_live && g->p->rate_limit)
        follow_rate(g);
    if (g->p->progress && now - g->last_progress_ns >= PROGRESS_NS) {
        g->last_progress_ns = now;
        if (g->p->progress(g->p->progress_ctx, g->done, g->total) && !g->status)
            fail_with(g, ECANCELED, VC_SIDE_NONE, VC_OP_NONE, g->pos, "cancelled");
        now = vc_now_ns(); /* a slow callback must not put off a checkpoint that fell due meanwhile */
    }
    if (g->ckpt_open && !stop_requested(g) &&
        (now - g->ckpt_last_ns >= CHECKPOINT_NS || g->done - g->ckpt_last_done >= CHECKPOINT_BYTES))
        save_checkpoint(g);
}
