/* Which of src's pages the page cache holds, so that a copy reads those through it and the rest with
 * O_DIRECT (VC_FLAG_SRC_FROM_CACHE).
 *
 * A source that was just written or downloaded (Cinder's image-to-volume copy, an image cache) is often
 * all in memory; O_DIRECT would read it from the disk again. mincore() on a mapping of src answers per
 * page without touching the pages. RWF_NOWAIT would answer too, but on a miss it starts readahead into
 * the cache: a cold source would be read twice and fill the cache. The buffered descriptor gets
 * POSIX_FADV_RANDOM, so that reading a cached page never starts readahead past it either: what the copy
 * leaves in the cache is what it found there.
 *
 * Only for a regular file on a local file system, where the page cache is the file's one truth. A block
 * device's cache goes stale when its storage is written by another name (a partition and its disk, a
 * loop device and its file, a dm device and its paths, another host on shared storage), and so does a
 * network file system's when another client writes; a stale page would be copied, and verify would
 * not see it, since it compares dst with what the copy read. They are read with O_DIRECT as before.
 * mincore() answers for a file only to its owner, a writer or a privileged caller (Linux 5.0): anyone
 * else is told every page is cached, so such a caller reads it all with O_DIRECT. */
#include <fcntl.h>
#include <linux/magic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "engine.h"

#ifndef F2FS_SUPER_MAGIC
#define F2FS_SUPER_MAGIC 0xF2F52010
#endif
#define ZFS_SUPER_MAGIC 0x2FC12FC1

static bool on_local_file_system(int fd)
{
    struct statfs fs;
    if (fstatfs(fd, &fs) < 0)
        return false;
    switch ((unsigned long)fs.f_type) {
    case EXT4_SUPER_MAGIC: /* also ext2 and ext3 */
    case XFS_SUPER_MAGIC:
    case BTRFS_SUPER_MAGIC:
    case TMPFS_MAGIC:
    case F2FS_SUPER_MAGIC:
    case ZFS_SUPER_MAGIC:
        return true;
    default:
        return false;
    }
}

/* Whether mincore() tells us the truth about this file (see above); root stands for the capability. */
static bool mincore_answers(int fd)
{
    struct stat st;
    char path[64];
    if (fstat(fd, &st) < 0)
        return false;
    if (geteuid() == 0 || st.st_uid == geteuid())
        return true;
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    return faccessat(AT_FDCWD, path, W_OK, AT_EACCESS) == 0;
}

void residency_open(struct engine *g)
{
    const struct vc_endpoint *src = &g->p->src;
    struct residency *c = &g->residency;

    if (!(g->p->flags & VC_FLAG_SRC_FROM_CACHE) || !src->direct || src->kind != VC_KIND_FILE || !g->end ||
        !on_local_file_system(src->fd_buffered) || !mincore_answers(src->fd_buffered))
        return;
    c->page = (uint64_t)sysconf(_SC_PAGESIZE);
    c->map_len = (size_t)VC_ROUND_UP(g->end, c->page);
    c->vec = malloc(g->io_max / c->page + 2);
    void *map = mmap(NULL, c->map_len, PROT_READ, MAP_SHARED, src->fd_buffered, 0);
    /* Only a faster way to read: where src cannot be mapped, everything is read with O_DIRECT. */
    if (map == MAP_FAILED || !c->vec) {
        if (map != MAP_FAILED)
            munmap(map, c->map_len);
        free(c->vec);
        c->vec = NULL;
        return;
    }
    c->map = map;
    posix_fadvise(src->fd_buffered, 0, 0, POSIX_FADV_RANDOM);
}

void residency_close(struct engine *g)
{
    struct residency *c = &g->residency;
    if (c->map)
        munmap(c->map, c->map_len);
    free(c->vec);
    c->map = NULL;
    c->vec = NULL;
}

/* The length of the run from off (at most len) whose pages are all cached, or all not; *cached says
 * which. Runs end on page boundaries, so each piece stays aligned for O_DIRECT. */
uint64_t resident_run(struct engine *g, uint64_t off, uint64_t len, bool *cached)
{
    struct residency *c = &g->residency;
    uint64_t first = off / c->page, last = (off + len - 1) / c->page;
    if (mincore(c->map + first * c->page, (size_t)(last - first + 1) * c->page, c->vec) < 0) {
        *cached = false;
        return len;
    }
    *cached = c->vec[0] & 1;
    uint64_t k = 1;
    while (k <= last - first && (c->vec[k] & 1) == *cached)
        k++;
    return VC_MIN(len, (first + k) * c->page - off);
}
