/* Throttle: a token bucket on bytes read. The bucket holds at most `burst` bytes of credit, so over any
 * window of T seconds at most rate*T + burst bytes go out, whatever happened before it. */
#include <time.h>

#include "internal.h"

uint64_t vc_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void vc_throttle_init(struct vc_throttle *t, uint64_t rate, uint64_t burst)
{
    t->rate = rate;
    t->burst = burst;
    t->tokens = (double)burst;
    t->last_ns = vc_now_ns();
}

void vc_throttle_set(struct vc_throttle *t, uint64_t rate, uint64_t burst)
{
    vc_throttle_take(t, 0); /* the credit earned at the old rate, up to now */
    t->rate = rate;
    t->burst = burst;
    if (t->tokens > (double)burst)
        t->tokens = (double)burst;
}

int vc_throttle_take(struct vc_throttle *t, uint64_t n)
{
    if (!t->rate)
        return 0;
    uint64_t now = vc_now_ns();
    t->tokens += (double)(now - t->last_ns) * (double)t->rate / 1e9;
    if (t->tokens > (double)t->burst)
        t->tokens = (double)t->burst;
    t->last_ns = now;
    if (t->tokens >= (double)n) {
        t->tokens -= (double)n;
        return 0;
    }
    double wait_ms = ((double)n - t->tokens) * 1000.0 / (double)t->rate;
    return wait_ms < 1.0 ? 1 : (int)(wait_ms + 0.5);
}
