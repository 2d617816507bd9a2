/* The slots' buffers: one arena of queue_depth blocks, from which each unit takes a run of 64 KiB granules
 * as long as its data (from its first read to the end of its last), not a whole block. Data, not slots,
 * then bounds what is in flight: a sparse volume's units, which hold a little data each, fill more slots.
 * With a block per slot, W6 (256 KiB extents, one per 1 MiB unit) had 8 MiB in flight at depth 32, where
 * a dense copy has 32 MiB, and waited on the disk's latency. */
#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "engine.h"

#define GRANULE (64u << 10)
#define HUGE_PAGE_SIZE (2u << 20)

static bool granule_used(const struct engine *g, unsigned i)
{
    return g->granules_used[i / 64] >> (i % 64) & 1;
}

static void mark(struct engine *g, unsigned first, unsigned count, bool used)
{
    for (unsigned i = first; i < first + count; i++) {
        uint64_t bit = 1ull << (i % 64);
        g->granules_used[i / 64] = used ? g->granules_used[i / 64] | bit : g->granules_used[i / 64] & ~bit;
    }
}

/* The buffers sit on huge pages where the kernel can give them. A direct request is one run of physical
 * memory per page of its buffer; past the device's limit on such runs (a loop device takes 128, the
 * virtio disk here 254) the block layer splits the request, and io_uring cannot split one without
 * blocking, so it hands every such request to a kernel worker thread and wakes it. On 4 KiB pages that
 * is every 1 MiB request; on 2 MiB pages a 1 MiB request is a handful of runs and is issued at once.
 * 16 GiB loop device to loop device, 1 MiB x 16: 1.44-1.89 s and 0.30-0.38 s of system time before,
 * 1.09-1.43 s and 0.28-0.33 s after (with cooperative completions, io_uring.c: 1.03-1.33 s, 0.12-0.15 s). */
int buffers_open(struct engine *g, size_t size)
{
    g->n_granules = (unsigned)(size / GRANULE);
    g->granules_used = calloc((g->n_granules + 63) / 64, sizeof(uint64_t));
    if (!g->granules_used || posix_memalign((void **)&g->buffers, HUGE_PAGE_SIZE, size))
        return -ENOMEM;
    g->buffers_size = size;
    madvise(g->buffers, size, MADV_HUGEPAGE); /* a hint: where it is refused, 4 KiB pages still work */
    return 0;
}

/* A buffer for the unit in s (its reads in s->ops), first fit; false when no run of free granules is long
 * enough yet. With nothing in flight every granule is free, and a unit is never longer than a block. */
bool take_buffer(struct engine *g, struct slot *s)
{
    uint64_t first = s->n_ops ? s->ops[0].off : s->start;
    uint64_t end = s->n_ops ? s->ops[s->n_ops - 1].off + s->ops[s->n_ops - 1].len : s->start;
    s->base = VC_ROUND_DOWN(first, VC_ALIGN);
    unsigned need = (unsigned)((end - s->base + GRANULE - 1) / GRANULE);
    unsigned run = 0;

    s->granule = 0;
    for (unsigned i = 0; i < g->n_granules && run < need; i++) {
        if (i % 64 == 0 && g->granules_used[i / 64] == UINT64_MAX && i + 64 <= g->n_granules) {
            run = 0;
            i += 63;
            continue;
        }
        run = granule_used(g, i) ? 0 : run + 1;
        if (run == need)
            s->granule = i + 1 - need;
    }
    if (run < need)
        return false;
    s->granules = need;
    mark(g, s->granule, need, true);
    s->buf = g->buffers + (size_t)s->granule * GRANULE;
    return true;
}

void give_back_buffer(struct engine *g, struct slot *s)
{
    mark(g, s->granule, s->granules, false);
    s->granules = 0;
}

void buffers_close(struct engine *g)
{
    free(g->buffers);
    free(g->granules_used);
}
