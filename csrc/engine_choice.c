/* Which I/O engine runs a copy: the one asked for, or for auto the best whose set-up succeeds here. */
#include <errno.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/vfs.h>

#include "engine.h"

/* Files in memory (tmpfs, ramfs): every transfer is a memcpy by the CPU that asks for it, and io_uring
 * and aio run it inline on this one thread; the threads engine spreads it over the CPUs (see
 * io_threads.c for the numbers). */
bool vc_in_memory(int fd)
{
    struct stat st;
    struct statfs fs;
    if (fd < 0)
        return true;
    /* A regular file only: a device node in /dev sits on devtmpfs, whose magic is tmpfs's. */
    return fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && fstatfs(fd, &fs) == 0 &&
           (fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC);
}

/* Set up once: no probe that is then set up again. */
int choose_engine(struct engine *g, const struct vc_io_setup *setup)
{
    /* In memory only the threads engine overlaps anything; elsewhere it is the fallback with a queue. */
    static const int on_devices[] = {VC_ENGINE_URING, VC_ENGINE_AIO, VC_ENGINE_THREADS, VC_ENGINE_SYNC, -1};
    static const int in_memory_files[] = {VC_ENGINE_THREADS, VC_ENGINE_SYNC, -1};
    const struct vc_copy_params *p = g->p;
    bool rbd = p->src.kind == VC_KIND_RBD || (g->has_dst && p->dst.kind == VC_KIND_RBD);

    /* librbd does its own asynchronous I/O; the threads engine is the one that waits on it beside files. */
    if (rbd && p->engine != VC_ENGINE_AUTO && p->engine != VC_ENGINE_THREADS)
        return vc_fail(g->e, EINVAL, VC_SIDE_NONE, VC_OP_SETUP, 0,
                       "a copy with an RBD image runs on the threads engine (librbd's own asynchronous I/O); "
                       "use engine auto or threads");
    if (p->engine != VC_ENGINE_AUTO || rbd) {
        int engine = rbd ? VC_ENGINE_THREADS : p->engine;
        g->io.ops = vc_io_backend(engine);
        if (!g->io.ops)
            return vc_engine_available(engine, g->e);
        int rc = g->io.ops->init(&g->io, setup, g->e);
        if (rc < 0) {
            g->io.ops = NULL;
            return rc;
        }
        g->r->engine = engine;
        return 0;
    }
    const int *preference = vc_in_memory(p->src.fd) && vc_in_memory(p->dst.fd) ? in_memory_files : on_devices;
    for (unsigned i = 0; preference[i] >= 0; i++) {
        struct vc_error ignored = {0};
        g->io.ops = vc_io_backend(preference[i]);
        if (g->io.ops && g->io.ops->init(&g->io, setup, &ignored) == 0) {
            g->r->engine = preference[i];
            return 0;
        }
    }
    g->io.ops = NULL;
    return vc_fail(g->e, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "no I/O engine could be set up");
}
