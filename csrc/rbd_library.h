/* librados and librbd, loaded on the first use of an RBD image rather than linked: a process that never
 * names an image does not pay for them (about 19 MiB of resident memory and their start-up at every
 * import, measured), and a machine without librbd1 still runs every other copy. The headers come from
 * librbd-dev at build time; the libraries are found by their sonames at run time. */
#ifndef VC_RBD_LIBRARY_H
#define VC_RBD_LIBRARY_H

#include <rados/librados.h>
#include <rbd/librbd.h>

#include "volcopy.h"

#define VC_LIBRADOS_FUNCTIONS(X) \
    X(rados_cluster_fsid) \
    X(rados_conf_get) \
    X(rados_conf_parse_env) \
    X(rados_conf_read_file) \
    X(rados_conf_set) \
    X(rados_connect) \
    X(rados_create2) \
    X(rados_ioctx_create) \
    X(rados_ioctx_destroy) \
    X(rados_ioctx_get_id) \
    X(rados_ioctx_set_namespace) \
    X(rados_pool_reverse_lookup) \
    X(rados_shutdown)

#define VC_LIBRBD_FUNCTIONS(X) \
    X(rbd_aio_create_completion) \
    X(rbd_aio_get_return_value) \
    X(rbd_aio_read) \
    X(rbd_aio_release) \
    X(rbd_aio_write) \
    X(rbd_close) \
    X(rbd_create4) \
    X(rbd_deep_copy) \
    X(rbd_deep_copy_with_progress) \
    X(rbd_diff_iterate2) \
    X(rbd_flush) \
    X(rbd_get_data_pool_id) \
    X(rbd_get_features) \
    X(rbd_get_id) \
    X(rbd_get_modify_timestamp) \
    X(rbd_get_size) \
    X(rbd_get_stripe_count) \
    X(rbd_get_stripe_unit) \
    X(rbd_image_options_create) \
    X(rbd_image_options_destroy) \
    X(rbd_image_options_set_string) \
    X(rbd_image_options_set_uint64) \
    X(rbd_lock_acquire) \
    X(rbd_open) \
    X(rbd_open_by_id_read_only) \
    X(rbd_open_read_only) \
    X(rbd_read) \
    X(rbd_remove) \
    X(rbd_snap_get_id) \
    X(rbd_snap_list) \
    X(rbd_stat) \
    X(rbd_watchers_list) \
    X(rbd_watchers_list_cleanup) \
    X(rbd_write_zeroes)

struct vc_librbd {
#define VC_FUNCTION_POINTER(name) __typeof__(name) *name;
    VC_LIBRADOS_FUNCTIONS(VC_FUNCTION_POINTER)
    VC_LIBRBD_FUNCTIONS(VC_FUNCTION_POINTER)
#undef VC_FUNCTION_POINTER
};

/* Filled by vc_librbd_load. */
extern struct vc_librbd vc_librbd;

/* 0 once both libraries are loaded (the first call loads them, later ones return what it found);
 * -EOPNOTSUPP with the reason otherwise. */
int vc_librbd_load(struct vc_error *error);

#endif
