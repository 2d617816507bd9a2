/* Digests: XXH3-128 per 1 MiB chunk in canonical (big-endian) form, and the volume digest over them.
 *
 * xxHash chooses its vector code by the compiler's target where it is included, so this file is built
 * twice: as itself (SSE2, which every x86-64 has) and from digest_avx2.c with AVX2 on. Each function
 * below is named through DIGEST() and exists in both builds; the public ones at the end take the AVX2
 * build where the CPU has it. The digests are the same, the speed is not: 1 MiB in cache hashed at
 * 23 GB/s with SSE2 and 32 GB/s with AVX2 here, 12 and 16 GB/s from memory. The engine hashes on its
 * own thread, between I/Os, so this is time on every copy with a digest. */
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "internal.h"

#ifndef DIGEST
#define DIGEST(name) name##_sse2
#define DIGEST_PUBLIC
#endif

static void canonical(XXH128_hash_t h, uint8_t out[VC_DIGEST_SIZE])
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    memcpy(out, c.digest, VC_DIGEST_SIZE);
}

void DIGEST(vc_digest_chunk)(const void *buf, size_t len, uint8_t out[VC_DIGEST_SIZE])
{
    canonical(XXH3_128bits(buf, len), out);
}

/* The digest of a chunk of len bytes where the holes (sorted, disjoint (offset, length) pairs within it)
 * read as zeros, whatever the buffer holds there: streamed, so that the holes of a chunk need no memset
 * first. data holds the chunk from its byte `from` on (a buffer sized to a unit's data starts there);
 * everything before from lies in holes. */
void DIGEST(vc_digest_chunk_with_holes)(const uint8_t *data, size_t from, size_t len, const uint64_t (*holes)[2],
                                        unsigned n_holes, uint8_t out[VC_DIGEST_SIZE])
{
    static const uint8_t zeros[64 << 10]; /* never written: its pages read as the zero page */
    XXH3_state_t state;
    uint64_t at = 0;

    XXH3_128bits_reset(&state);
    for (unsigned k = 0; k <= n_holes; k++) {
        uint64_t hole = k < n_holes ? holes[k][0] : len, hole_end = k < n_holes ? hole + holes[k][1] : len;
        if (hole > at)
            XXH3_128bits_update(&state, data + (at - from), (size_t)(hole - at));
        for (uint64_t done = hole; done < hole_end;) {
            size_t n = (size_t)VC_MIN(hole_end - done, (uint64_t)sizeof(zeros));
            XXH3_128bits_update(&state, zeros, n);
            done += n;
        }
        at = hole_end;
    }
    canonical(XXH3_128bits_digest(&state), out);
}

/* Streams a small static zero page so that the digest of a hole costs no allocation and no read. */
void DIGEST(vc_digest_zeros)(uint64_t len, uint8_t out[VC_DIGEST_SIZE])
{
    static const unsigned char zeros[VC_ALIGN];
    XXH3_state_t state;

    XXH3_128bits_reset(&state);
    for (uint64_t done = 0; done < len;) {
        size_t n = (size_t)VC_MIN(len - done, (uint64_t)sizeof(zeros));
        XXH3_128bits_update(&state, zeros, n);
        done += n;
    }
    canonical(XXH3_128bits_digest(&state), out);
}

/* Streamed in batches, each chunk recorded as zeros (engine.h: record_digest) replaced by the digest of
 * its zeros: the reads of a huge sparse volume's untouched pages map the zero page, no memory. */
void DIGEST(vc_volume_digest_recorded)(const uint8_t *chunk_digests, uint64_t length, uint8_t *out)
{
    static const uint8_t zeros[VC_DIGEST_SIZE];
    enum { BATCH = 4096 };
    uint8_t batch[BATCH * VC_DIGEST_SIZE], of_zeros[VC_DIGEST_SIZE];
    uint64_t n_chunks = VC_ROUND_UP(length, VC_CHUNK_SIZE) / VC_CHUNK_SIZE;
    XXH3_state_t state;

    DIGEST(vc_digest_zeros)(VC_CHUNK_SIZE, of_zeros);
    XXH3_128bits_reset(&state);
    for (uint64_t first = 0; first < n_chunks; first += BATCH) {
        uint64_t n = VC_MIN((uint64_t)BATCH, n_chunks - first);
        memcpy(batch, chunk_digests + first * VC_DIGEST_SIZE, (size_t)(n * VC_DIGEST_SIZE));
        for (uint64_t i = 0; i < n; i++) {
            uint8_t *d = batch + i * VC_DIGEST_SIZE;
            if (memcmp(d, zeros, VC_DIGEST_SIZE) != 0)
                continue;
            if (first + i == n_chunks - 1 && length % VC_CHUNK_SIZE)
                DIGEST(vc_digest_zeros)(length % VC_CHUNK_SIZE, d);
            else
                memcpy(d, of_zeros, VC_DIGEST_SIZE);
        }
        XXH3_128bits_update(&state, batch, (size_t)(n * VC_DIGEST_SIZE));
    }
    canonical(XXH3_128bits_digest(&state), out);
}

#ifdef DIGEST_PUBLIC
void vc_digest_chunk_avx2(const void *buf, size_t len, uint8_t out[VC_DIGEST_SIZE]);
void vc_digest_chunk_with_holes_avx2(const uint8_t *data, size_t from, size_t len, const uint64_t (*holes)[2],
                                     unsigned n_holes, uint8_t out[VC_DIGEST_SIZE]);
void vc_digest_zeros_avx2(uint64_t len, uint8_t out[VC_DIGEST_SIZE]);
void vc_volume_digest_recorded_avx2(const uint8_t *chunk_digests, uint64_t length, uint8_t *out);

static bool has_avx2(void)
{
    return __builtin_cpu_supports("avx2");
}

void vc_digest_chunk(const void *buf, size_t len, uint8_t out[VC_DIGEST_SIZE])
{
    (has_avx2() ? vc_digest_chunk_avx2 : vc_digest_chunk_sse2)(buf, len, out);
}

void vc_digest_chunk_with_holes(const uint8_t *data, size_t from, size_t len, const uint64_t (*holes)[2],
                                unsigned n_holes, uint8_t out[VC_DIGEST_SIZE])
{
    (has_avx2() ? vc_digest_chunk_with_holes_avx2 : vc_digest_chunk_with_holes_sse2)(data, from, len, holes, n_holes,
                                                                                     out);
}

void vc_digest_zeros(uint64_t len, uint8_t out[VC_DIGEST_SIZE])
{
    (has_avx2() ? vc_digest_zeros_avx2 : vc_digest_zeros_sse2)(len, out);
}

void vc_volume_digest_recorded(const uint8_t *chunk_digests, uint64_t length, uint8_t *out)
{
    (has_avx2() ? vc_volume_digest_recorded_avx2 : vc_volume_digest_recorded_sse2)(chunk_digests, length, out);
}

void vc_hash128(const void *buf, size_t len, uint8_t *out)
{
    vc_digest_chunk(buf, len, out);
}
#endif
