/* Zero detection: the only saving on a block device, so it must run at memory speed. */
#include <string.h>

#include "internal.h"

/* Data blocks almost always differ from zero in their first bytes, so look there before paying for a
 * full scan. The full scan ORs words together: the loop has no early exit so the compiler vectorises
 * it, and target_clones picks AVX2 where the CPU has it. It is one flat loop over the words: written as
 * eight words a line, gcc gathered each line's words across vector lanes with shuffles, and scanned a
 * cached 1 MiB at a third of the speed (22 against 66 GB/s here). */
__attribute__((target_clones("avx2", "default"))) static bool all_zero_lines(const uint64_t *w, size_t lines)
{
    uint64_t acc = 0;
    for (size_t i = 0; i < lines * 8; i++)
        acc |= w[i];
    return acc == 0;
}

bool vc_zero_check(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    size_t head = VC_MIN(len, (size_t)16);
    uint64_t first[2] = {0, 0};

    memcpy(first, p, head);
    if (first[0] | first[1])
        return false;
    /* Whole 64-byte lines through the vector loop, the ragged end byte by byte. Buffers handed in by
     * the engine are page aligned; unaligned callers (tests, vc_is_zero) go through memcpy-free
     * byte checks for the remainder only. */
    size_t lines = ((uintptr_t)p % 8 == 0) ? len / 64 : 0;
    if (lines && !all_zero_lines((const uint64_t *)p, lines))
        return false;
    for (size_t i = lines * 64; i < len; i++)
        if (p[i])
            return false;
    return true;
}

int vc_is_zero(const void *buf, size_t len)
{
    return vc_zero_check(buf, len);
}
