/* Ways to copy a file in memory, outside the engine: what W4 could gain from each (benchmarks/results).
 * Each thread copies its own contiguous part in 1 MiB pieces, hashing with XXH3-128 where the mode says.
 *
 *   gcc -O2 -march=native -o /tmp/tmpfs_copy_modes benchmarks/tmpfs_copy_modes.c -lpthread
 *   /tmp/tmpfs_copy_modes SRC DST MODE THREADS      (DST is created afresh; both on tmpfs)
 *
 * MODE: pread-pwrite (pread into a buffer, hash it, pwrite it: what the engine does),
 *       mmap-pwrite (hash and pwrite straight from a mapping of src: one memcpy fewer),
 *       copy-file-range (the kernel copies; no hash), write-only (pwrite a hot buffer: the floor). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#define PIECE (1 << 20)

enum mode { PREAD_PWRITE, MMAP_PWRITE, COPY_FILE_RANGE, WRITE_ONLY };
static const char *names[] = {"pread-pwrite", "mmap-pwrite", "copy-file-range", "write-only"};

static int src_fd, dst_fd, n_threads;
static enum mode mode;
static size_t size;
static const char *map;
static volatile uint64_t sink; /* keeps the hashes from being optimised away */

static void *copy_part(void *arg)
{
    long id = (long)arg;
    size_t part = size / n_threads, start = id * part, end = id == n_threads - 1 ? size : start + part;
    char *buf = aligned_alloc(4096, PIECE);
    memset(buf, 1, PIECE);
    for (size_t off = start; off < end; off += PIECE) {
        size_t len = end - off < PIECE ? end - off : PIECE;
        loff_t in = off, out = off;
        switch (mode) {
        case PREAD_PWRITE:
            if (pread(src_fd, buf, len, off) != (ssize_t)len) abort();
            sink += XXH3_128bits(buf, len).low64;
            if (pwrite(dst_fd, buf, len, off) != (ssize_t)len) abort();
            break;
        case MMAP_PWRITE:
            sink += XXH3_128bits(map + off, len).low64;
            if (pwrite(dst_fd, map + off, len, off) != (ssize_t)len) abort();
            break;
        case COPY_FILE_RANGE:
            if (copy_file_range(src_fd, &in, dst_fd, &out, len, 0) != (ssize_t)len) abort();
            break;
        case WRITE_ONLY:
            if (pwrite(dst_fd, buf, len, off) != (ssize_t)len) abort();
            break;
        }
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    struct timespec t0, t1;
    pthread_t threads[64];

    if (argc != 5) {
        fprintf(stderr, "usage: %s SRC DST pread-pwrite|mmap-pwrite|copy-file-range|write-only THREADS\n", argv[0]);
        return 2;
    }
    for (mode = 0; mode < 4 && strcmp(argv[3], names[mode]); mode++)
        ;
    n_threads = atoi(argv[4]);
    if (mode == 4 || n_threads < 1 || n_threads > 64)
        return fprintf(stderr, "unknown mode or bad thread count\n"), 2;
    src_fd = open(argv[1], O_RDONLY);
    unlink(argv[2]);
    dst_fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (src_fd < 0 || dst_fd < 0)
        return perror("open"), 1;
    size = lseek(src_fd, 0, SEEK_END);

    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (mode == MMAP_PWRITE) {
        map = mmap(NULL, size, PROT_READ, MAP_SHARED, src_fd, 0);
        if (map == MAP_FAILED)
            return perror("mmap"), 1;
        madvise((void *)map, size, MADV_SEQUENTIAL);
    }
    if (ftruncate(dst_fd, size))
        return perror("ftruncate"), 1;
    for (long i = 0; i < n_threads; i++)
        pthread_create(&threads[i], NULL, copy_part, (void *)i);
    for (int i = 0; i < n_threads; i++)
        pthread_join(threads[i], NULL);
    fsync(dst_fd);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%s, %d threads: %.3f s\n", names[mode], n_threads,
           (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
