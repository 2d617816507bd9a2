/* Declarations shared between the engine's files; nothing here is public. */
#ifndef VC_INTERNAL_H
#define VC_INTERNAL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>

#include "volcopy.h"

#define VC_MIN(a, b) ((a) < (b) ? (a) : (b))
#define VC_MAX(a, b) ((a) > (b) ? (a) : (b))
#define VC_ROUND_DOWN(x, a) ((x) / (a) * (a))
#define VC_ROUND_UP(x, a) (((x) + (a) - 1) / (a) * (a))

/* ---- I/O backends (io_uring.c, io_aio.c, io_sync.c, io_threads.c): one table each ---- */

struct vc_io_request {
    int op; /* VC_OP_READ or VC_OP_WRITE */
    int fd;
    struct vc_rbd *rbd; /* instead of fd: an RBD image, through librbd's own asynchronous I/O */
    void *buf;
    uint32_t len;
    uint64_t offset;
    uint64_t tag;
    int buf_index; /* which registered buffer holds buf, -1 if none */
    bool cached;   /* a read of pages the page cache holds (a memory copy, no device I/O) */
};

struct vc_io_completion {
    uint64_t tag;
    int64_t res; /* bytes transferred or -errno */
};

struct vc_io_setup {
    unsigned max_inflight; /* the engine never queues more requests than this */
    void *buffers;         /* n_buffers buffers of buffer_size bytes, one after another, to register */
    unsigned n_buffers;
    size_t buffer_size;
    int fds[2]; /* descriptors worth registering (-1: none) */
    bool one_write_at_a_time; /* dst is in memory: its writes hold the inode lock (threads engine) */
};

struct vc_io;

struct vc_io_ops {
    const char *name;
    int engine; /* enum vc_engine */
    /* 0 or -errno with a reason in error->message */
    int (*init)(struct vc_io *io, const struct vc_io_setup *setup, struct vc_error *error);
    /* Queue one request; it may run at once (sync) or on submit. */
    int (*queue)(struct vc_io *io, const struct vc_io_request *rq);
    /* Hand what was queued to the kernel. On failure every request not submitted completes (in reap)
     * with the error, and -errno is returned. */
    int (*submit)(struct vc_io *io);
    /* Wait for at least min completions (at most timeout_ms), store up to max; returns the count. */
    int (*reap)(struct vc_io *io, struct vc_io_completion *out, unsigned max, unsigned min, int timeout_ms);
    void (*fini)(struct vc_io *io);
};

struct vc_io {
    const struct vc_io_ops *ops;
    void *priv;
};

extern const struct vc_io_ops vc_io_uring_ops; /* NULL-safe: see vc_io_backend() */
extern const struct vc_io_ops vc_io_aio_ops;
extern const struct vc_io_ops vc_io_sync_ops;
extern const struct vc_io_ops vc_io_threads_ops;

/* The table for an engine, or NULL when it was not compiled in. */
const struct vc_io_ops *vc_io_backend(int engine);

/* ---- endpoints (endpoint_file.c, endpoint_blockdev.c, endpoint_rbd.c): one table each ---- */

struct vc_endpoint_ops {
    const char *name;
    /* The first data extent that ends after off, clipped to [off, end): *start == end when none.
     * Block devices have no holes: everything is data. */
    int (*next_data)(const struct vc_endpoint *ep, uint64_t off, uint64_t end, uint64_t *start, uint64_t *stop);
    /* Make [off, off+len) read as zeros without writing data; -EOPNOTSUPP when it cannot. */
    int (*zero)(const struct vc_endpoint *ep, uint64_t off, uint64_t len);
    int (*flush)(const struct vc_endpoint *ep);
    int (*size)(const struct vc_endpoint *ep, uint64_t *size);
};

extern const struct vc_endpoint_ops vc_endpoint_file_ops;
extern const struct vc_endpoint_ops vc_endpoint_blockdev_ops;
extern const struct vc_endpoint_ops vc_endpoint_rbd_ops;

/* One read or write of an RBD image, completed on librbd's thread by done(ctx, tag, bytes or -errno). */
int vc_rbd_aio(struct vc_rbd *image, int op, void *buf, uint32_t len, uint64_t offset,
               void (*done)(void *ctx, uint64_t tag, int64_t res), void *ctx, uint64_t tag);

const struct vc_endpoint_ops *vc_endpoint_ops_for(int kind);

/* ---- zero detection (zero.c) ---- */

bool vc_zero_check(const void *buf, size_t len);

/* ---- digests (digest.c) ---- */

void vc_digest_chunk(const void *buf, size_t len, uint8_t out[VC_DIGEST_SIZE]);
void vc_digest_zeros(uint64_t len, uint8_t out[VC_DIGEST_SIZE]);
void vc_digest_chunk_with_holes(const uint8_t *data, size_t from, size_t len, const uint64_t (*holes)[2],
                                unsigned n_holes, uint8_t out[VC_DIGEST_SIZE]);

/* ---- throttle (throttle.c): a token bucket on bytes read ---- */

struct vc_throttle {
    uint64_t rate;  /* bytes per second, 0 = off */
    uint64_t burst; /* the bucket's size */
    double tokens;
    uint64_t last_ns;
};

void vc_throttle_init(struct vc_throttle *t, uint64_t rate, uint64_t burst);
/* A new rate (and bucket) from now on; the credit held so far is kept, up to the new bucket. */
void vc_throttle_set(struct vc_throttle *t, uint64_t rate, uint64_t burst);
/* 0 when n bytes may go now (and takes them), else the milliseconds to wait. */
int vc_throttle_take(struct vc_throttle *t, uint64_t n);

uint64_t vc_now_ns(void);

/* ---- checkpoint (checkpoint.c) ---- */

struct vc_checkpoint_identity {
    uint64_t src, dst, request; /* the params' fingerprints */
};

struct vc_checkpoint {
    int fd;
    uint64_t seq;
    struct vc_checkpoint_identity identity;
    uint64_t length;
    uint64_t saved_chunks;  /* chunks below the saved watermark */
    uint64_t saved_records; /* records on disk: one per chunk below it that holds data */
};

/* Open or create; *watermark is where a previous run got to (0 when new), and the chunk digests
 * below it are loaded into digests (when not NULL). A saved checkpoint of another src, src state, dst
 * or request, or one with progress when dst is new, fails with ESTALE and the reason. */
int vc_checkpoint_open(struct vc_checkpoint *c, const char *path, const struct vc_checkpoint_identity *identity,
                       uint64_t length, bool dst_new, uint8_t *digests, uint64_t *watermark,
                       struct vc_error *error);
/* Durably record that everything below watermark is done (dst must already be flushed). */
int vc_checkpoint_save(struct vc_checkpoint *c, uint64_t watermark, const uint8_t *digests);
void vc_checkpoint_close(struct vc_checkpoint *c);

/* ---- errors (errors.c) ---- */

int vc_fail(struct vc_error *e, int err, int side, int op, uint64_t offset, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

#endif
