/* The copy engine's state, shared by the files that make up the pipeline; nothing here is public.
 *
 *   engine.c         vc_copy: set-up, the loop, the end of a copy
 *   engine_choice.c  which I/O engine runs a copy
 *   produce.c        cutting the volume into units: data extents, holes, explicit extents
 *   pipeline.c       slots: issuing reads and writes, completions, zero scan and hash of a unit
 *   buffers.c        the slots' buffers, each as long as its unit's data
 *   zeroing.c        making ranges of dst read as zeros
 *   progress.c       progress reports, cancellation, checkpoints and the watermark they record
 *   residency.c      which pages of src the page cache holds (read those through it)
 *   errors.c         recording the first failure, and the lowest offset any failure touched
 */
#ifndef VC_ENGINE_H
#define VC_ENGINE_H

#include "internal.h"

#define MAX_OPS 64 /* reads or writes per slot; more are merged */
/* Slots per block of buffer: units of a quarter block of data (W6's 256 KiB extents, one per 1 MiB unit)
 * fill the buffer as whole blocks would; smaller ones leave some of it unused. */
#define SLOTS_PER_BLOCK 4

enum slot_state { SLOT_FREE, SLOT_CUT, SLOT_READING, SLOT_WRITING }; /* cut: waiting to start (produce.c) */
#define NO_SLOT UINT32_MAX

struct extent {
    uint64_t off, len;
};

struct slot {
    uint8_t *buf;   /* holds the unit from offset base on (buffers.c) */
    uint64_t base;
    unsigned granule, granules; /* where buf lies in the arena */
    uint64_t start; /* the unit */
    uint64_t len;
    int state;
    bool buffered;              /* unaligned: all of its I/O goes through the page cache */
    struct extent ops[MAX_OPS]; /* the reads, then the writes */
    unsigned n_ops;
    unsigned next_op; /* issue cursor: which op, and how far into it */
    uint64_t next_off;
    unsigned in_flight;
    bool queued; /* waiting in an issue queue */
};

struct request {
    unsigned slot;
    int op;
    bool cached; /* a read of pages the page cache holds: through it, not O_DIRECT */
    uint64_t off;
    uint32_t len;
    uint8_t *buf;
    unsigned next_free;
};

struct residency {
    uint8_t *map; /* src mapped, never touched: mincore() asks about its pages (NULL: not in use) */
    size_t map_len;
    uint64_t page;
    unsigned char *vec; /* mincore's answer for one request */
};

struct zero_range {
    uint64_t off, len;
};

struct engine {
    const struct vc_copy_params *p;
    struct vc_copy_result *r;
    struct vc_error *e;
    const struct vc_endpoint_ops *src_ops, *dst_ops;
    bool has_dst, digest, sparse, any_direct;
    uint64_t end; /* == length */
    uint64_t io_max;

    struct vc_io io, io_buffered; /* the chosen engine, and the page-cache path for unaligned units */
    struct slot *slots;
    unsigned n_slots, busy_slots; /* busy: started, not yet finished */
    unsigned cut;                 /* the slot cut and not started yet, or NO_SLOT */
    bool buffered_busy;
    uint8_t *buffers; /* the arena the slots' buffers come from */
    size_t buffers_size;
    uint64_t *granules_used;
    unsigned n_granules;
    uint8_t *zero_buffer; /* for dst that cannot zero cheaply; allocated on first need */

    struct request *reqs;
    unsigned n_reqs, free_req;
    unsigned in_flight; /* requests queued and not yet completed, both paths */
    struct vc_io_completion *completions;

    unsigned *read_queue, *write_queue; /* slot indices waiting to issue, FIFO rings */
    unsigned rq_head, rq_count, wq_head, wq_count;

    /* the producer */
    uint64_t pos;                               /* next offset not yet handed to a slot or to the zeroer */
    uint64_t data_query, data_start, data_stop; /* the last next_data answer, asked at data_query */
    uint64_t data_limit;                        /* ... for the map up to data_limit */
    uint64_t ext_index;                         /* explicit extents: the one pos lies in or before */
    bool awaiting_writer;                       /* pos reached readable_until: nothing to hand out yet */

    struct zero_range zero_pending;
    bool zeroing_throttled; /* zeroing a device writes (or may write): it counts against the rate */
    uint8_t zero_digest_chunk[VC_DIGEST_SIZE], zero_digest_tail[VC_DIGEST_SIZE];

    struct residency residency;

    struct vc_throttle throttle;
    int throttle_wait_ms;

    uint64_t done, total;
    uint64_t last_progress_ns;

    struct vc_checkpoint ckpt;
    bool ckpt_open;
    uint64_t ckpt_last_ns, ckpt_last_done, ckpt_watermark;

    int status;           /* first failure, or -ECANCELED */
    uint64_t fail_floor;  /* the lowest offset of src or dst that any failure touched (UINT64_MAX: none) */
    bool flush_failed;    /* nothing written since the last good flush can be trusted: no more checkpoints */
};

/* errors.c: record a failure (the first one is reported; every one lowers fail_floor); return -1 */
int fail(struct engine *g, int err, int side, int op, uint64_t offset, const char *what);
int fail_with(struct engine *g, int err, int side, int op, uint64_t offset, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

/* engine_choice.c */
bool vc_in_memory(int fd);
int choose_engine(struct engine *g, const struct vc_io_setup *setup);

/* produce.c: fill free slots with units */
uint64_t readable_end(struct engine *g);
void produce(struct engine *g);
void add_op(struct slot *s, uint64_t off, uint64_t len);
int check_src_size(struct engine *g, uint64_t from); /* -1 (and the failure) when src shrank below length */

/* buffers.c */
int buffers_open(struct engine *g, size_t size);
bool take_buffer(struct engine *g, struct slot *s); /* false: not enough free yet, produce later */
void give_back_buffer(struct engine *g, struct slot *s);
void buffers_close(struct engine *g);

/* pipeline.c */
void slot_start(struct engine *g, unsigned i);
void issue(struct engine *g);
int reap(struct engine *g, struct vc_io *io, unsigned min, int timeout_ms);

/* zeroing.c */
int zero_add(struct engine *g, uint64_t off, uint64_t len);
int zero_flush(struct engine *g);
/* The chunk at chunk_offset has this digest; NULL: it reads as zeros. */
void record_digest(struct engine *g, uint64_t chunk_offset, const uint8_t digest[VC_DIGEST_SIZE]);

/* residency.c */
void residency_open(struct engine *g);
void residency_close(struct engine *g);
uint64_t resident_run(struct engine *g, uint64_t off, uint64_t len, bool *cached);

/* progress.c */
bool stop_requested(struct engine *g); /* a failure, or a cancel seen now (which becomes the status) */
void sleep_ms(int ms);
int save_checkpoint(struct engine *g);
void tick(struct engine *g);

#endif
