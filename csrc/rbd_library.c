/* Loading librados and librbd on first use (see rbd_library.h for why). */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "rbd_library.h"

/* Their sonames: Ceph has kept both since librbd's first release. */
#define LIBRADOS "librados.so.2"
#define LIBRBD "librbd.so.1"

struct vc_librbd vc_librbd;

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static char load_failure[VC_MESSAGE_SIZE]; /* empty once loaded */

static void *open_library(const char *soname)
{
    void *handle = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
    if (!handle)
        snprintf(load_failure, sizeof(load_failure), "RBD: %s cannot be loaded (Debian: librbd1): %s", soname,
                 dlerror());
    return handle;
}

static void load(void)
{
    void *rados = open_library(LIBRADOS);
    void *rbd = rados ? open_library(LIBRBD) : NULL;
    if (!rbd)
        return;
    /* Kept loaded for the life of the process: images may be open in any thread. */
#define RESOLVE(handle, soname, name)                                                                        \
    if (!(vc_librbd.name = (__typeof__(vc_librbd.name))dlsym(handle, #name))) {                             \
        snprintf(load_failure, sizeof(load_failure), "RBD: %s has no %s (too old a Ceph?)", soname, #name); \
        return;                                                                                              \
    }
#define RESOLVE_RADOS(name) RESOLVE(rados, LIBRADOS, name)
#define RESOLVE_RBD(name) RESOLVE(rbd, LIBRBD, name)
    VC_LIBRADOS_FUNCTIONS(RESOLVE_RADOS)
    VC_LIBRBD_FUNCTIONS(RESOLVE_RBD)
#undef RESOLVE_RBD
#undef RESOLVE_RADOS
#undef RESOLVE
}

int vc_librbd_load(struct vc_error *error)
{
    pthread_once(&load_once, load);
    if (load_failure[0])
        return vc_fail(error, EOPNOTSUPP, VC_SIDE_NONE, VC_OP_SETUP, 0, "%s", load_failure);
    return 0;
}
