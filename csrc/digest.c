/* Digests: XXH3-128 per 1 MiB chunk in canonical (big-endian) form, and the volume digest over them. */
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "internal.h"

static void canonical(XXH128_hash_t h, uint8_t out[VC_DIGEST_SIZE])
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    memcpy(out, c.digest, VC_DIGEST_SIZE);
}

void vc_digest_chunk(const void *buf, size_t len, uint8_t out[VC_DIGEST_SIZE])
{
    canonical(XXH3_128bits(buf, len), out);
}

/* Streams a small static zero page so that the digest of a hole costs no allocation and no read. */
void vc_digest_zeros(uint64_t len, uint8_t out[VC_DIGEST_SIZE])
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

void vc_volume_digest(const uint8_t *chunk_digests, uint64_t n_chunks, uint8_t *out)
{
    canonical(XXH3_128bits(chunk_digests, (size_t)(n_chunks * VC_DIGEST_SIZE)), out);
}

void vc_hash128(const void *buf, size_t len, uint8_t *out)
{
    vc_digest_chunk(buf, len, out);
}
