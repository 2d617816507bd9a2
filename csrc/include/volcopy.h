/*
 * volcopy: the one public header of the native copy engine.
 *
 * Every function returns 0 (or a count) on success and a negative errno on failure; failure detail
 * travels in struct vc_error. The library never prints, exits or aborts.
 *
 * This file is also the cffi cdef (preprocessor lines are stripped by csrc/build_ffi.py), so it keeps to
 * plain declarations: enums for constants, fixed-width types, no macros in declarations.
 */
#ifndef VOLCOPY_H
#define VOLCOPY_H

#include <stddef.h>
#include <stdint.h>

enum {
    VC_CHUNK_SIZE = 1048576, /* the digest chunk: 1 MiB */
    VC_DIGEST_SIZE = 16,     /* canonical (big-endian) XXH3-128 */
    VC_ALIGN = 4096,         /* buffer, offset and zero-detection granule for O_DIRECT */
    VC_MESSAGE_SIZE = 256,
    VC_MAX_BUFFER_BYTES = 1073741824 /* queue_depth * block_size is capped at 1 GiB */
};

enum vc_engine {
    VC_ENGINE_AUTO = 0,
    VC_ENGINE_URING = 1,
    VC_ENGINE_AIO = 2,
    VC_ENGINE_SYNC = 3,
    VC_ENGINE_THREADS = 4
};

enum vc_kind {
    VC_KIND_FILE = 1,
    VC_KIND_BLOCKDEV = 2,
    VC_KIND_RBD = 3 /* a Ceph RBD image through librbd: no descriptor, see vc_rbd_open */
};

enum vc_side {
    VC_SIDE_NONE = 0,
    VC_SIDE_SRC = 1,
    VC_SIDE_DST = 2,
    VC_SIDE_CHECKPOINT = 3
};

enum vc_op {
    VC_OP_NONE = 0,
    VC_OP_READ = 1,
    VC_OP_WRITE = 2,
    VC_OP_FLUSH = 3,
    VC_OP_ZERO = 4,
    VC_OP_SETUP = 5,
    VC_OP_CHECKPOINT = 6
};

enum vc_flags {
    VC_FLAG_SPARSE = 1,      /* skip holes (files) and detect zero blocks */
    VC_FLAG_DST_IS_ZERO = 2, /* the caller promises dst reads as zeros: never zero it */
    VC_FLAG_DIGEST = 4,      /* fill chunk_digests and the volume digest */
    VC_FLAG_DST_NEW = 8,     /* dst was created for this copy: a checkpoint with progress cannot be its */
    VC_FLAG_SRC_FROM_CACHE = 16 /* src is a direct file on a local file system: read the pages the page
                                   cache holds through it */
};

/* An RBD image opened by vc_rbd_open; opaque. */
struct vc_rbd;

/* One side of a copy. The caller opens the descriptors (or the image) and keeps ownership of them. */
struct vc_endpoint {
    int fd;          /* queued I/O; opened with O_DIRECT when direct is set (-1 for an RBD image) */
    int fd_buffered; /* unaligned pieces (and the tail) go through the page cache; == fd when !direct */
    int kind;        /* enum vc_kind */
    int direct;
    struct vc_rbd *rbd; /* VC_KIND_RBD: the image */
};

struct vc_copy_params {
    struct vc_endpoint src;
    struct vc_endpoint dst;      /* dst.fd < 0 and no dst.rbd: read and hash only (the digest of src) */
    uint64_t length;             /* bytes from offset 0 */
    int engine;                  /* enum vc_engine */
    uint32_t block_size;         /* a multiple of VC_CHUNK_SIZE */
    uint32_t queue_depth;        /* blocks in flight */
    uint32_t flags;              /* enum vc_flags */
    uint64_t rate_limit;         /* bytes read per second, 0 = unlimited */
    /* With rate_limit set: the limit from now on, read at every turn of the copy loop (another thread
     * stores it; 0 keeps the last one). NULL: rate_limit holds for the whole copy. */
    const uint64_t *rate_live;
    /* A copy stores here, at every turn, the offset below which dst holds the copy (written, maybe not
     * flushed yet), and length once dst is flushed. NULL: not published. */
    uint64_t *written_until;
    /* A run without dst reads no further than this, and waits for it to grow: the verification of a copy
     * that is still running, reading dst behind the copy's written_until. NULL: no limit. */
    const uint64_t *readable_until;
    const int64_t *extents;      /* sorted disjoint (offset, length) pairs; NULL = the whole volume */
    uint64_t n_extents;
    /* With VC_FLAG_DIGEST: VC_DIGEST_SIZE bytes per chunk of length, zero-filled on entry. A chunk that
     * reads as zeros is left as 16 zero bytes (a hole touches no page); any other gets its digest. */
    uint8_t *chunk_digests;
    const char *checkpoint_path; /* NULL: no checkpoint */
    /* What a checkpoint must match to be resumed: src and its state, dst's identity, the request. */
    uint64_t fingerprint_src;
    uint64_t fingerprint_dst;
    uint64_t fingerprint_request;
    /* Polled by the pipeline (at least every 50 ms, also while zeroing): once another thread stores a
     * non-zero value the copy stops with -ECANCELED. NULL: not cancellable this way. */
    const int32_t *cancel;
    /* called from the copying thread about every 100 ms and at the end; non-zero cancels the copy */
    int (*progress)(void *ctx, uint64_t done, uint64_t total);
    void *progress_ctx;
};

struct vc_copy_result {
    uint64_t bytes_read;    /* read from src */
    uint64_t bytes_written; /* written to dst as data */
    uint64_t bytes_skipped; /* holes of src, never read */
    uint64_t bytes_zero;    /* read, found zero, not written as data */
    uint64_t bytes_from_cache; /* of bytes_read, read from the page cache (VC_FLAG_SRC_FROM_CACHE) */
    uint64_t resumed_from;  /* offset a checkpoint let this run start at */
    int engine;             /* the engine that ran */
    uint8_t digest[16];     /* with VC_FLAG_DIGEST */
};

struct vc_error {
    int err;     /* positive errno */
    int side;    /* enum vc_side */
    int op;      /* enum vc_op */
    uint64_t offset;
    char message[256];
};

/* Copy (or, with no dst, hash) a volume. -ECANCELED when *cancel was set or progress asked to stop. */
int vc_copy(const struct vc_copy_params *params, struct vc_copy_result *result, struct vc_error *error);

/* 0 when the engine can run here; otherwise -errno and the reason in error->message. */
int vc_engine_available(int engine, struct vc_error *error);

/* Whether the engine was compiled in at all. */
int vc_engine_compiled(int engine);

/* Where a copy with this checkpoint would resume (0 when it is new or unreadable). */
uint64_t vc_checkpoint_resume_offset(const char *path);

/* Up to cap data extents of a volume within [start, end) as (offset, length) pairs; *next is where to
 * ask again (== end when done). Returns the count or -errno. */
int vc_extents(const struct vc_endpoint *volume, uint64_t start, uint64_t end, int64_t *out, uint32_t cap,
               uint64_t *next);

/* The volume digest of a volume of length bytes from its chunk digests as vc_copy records them (all
 * chunk_count(length) of them): the XXH3-128 of the chunks' digests concatenated, where a chunk recorded
 * as zeros has the digest of its zeros. */
void vc_volume_digest_recorded(const uint8_t *chunk_digests, uint64_t length, uint8_t *out);

/* Canonical XXH3-128 of a buffer. */
void vc_hash128(const void *buf, size_t len, uint8_t *out);

/* Whether len bytes at buf are all zero, at memory speed. */
int vc_is_zero(const void *buf, size_t len);

const char *vc_version(void);

/* ---- Ceph RBD images (endpoint_rbd.c; without librbd at build time each call fails with EOPNOTSUPP) ---- */

/* Which image, and how to reach its cluster: QEMU's rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=..][:id=..]. */
struct vc_rbd_spec {
    const char *pool;
    const char *pool_namespace; /* "" or NULL: the default namespace */
    const char *image;
    const char *snap;           /* NULL: the image itself; a snapshot is read-only */
    const char *conf;           /* NULL: librados' default search (/etc/ceph/ceph.conf, ...) */
    const char *user;           /* NULL: "admin" (the client.admin entity) */
    const char *const *options; /* key, value, key, value, ...: more librados settings (mon_host, keyring) */
    uint32_t n_options;         /* pairs */
    uint32_t own_clients;       /* clients of the caller's own that have the image open (os-brick's
                                 * wrapper): not counted as someone else using it */
};

enum vc_rbd_flags {
    VC_RBD_WRITE = 1, /* open for writing (refused for a snapshot) */
    VC_RBD_CREATE = 2 /* with VC_RBD_WRITE: create the image (of create_size bytes) when it does not exist */
};

/* What makes an image itself (the same-volume refusal and the checkpoint's fingerprint). */
struct vc_rbd_info {
    uint64_t size;
    uint64_t object_size;
    uint64_t snap_id;      /* the snapshot read, or UINT64_MAX for the image itself */
    int64_t pool_id;
    int64_t modified_sec;  /* the image's last write, as librbd records it (0 when unknown) */
    int64_t modified_nsec;
    char fsid[64];         /* the cluster's */
    char image_id[64];     /* stays the same across renames */
};

int vc_rbd_compiled(void);
/* Opens (and with VC_RBD_CREATE may create) an image; *created says whether it was created. */
int vc_rbd_open(const struct vc_rbd_spec *spec, int flags, uint64_t create_size, struct vc_rbd **out,
                int *created, struct vc_error *error);
int vc_rbd_info(struct vc_rbd *image, struct vc_rbd_info *info);
/* A synchronous read, for comparisons outside a copy; returns the bytes read or -errno. */
int64_t vc_rbd_read(struct vc_rbd *image, void *buf, uint64_t len, uint64_t offset);
/* Closes the image and deletes it: for an image this process created and did not finish. */
int vc_rbd_remove(struct vc_rbd *image);
void vc_rbd_close(struct vc_rbd *image);
/* A copy inside one cluster by librbd (rbd_deep_copy): whole objects, holes skipped, one call. The bytes
 * still pass through this client (read from src's OSDs, written to dst's). dst (opened with
 * VC_RBD_WRITE) is replaced: it must be empty (no allocated object), of src's size, with no snapshot,
 * open nowhere else, and src must have no snapshot (they would be carried onto dst); dst is removed,
 * made again by the copy under its name with its own layout (features, object size, striping, data
 * pool), flattened, and reopened in the same handle. -EEXIST (with the reason) when dst may not be
 * replaced, -EBUSY when it is open elsewhere. progress (or NULL) is called from librbd's threads with the
 * objects copied and their number; librbd ignores what it returns: the copy cannot be stopped. */
int vc_rbd_deep_copy(struct vc_rbd *src, struct vc_rbd *dst, int (*progress)(void *ctx, uint64_t done, uint64_t total),
                     void *progress_ctx, struct vc_error *error);

#endif
