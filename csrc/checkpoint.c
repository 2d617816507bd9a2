/* Checkpoint: a file that says how far a copy got, so that a copy killed at any moment resumes there.
 *
 * Layout: two 512-byte header slots at 0 and 512, then from 4096 on a record (chunk index, digest) for
 * each chunk below the watermark that holds data, in order; a chunk without a record reads as zeros. So
 * the file grows with the data copied, not with the volume: a mostly empty 8 TiB volume needs kilobytes.
 * A save appends the new records, syncs, then writes the header slot the last save did not use (which
 * counts the records), and syncs again. A torn header fails its checksum and the other slot, one save
 * older, wins: a crash at any moment leaves a valid checkpoint that is never ahead of what dst durably
 * holds. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "internal.h"

#define CKPT_MAGIC "VOLCOPYC"
/* 1 had one fingerprint for everything, 2 a digest for every chunk; such a checkpoint starts afresh */
#define CKPT_VERSION 3
#define CKPT_HEADER_SIZE 512
#define CKPT_RECORDS_AT 4096
#define CKPT_BATCH 2048 /* records read or written at a time: 48 KiB */

struct ckpt_record {
    uint64_t chunk;
    uint8_t digest[VC_DIGEST_SIZE];
};

struct ckpt_header {
    char magic[8];
    uint32_t version;
    uint32_t pad;
    uint64_t seq;
    struct vc_checkpoint_identity identity;
    uint64_t length;
    uint64_t watermark;
    uint64_t records; /* from CKPT_RECORDS_AT on */
    uint64_t checksum; /* XXH64 of everything above */
};

static uint64_t header_checksum(const struct ckpt_header *h)
{
    return XXH64(h, offsetof(struct ckpt_header, checksum), 0);
}

/* 1: the slot holds a valid header; 0: it does not; -errno: it could not be read. */
static int read_header(int fd, int slot, struct ckpt_header *h)
{
    ssize_t n = pread(fd, h, sizeof(*h), (off_t)slot * CKPT_HEADER_SIZE);
    if (n < 0)
        return -errno;
    return n == (ssize_t)sizeof(*h) && memcmp(h->magic, CKPT_MAGIC, 8) == 0 && h->version == CKPT_VERSION &&
           h->checksum == header_checksum(h);
}

/* The newer of the two valid header slots, or NULL; *rc is -errno when a slot could not be read (a
 * checkpoint that failed a read is not one to start afresh over). */
static struct ckpt_header *best_header(int fd, struct ckpt_header h[2], int *rc)
{
    struct ckpt_header *best = NULL;
    *rc = 0;
    for (int i = 0; i < 2; i++) {
        int valid = read_header(fd, i, &h[i]);
        *rc = valid < 0 ? valid : *rc;
        if (valid > 0 && (!best || h[i].seq > best->seq))
            best = &h[i];
    }
    return best;
}

/* Chunks whose digests are final below watermark: a partial last chunk counts once the copy reached
 * the end. */
static uint64_t chunks_below(uint64_t watermark, uint64_t length)
{
    return watermark >= length ? VC_ROUND_UP(length, VC_CHUNK_SIZE) / VC_CHUNK_SIZE : watermark / VC_CHUNK_SIZE;
}

/* Why a saved header cannot be resumed by this copy, or NULL when it can. */
static const char *mismatch(const struct ckpt_header *h, const struct vc_checkpoint *c, bool dst_new)
{
    if (h->length != c->length || h->identity.request != c->identity.request)
        return "other length or extents";
    if (h->identity.src != c->identity.src)
        return "the source is another volume, or it changed since (size, modification or change time)";
    if (h->identity.dst != c->identity.dst)
        return "the destination is another volume";
    if (dst_new && h->watermark)
        return "the destination was created anew, so it holds nothing the checkpoint recorded";
    return NULL;
}

static int full_pread(int fd, void *buf, size_t len, off_t off)
{
    for (size_t done = 0; done < len;) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, off + (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -EIO;
        done += (size_t)n;
    }
    return 0;
}

static int full_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    for (size_t done = 0; done < len;) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done, off + (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        done += (size_t)n;
    }
    return 0;
}

/* The digests of the records, each into its chunk's place; -EBADMSG for records out of order or beyond
 * the chunks the header counts (a checksum-valid header with such records was not written by us). */
static int load_records(int fd, uint64_t records, uint64_t chunks, uint8_t *digests)
{
    struct ckpt_record *batch = malloc(CKPT_BATCH * sizeof(*batch));
    uint64_t next_chunk = 0;
    int rc = batch ? 0 : -ENOMEM;

    for (uint64_t first = 0; first < records && rc == 0; first += CKPT_BATCH) {
        size_t n = (size_t)VC_MIN((uint64_t)CKPT_BATCH, records - first);
        rc = full_pread(fd, batch, n * sizeof(*batch), (off_t)(CKPT_RECORDS_AT + first * sizeof(*batch)));
        for (size_t i = 0; i < n && rc == 0; i++) {
            if (batch[i].chunk < next_chunk || batch[i].chunk >= chunks) {
                rc = -EBADMSG;
                break;
            }
            memcpy(digests + batch[i].chunk * VC_DIGEST_SIZE, batch[i].digest, VC_DIGEST_SIZE);
            next_chunk = batch[i].chunk + 1;
        }
    }
    free(batch);
    return rc;
}

/* Appends a record for each chunk in [from, to) that holds data; *records counts them. */
static int append_records(int fd, const uint8_t *digests, uint64_t from, uint64_t to, uint64_t *records)
{
    static const uint8_t zeros[VC_DIGEST_SIZE];
    struct ckpt_record *batch = malloc(CKPT_BATCH * sizeof(*batch));
    size_t n = 0;
    int rc = batch ? 0 : -ENOMEM;

    for (uint64_t chunk = from; chunk < to && rc == 0; chunk++) {
        if (memcmp(digests + chunk * VC_DIGEST_SIZE, zeros, VC_DIGEST_SIZE) != 0) {
            batch[n].chunk = chunk;
            memcpy(batch[n].digest, digests + chunk * VC_DIGEST_SIZE, VC_DIGEST_SIZE);
            n++;
        }
        if (n == CKPT_BATCH || (chunk + 1 == to && n)) {
            rc = full_pwrite(fd, batch, n * sizeof(*batch), (off_t)(CKPT_RECORDS_AT + *records * sizeof(*batch)));
            *records += rc == 0 ? n : 0;
            n = 0;
        }
    }
    free(batch);
    return rc;
}

/* Writes and syncs the header slot of save seq. */
static int write_header(struct vc_checkpoint *c, uint64_t seq, uint64_t watermark, uint64_t records)
{
    unsigned char slot[CKPT_HEADER_SIZE];
    struct ckpt_header h;

    memset(&h, 0, sizeof(h));
    memcpy(h.magic, CKPT_MAGIC, 8);
    h.version = CKPT_VERSION;
    h.seq = seq;
    h.identity = c->identity;
    h.length = c->length;
    h.watermark = watermark;
    h.records = records;
    h.checksum = header_checksum(&h);
    memset(slot, 0, sizeof(slot));
    memcpy(slot, &h, sizeof(h));
    int rc = full_pwrite(c->fd, slot, sizeof(slot), (off_t)(seq % 2) * CKPT_HEADER_SIZE);
    if (rc < 0)
        return rc;
    if (fdatasync(c->fd) < 0)
        return -errno;
    c->seq = seq;
    return 0;
}

/* 1 when the file is empty or a checkpoint of ours (of any version, or cut short): only those are
 * emptied to start afresh; 0 otherwise; -errno when it cannot be read. A checkpoint has its magic from
 * its creation on (start_afresh), and a save rewrites one slot at a time, so one of the two holds it. */
static int ours(int fd)
{
    char magic[8];
    struct stat st;

    if (fstat(fd, &st) < 0)
        return -errno;
    if (st.st_size == 0)
        return 1;
    for (int slot = 0; slot < 2; slot++) {
        ssize_t n = pread(fd, magic, 8, (off_t)slot * CKPT_HEADER_SIZE);
        if (n < 0)
            return -errno;
        if (n == 8 && memcmp(magic, CKPT_MAGIC, 8) == 0)
            return 1;
    }
    return 0;
}

/* Nothing to resume: the file is emptied and gets a header at once (watermark 0), so that it is known as
 * ours from then on. A file that is not ours (a checkpoint path given wrongly, naming someone's data) is
 * left as it is. */
static int start_afresh(struct vc_checkpoint *c, const char *path, struct vc_error *error)
{
    const char *why;
    int rc = ours(c->fd);

    if (rc == 1) {
        rc = ftruncate(c->fd, 0) < 0 ? -errno : write_header(c, 0, 0, 0);
        if (rc == 0)
            return 0;
        why = strerror(-rc);
    } else if (rc == 0) {
        rc = -ESTALE;
        why = "it is not a volcopy checkpoint: name another file, or remove it";
    } else {
        why = strerror(-rc);
    }
    vc_fail(error, -rc, VC_SIDE_CHECKPOINT, VC_OP_CHECKPOINT, 0, "cannot use checkpoint %s: %s", path, why);
    close(c->fd);
    c->fd = -1;
    return rc;
}

int vc_checkpoint_open(struct vc_checkpoint *c, const char *path, const struct vc_checkpoint_identity *identity,
                       uint64_t length, bool dst_new, uint8_t *digests, uint64_t *watermark, struct vc_error *error)
{
    struct ckpt_header h[2], *best;
    int rc;

    memset(c, 0, sizeof(*c));
    *watermark = 0;
    c->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (c->fd < 0)
        return vc_fail(error, errno, VC_SIDE_CHECKPOINT, VC_OP_CHECKPOINT, 0, "cannot open checkpoint %s: %s",
                       path, strerror(errno));
    c->identity = *identity;
    c->length = length;
    best = best_header(c->fd, h, &rc);
    if (rc < 0) {
        vc_fail(error, -rc, VC_SIDE_CHECKPOINT, VC_OP_CHECKPOINT, 0, "cannot read checkpoint %s: %s", path,
                strerror(-rc));
        close(c->fd);
        c->fd = -1;
        return rc;
    }
    /* new, empty, with nothing saved, cut short before its first save, or of an older version */
    if (!best || best->watermark == 0)
        return start_afresh(c, path, error);
    const char *why = mismatch(best, c, dst_new);
    if (why) {
        rc = vc_fail(error, ESTALE, VC_SIDE_CHECKPOINT, VC_OP_CHECKPOINT, 0,
                     "checkpoint %s belongs to another copy: %s; remove it to start afresh", path, why);
        close(c->fd);
        c->fd = -1;
        return rc;
    }
    c->seq = best->seq;
    uint64_t chunks = chunks_below(best->watermark, length);
    rc = digests ? load_records(c->fd, best->records, chunks, digests) : 0;
    if (rc < 0) {
        vc_fail(error, -rc, VC_SIDE_CHECKPOINT, VC_OP_CHECKPOINT, 0, "cannot read checkpoint %s: %s", path,
                rc == -EBADMSG ? "its records are out of order; remove it to start afresh" : strerror(-rc));
        close(c->fd);
        c->fd = -1;
        return rc;
    }
    c->saved_chunks = chunks;
    c->saved_records = best->records;
    *watermark = best->watermark;
    return 0;
}

uint64_t vc_checkpoint_resume_offset(const char *path)
{
    struct ckpt_header h[2], *best;
    int rc, fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    best = best_header(fd, h, &rc);
    close(fd);
    return best ? best->watermark : 0;
}

int vc_checkpoint_save(struct vc_checkpoint *c, uint64_t watermark, const uint8_t *digests)
{
    uint64_t chunks = chunks_below(watermark, c->length), records = c->saved_records;
    int rc;

    if (digests && chunks > c->saved_chunks) {
        rc = append_records(c->fd, digests, c->saved_chunks, chunks, &records);
        if (rc < 0)
            return rc;
        if (records > c->saved_records && fdatasync(c->fd) < 0)
            return -errno;
    }
    rc = write_header(c, c->seq + 1, watermark, records);
    if (rc < 0)
        return rc;
    c->saved_chunks = VC_MAX(c->saved_chunks, chunks);
    c->saved_records = records;
    return 0;
}

void vc_checkpoint_close(struct vc_checkpoint *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}
