/* Which I/O engines were compiled in, and whether they can run on this kernel. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

const struct vc_io_ops *vc_io_backend(int engine)
{
    switch (engine) {
#ifdef VC_HAVE_URING
    case VC_ENGINE_URING:
        return &vc_io_uring_ops;
#endif
#ifdef VC_HAVE_AIO
    case VC_ENGINE_AIO:
        return &vc_io_aio_ops;
#endif
    case VC_ENGINE_SYNC:
        return &vc_io_sync_ops;
    case VC_ENGINE_THREADS:
        return &vc_io_threads_ops;
    default:
        return NULL;
    }
}

int vc_engine_compiled(int engine)
{
    return vc_io_backend(engine) != NULL;
}

int vc_engine_available(int engine, struct vc_error *error)
{
    const struct vc_io_ops *ops = vc_io_backend(engine);
    struct vc_io io = {0};
    struct vc_io_setup setup = {.max_inflight = 4, .fds = {-1, -1}};
    int rc;

    if (!ops) {
        const char *why = engine == VC_ENGINE_URING ? "io_uring: volcopy was built without liburing (install liburing-dev and rebuild)"
                          : engine == VC_ENGINE_AIO ? "aio: volcopy was built without libaio (install libaio-dev and rebuild)"
                                                    : "unknown engine";
        return vc_fail(error, EOPNOTSUPP, VC_SIDE_NONE, VC_OP_SETUP, 0, "%s", why);
    }
    /* The only real test is to set one up: io_uring can be compiled in yet disabled by sysctl or a
     * seccomp filter in a container. */
    io.ops = ops;
    rc = ops->init(&io, &setup, error);
    if (rc < 0)
        return rc;
    ops->fini(&io);
    return 0;
}

const char *vc_version(void)
{
    return VC_VERSION;
}
