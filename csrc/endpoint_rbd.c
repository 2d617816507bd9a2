/* Ceph RBD images through librbd: no host path, no kernel client. Built when librbd is found.
 *
 * - Extents come from rbd_diff_iterate2 over whole objects, read once per opened image: only allocated
 *   objects are read, and inside them the engine's zero detection still applies.
 * - Reads and writes are rbd_aio_* requests whose completions librbd delivers on its own thread into the
 *   threads engine's completion ring (io_threads.c): no thread per request.
 * - Zeroing is rbd_write_zeroes, which deallocates whole objects and zeroes the partial ends, so a
 *   sparse src stays thin on dst. A plain discard is not used: with rbd_skip_partial_discard (the
 *   default) a partial discard is silently dropped and would leave old data behind.
 * - The flush is rbd_flush. librbd's own cache is turned off unless the caller's settings ask for it:
 *   the engine keeps its own queue, and a write it counts as done must be on the OSDs at the flush. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "rbd_library.h"

/* Without a bound, an I/O to a stopped OSD waits for it forever; the caller's settings may change it. */
#define DEFAULT_OSD_OP_TIMEOUT "120"
#define DEFAULT_MOUNT_TIMEOUT "30"

struct vc_rbd;
static int load_extents(struct vc_rbd *r);

struct vc_rbd {
    rados_t cluster;
    rados_ioctx_t ioctx;
    rbd_image_t image;
    char *name;       /* the image's name, for rbd_remove */
    char *snap;       /* the snapshot read, or NULL */
    bool has_extents; /* extents below are the image's allocated objects, merged */
    int64_t *extents; /* (offset, length) pairs, sorted */
    uint64_t n_extents, cap_extents;
};

int vc_rbd_compiled(void)
{
    return 1;
}

static bool option_given(const struct vc_rbd_spec *spec, const char *key)
{
    for (uint32_t i = 0; i < spec->n_options; i++)
        if (strcmp(spec->options[2 * i], key) == 0)
            return true;
    return false;
}

static int connect_cluster(struct vc_rbd *r, const struct vc_rbd_spec *spec, struct vc_error *e)
{
    char entity[256];
    int rc;

    snprintf(entity, sizeof(entity), "client.%s", spec->user ? spec->user : "admin");
    rc = vc_librbd.rados_create2(&r->cluster, "ceph", entity, 0);
    if (rc < 0)
        return vc_fail(e, -rc, VC_SIDE_NONE, VC_OP_SETUP, 0, "cannot set up a Ceph client as %s", entity);
    /* A conf that was named must be readable; the default search may find none (mon_host given). */
    rc = vc_librbd.rados_conf_read_file(r->cluster, spec->conf);
    if (rc < 0 && spec->conf)
        return vc_fail(e, -rc, VC_SIDE_NONE, VC_OP_SETUP, 0, "cannot read the Ceph configuration %s: %s",
                       spec->conf, strerror(-rc));
    /* CEPH_ARGS, as every Ceph client takes it: settings for a host without a conf to edit. */
    rc = vc_librbd.rados_conf_parse_env(r->cluster, NULL);
    if (rc < 0)
        return vc_fail(e, -rc, VC_SIDE_NONE, VC_OP_SETUP, 0, "CEPH_ARGS is refused: %s", strerror(-rc));
    if (!option_given(spec, "rbd_cache"))
        vc_librbd.rados_conf_set(r->cluster, "rbd_cache", "false");
    /* librbd copies every buffer written (rbd_disable_zero_copy_writes, true by default), and that is
     * kept: without the copy a write completes only once the messenger lets go of its buffer, and a
     * write timed out on an OSD that hangs (not marked down) stays queued on its connection until the
     * connection closes (900 s by default), holding the copy and a Ctrl-C well past
     * rados_osd_op_timeout (tests/test_rbd.py, an OSD stopped with SIGSTOP). Zero-copy saved 0.24 s of
     * 2.83 s on 1 GiB dense, image to image. */
    /* librados waits 300 s for monitors that do not answer: a wrong address should not take that long. */
    if (!option_given(spec, "client_mount_timeout")) {
        char current[32] = "";
        if (vc_librbd.rados_conf_get(r->cluster, "client_mount_timeout", current, sizeof(current)) == 0 &&
            strtod(current, NULL) == 300)
            vc_librbd.rados_conf_set(r->cluster, "client_mount_timeout", DEFAULT_MOUNT_TIMEOUT);
    }
    if (!option_given(spec, "rados_osd_op_timeout")) {
        char current[32] = "";
        if (vc_librbd.rados_conf_get(r->cluster, "rados_osd_op_timeout", current, sizeof(current)) == 0 &&
            strtod(current, NULL) == 0)
            vc_librbd.rados_conf_set(r->cluster, "rados_osd_op_timeout", DEFAULT_OSD_OP_TIMEOUT);
    }
    for (uint32_t i = 0; i < spec->n_options; i++) {
        rc = vc_librbd.rados_conf_set(r->cluster, spec->options[2 * i], spec->options[2 * i + 1]);
        if (rc < 0)
            /* its name only: the value may be a secret */
            return vc_fail(e, -rc, VC_SIDE_NONE, VC_OP_SETUP, 0, "Ceph setting %s is refused: %s",
                           spec->options[2 * i], strerror(-rc));
    }
    rc = vc_librbd.rados_connect(r->cluster);
    if (rc < 0)
        return vc_fail(e, -rc, VC_SIDE_NONE, VC_OP_SETUP, 0, "cannot connect to the Ceph cluster as %s: %s", entity,
                       strerror(-rc));
    rc = vc_librbd.rados_ioctx_create(r->cluster, spec->pool, &r->ioctx);
    if (rc < 0) {
        r->ioctx = NULL;
        return vc_fail(e, -rc, VC_SIDE_NONE, VC_OP_SETUP, 0, "%s", rc == -ENOENT ? "the pool does not exist"
                                                                                 : "cannot open the pool");
    }
    if (spec->pool_namespace)
        vc_librbd.rados_ioctx_set_namespace(r->ioctx, spec->pool_namespace);
    return 0;
}

/* librbd's exclusive lock is cooperative: a guest's QEMU would hand it over at our first write and
 * take it back at its next, both writing. So an image someone else has open (a watch besides ours) is
 * refused, as O_EXCL refuses a block device that is mounted or held.
 *
 * A client that died (a copy SIGKILLed, to be resumed) leaves its watch behind until the OSD's
 * osd_client_watch_timeout lapses: wait that long (plus a margin) for other watches to go before
 * refusing. A live client keeps its watch, and is refused at the end. */
static int other_clients(struct vc_rbd *r, size_t *n_other)
{
    rbd_image_watcher_t watchers[8];
    size_t n = 8;
    int rc = vc_librbd.rbd_watchers_list(r->image, watchers, &n);
    if (rc == -ERANGE) { /* more than 8 */
        *n_other = n - 1;
        return 0;
    }
    if (rc < 0)
        return rc;
    vc_librbd.rbd_watchers_list_cleanup(watchers, n);
    *n_other = n ? n - 1 : 0; /* ours is one of them */
    return 0;
}

static int check_not_in_use(struct vc_rbd *r, uint32_t own_clients, struct vc_error *e)
{
    char timeout[32] = "";
    size_t n_other = 0;
    int rc;

    if (vc_librbd.rados_conf_get(r->cluster, "osd_client_watch_timeout", timeout, sizeof(timeout)) < 0)
        snprintf(timeout, sizeof(timeout), "30");
    uint64_t deadline = vc_now_ns() + (uint64_t)((strtod(timeout, NULL) + 2) * 1e9);
    for (;;) {
        rc = other_clients(r, &n_other);
        if (rc < 0)
            return vc_fail(e, -rc, VC_SIDE_NONE, VC_OP_SETUP, 0, "cannot list the image's clients: %s",
                           strerror(-rc));
        if (n_other <= own_clients)
            return 0;
        if (vc_now_ns() >= deadline)
            break;
        usleep(500 * 1000);
    }
    return vc_fail(e, EBUSY, VC_SIDE_NONE, VC_OP_SETUP, 0,
                   "the image is open elsewhere (%zu other clients, still there after %s s): it is not written "
                   "under them", n_other, timeout);
}

static int open_image(struct vc_rbd *r, const struct vc_rbd_spec *spec, int flags, uint64_t create_size,
                      int *created, struct vc_error *e)
{
    int rc;

    if (!(flags & VC_RBD_WRITE)) /* read-only: takes no exclusive lock from a guest that has the image open */
        rc = vc_librbd.rbd_open_read_only(r->ioctx, spec->image, &r->image, spec->snap);
    else if (spec->snap)
        return vc_fail(e, EROFS, VC_SIDE_NONE, VC_OP_SETUP, 0, "a snapshot cannot be written");
    else
        rc = vc_librbd.rbd_open(r->ioctx, spec->image, &r->image, NULL);
    if (rc == -ENOENT && (flags & VC_RBD_CREATE)) {
        rbd_image_options_t options;
        vc_librbd.rbd_image_options_create(&options); /* the cluster's defaults: format 2, its features */
        rc = vc_librbd.rbd_create4(r->ioctx, spec->image, create_size, options);
        vc_librbd.rbd_image_options_destroy(options);
        if (rc < 0)
            return vc_fail(e, -rc, VC_SIDE_NONE, VC_OP_SETUP, 0, "cannot create the image: %s", strerror(-rc));
        *created = 1;
        rc = vc_librbd.rbd_open(r->ioctx, spec->image, &r->image, NULL);
    }
    if (rc < 0) {
        r->image = NULL;
        const char *what = rc != -ENOENT ? strerror(-rc)
                           : spec->snap  ? "the image or its snapshot does not exist"
                                         : "the image does not exist";
        return vc_fail(e, -rc, VC_SIDE_NONE, VC_OP_SETUP, 0, "%s", what);
    }
    if (!(flags & VC_RBD_WRITE))
        return 0;
    if (!*created && (rc = check_not_in_use(r, spec->own_clients, e)) < 0)
        return rc;
    /* The check above only sees who has the image open now: a client that opens it later (a guest
     * started on it) would be handed the exclusive lock at its first write, and both would write.
     * Taken explicitly, the lock is not handed over: such a client's writes fail (EROFS). Images
     * without the exclusive-lock feature answer EINVAL: the check above is all there is. */
    rc = vc_librbd.rbd_lock_acquire(r->image, RBD_LOCK_MODE_EXCLUSIVE);
    if (rc < 0 && rc != -EINVAL) /* EINVAL: no exclusive-lock feature */
        return vc_fail(e, -rc, VC_SIDE_NONE, VC_OP_SETUP, 0, "cannot take the image's exclusive lock: %s",
                       strerror(-rc));
    return 0;
}

int vc_rbd_open(const struct vc_rbd_spec *spec, int flags, uint64_t create_size, struct vc_rbd **out, int *created,
                struct vc_error *error)
{
    struct vc_rbd *r;
    int rc;

    memset(error, 0, sizeof(*error));
    *out = NULL;
    *created = 0;
    rc = vc_librbd_load(error);
    if (rc < 0)
        return rc;
    r = calloc(1, sizeof(*r));
    if (!r || !(r->name = strdup(spec->image)) || (spec->snap && !(r->snap = strdup(spec->snap)))) {
        if (r)
            free(r->name);
        free(r);
        return vc_fail(error, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "out of memory");
    }
    rc = connect_cluster(r, spec, error);
    if (rc == 0)
        rc = open_image(r, spec, flags, create_size, created, error);
    if (rc < 0) {
        vc_rbd_close(r);
        return rc;
    }
    *out = r;
    return 0;
}

int vc_rbd_info(struct vc_rbd *r, struct vc_rbd_info *info)
{
    rbd_image_info_t stat;
    struct timespec modified = {0, 0};
    int rc;

    memset(info, 0, sizeof(*info));
    rc = vc_librbd.rbd_stat(r->image, &stat, sizeof(stat));
    if (rc < 0)
        return rc;
    info->size = stat.size;
    info->object_size = stat.obj_size;
    info->pool_id = vc_librbd.rados_ioctx_get_id(r->ioctx);
    rc = vc_librbd.rbd_get_id(r->image, info->image_id, sizeof(info->image_id));
    if (rc < 0)
        return rc;
    rc = vc_librbd.rados_cluster_fsid(r->cluster, info->fsid, sizeof(info->fsid));
    if (rc < 0)
        return rc;
    info->snap_id = UINT64_MAX;
    if (r->snap) {
        rc = vc_librbd.rbd_snap_get_id(r->image, r->snap, &info->snap_id);
        if (rc < 0)
            return rc;
    }
    if (vc_librbd.rbd_get_modify_timestamp(r->image, &modified) == 0) {
        info->modified_sec = modified.tv_sec;
        info->modified_nsec = modified.tv_nsec;
    }
    return 0;
}

int64_t vc_rbd_read(struct vc_rbd *r, void *buf, uint64_t len, uint64_t offset)
{
    return vc_librbd.rbd_read(r->image, offset, len, buf);
}

void vc_rbd_close(struct vc_rbd *r)
{
    if (!r)
        return;
    if (r->image)
        vc_librbd.rbd_close(r->image);
    if (r->ioctx)
        vc_librbd.rados_ioctx_destroy(r->ioctx);
    if (r->cluster)
        vc_librbd.rados_shutdown(r->cluster);
    free(r->extents);
    free(r->name);
    free(r->snap);
    free(r);
}

int vc_rbd_remove(struct vc_rbd *r)
{
    int rc = 0;
    if (r->image) {
        vc_librbd.rbd_close(r->image);
        r->image = NULL;
        rc = vc_librbd.rbd_remove(r->ioctx, r->name);
    }
    vc_rbd_close(r);
    return rc;
}

/* ---- a copy inside one cluster by librbd (rbd_deep_copy) ---- */

/* Whether the image has a snapshot: room for the list's terminator only, so 0 when there is none and
 * -ERANGE when there is one. */
static int has_snapshots(struct vc_rbd *r)
{
    int max_snaps = 1, rc;
    rbd_snap_info_t snap;

    rc = vc_librbd.rbd_snap_list(r->image, &snap, &max_snaps);
    return rc == -ERANGE ? 1 : rc;
}

static int replaceable(struct vc_rbd *src, struct vc_rbd *dst, struct vc_error *e)
{
    uint64_t src_size, dst_size;
    int rc;

    if ((rc = vc_librbd.rbd_get_size(src->image, &src_size)) < 0 || (rc = vc_librbd.rbd_get_size(dst->image, &dst_size)) < 0 ||
        (rc = load_extents(dst)) < 0)
        return vc_fail(e, -rc, VC_SIDE_DST, VC_OP_SETUP, 0, "cannot inspect the images: %s", strerror(-rc));
    if (src_size != dst_size)
        return vc_fail(e, EEXIST, VC_SIDE_DST, VC_OP_SETUP, 0, "dst holds %llu bytes, src %llu: not replaced",
                       (unsigned long long)dst_size, (unsigned long long)src_size);
    if (dst->n_extents)
        return vc_fail(e, EEXIST, VC_SIDE_DST, VC_OP_SETUP, (uint64_t)dst->extents[0],
                       "dst holds data: not replaced");
    rc = has_snapshots(dst);
    if (rc > 0)
        return vc_fail(e, EEXIST, VC_SIDE_DST, VC_OP_SETUP, 0, "dst has snapshots: not replaced");
    if (rc < 0)
        return vc_fail(e, -rc, VC_SIDE_DST, VC_OP_SETUP, 0, "cannot list dst's snapshots: %s", strerror(-rc));
    /* A deep copy carries every snapshot of src (up to the one read) onto dst: a volume with snapshots
     * its owner never took. */
    rc = has_snapshots(src);
    if (rc > 0)
        return vc_fail(e, EEXIST, VC_SIDE_SRC, VC_OP_SETUP, 0,
                       "src has snapshots, which a deep copy would carry onto dst: not replaced");
    if (rc < 0)
        return vc_fail(e, -rc, VC_SIDE_SRC, VC_OP_SETUP, 0, "cannot list src's snapshots: %s", strerror(-rc));
    return 0;
}

/* Features a caller may choose at creation; the others librbd sets itself. */
#define CHOSEN_FEATURES                                                                                     \
    (RBD_FEATURE_LAYERING | RBD_FEATURE_STRIPINGV2 | RBD_FEATURE_EXCLUSIVE_LOCK | RBD_FEATURE_OBJECT_MAP | \
     RBD_FEATURE_FAST_DIFF | RBD_FEATURE_DEEP_FLATTEN | RBD_FEATURE_JOURNALING)

/* The options that make the new dst laid out as the dst it replaces (its features, object size,
 * striping and data pool: what its owner created it with, say features a kernel client can map),
 * and flattened: a clone's data is copied, so dst does not depend on src's parent, as after a copy by
 * the engine. Without them librbd would take src's layout and keep src's parent. */
static int dst_layout(struct vc_rbd *dst, rbd_image_options_t options, struct vc_error *e)
{
    uint64_t features, stripe_unit, stripe_count;
    rbd_image_info_t stat;
    int64_t data_pool;
    int rc;

    if ((rc = vc_librbd.rbd_get_features(dst->image, &features)) < 0 || (rc = vc_librbd.rbd_stat(dst->image, &stat, sizeof(stat))) < 0 ||
        (rc = vc_librbd.rbd_get_stripe_unit(dst->image, &stripe_unit)) < 0 ||
        (rc = vc_librbd.rbd_get_stripe_count(dst->image, &stripe_count)) < 0)
        return vc_fail(e, -rc, VC_SIDE_DST, VC_OP_SETUP, 0, "cannot read dst's layout: %s", strerror(-rc));
    vc_librbd.rbd_image_options_set_uint64(options, RBD_IMAGE_OPTION_FEATURES, features & CHOSEN_FEATURES);
    vc_librbd.rbd_image_options_set_uint64(options, RBD_IMAGE_OPTION_ORDER, (uint64_t)stat.order);
    vc_librbd.rbd_image_options_set_uint64(options, RBD_IMAGE_OPTION_STRIPE_UNIT, stripe_unit);
    vc_librbd.rbd_image_options_set_uint64(options, RBD_IMAGE_OPTION_STRIPE_COUNT, stripe_count);
    vc_librbd.rbd_image_options_set_uint64(options, RBD_IMAGE_OPTION_FLATTEN, 1);
    data_pool = vc_librbd.rbd_get_data_pool_id(dst->image);
    if (data_pool >= 0 && data_pool != vc_librbd.rados_ioctx_get_id(dst->ioctx)) {
        char name[256];
        rc = vc_librbd.rados_pool_reverse_lookup(dst->cluster, data_pool, name, sizeof(name));
        if (rc < 0)
            return vc_fail(e, -rc, VC_SIDE_DST, VC_OP_SETUP, 0, "cannot name dst's data pool: %s", strerror(-rc));
        vc_librbd.rbd_image_options_set_string(options, RBD_IMAGE_OPTION_DATA_POOL, name);
    }
    return 0;
}

struct deep_copy_progress {
    int (*fn)(void *ctx, uint64_t done, uint64_t total);
    void *ctx;
};

/* librbd's progress callback, in objects copied. Its return value is ignored by librbd (16.2: measured,
 * the copy runs to its end whatever it returns). */
static int report_deep_copy(uint64_t done, uint64_t total, void *arg)
{
    struct deep_copy_progress *progress = arg;
    return progress->fn(progress->ctx, done, total);
}

int vc_rbd_deep_copy(struct vc_rbd *src, struct vc_rbd *dst, int (*progress)(void *ctx, uint64_t done, uint64_t total),
                     void *progress_ctx, struct vc_error *error)
{
    struct deep_copy_progress reporter = {progress, progress_ctx};
    rbd_image_options_t options;
    int rc;

    memset(error, 0, sizeof(*error));
    rc = replaceable(src, dst, error);
    if (rc < 0)
        return rc;
    vc_librbd.rbd_image_options_create(&options);
    rc = dst_layout(dst, options, error);
    if (rc < 0) {
        vc_librbd.rbd_image_options_destroy(options);
        return rc;
    }
    vc_librbd.rbd_close(dst->image);
    dst->image = NULL;
    dst->has_extents = false;
    /* Refused (EBUSY) while anyone else has dst open: nothing is lost then. */
    rc = vc_librbd.rbd_remove(dst->ioctx, dst->name);
    if (rc < 0) {
        vc_fail(error, -rc, VC_SIDE_DST, VC_OP_SETUP, 0, "cannot replace dst: %s",
                rc == -EBUSY ? "it is open elsewhere" : strerror(-rc));
    } else {
        rc = progress ? vc_librbd.rbd_deep_copy_with_progress(src->image, dst->ioctx, dst->name, options, report_deep_copy,
                                                    &reporter)
                      : vc_librbd.rbd_deep_copy(src->image, dst->ioctx, dst->name, options);
        if (rc < 0)
            vc_fail(error, -rc, VC_SIDE_DST, VC_OP_WRITE, 0, "the deep copy failed: %s", strerror(-rc));
    }
    vc_librbd.rbd_image_options_destroy(options);
    /* dst's handle stays usable whatever happened (a failed deep copy leaves a partial image to remove). */
    int reopened = vc_librbd.rbd_open(dst->ioctx, dst->name, &dst->image, NULL);
    if (reopened < 0)
        dst->image = NULL;
    return rc < 0 ? rc : reopened;
}

/* ---- asynchronous I/O ---- */

struct aio_call {
    void (*done)(void *ctx, uint64_t tag, int64_t res);
    void *ctx;
    uint64_t tag;
    uint32_t len;
    bool write;
};

static void aio_complete(rbd_completion_t c, void *arg)
{
    struct aio_call *call = arg;
    int64_t res = vc_librbd.rbd_aio_get_return_value(c);
    vc_librbd.rbd_aio_release(c);
    /* A write reports 0 on success: it wrote all of it. */
    if (call->write && res == 0)
        res = call->len;
    call->done(call->ctx, call->tag, res);
    free(call);
}

int vc_rbd_aio(struct vc_rbd *r, int op, void *buf, uint32_t len, uint64_t offset,
               void (*done)(void *ctx, uint64_t tag, int64_t res), void *ctx, uint64_t tag)
{
    struct aio_call *call = malloc(sizeof(*call));
    rbd_completion_t c;
    int rc;

    if (!call)
        return -ENOMEM;
    *call = (struct aio_call){.done = done, .ctx = ctx, .tag = tag, .len = len, .write = op == VC_OP_WRITE};
    rc = vc_librbd.rbd_aio_create_completion(call, aio_complete, &c);
    if (rc < 0) {
        free(call);
        return rc;
    }
    rc = op == VC_OP_WRITE ? vc_librbd.rbd_aio_write(r->image, offset, len, buf, c) : vc_librbd.rbd_aio_read(r->image, offset, len, buf, c);
    if (rc < 0) {
        vc_librbd.rbd_aio_release(c);
        free(call);
    }
    return rc;
}

/* ---- the endpoint table ---- */

static int add_extent(uint64_t off, size_t len, int exists, void *arg)
{
    struct vc_rbd *r = arg;
    if (!exists)
        return 0;
    if (r->n_extents) {
        int64_t *last = &r->extents[2 * (r->n_extents - 1)];
        if ((uint64_t)(last[0] + last[1]) == off) {
            last[1] += (int64_t)len;
            return 0;
        }
    }
    if (r->n_extents == r->cap_extents) {
        uint64_t cap = r->cap_extents ? 2 * r->cap_extents : 256;
        int64_t *grown = realloc(r->extents, cap * 2 * sizeof(int64_t));
        if (!grown)
            return -ENOMEM;
        r->extents = grown;
        r->cap_extents = cap;
    }
    r->extents[2 * r->n_extents] = (int64_t)off;
    r->extents[2 * r->n_extents + 1] = (int64_t)len;
    r->n_extents++;
    return 0;
}

/* The allocated objects, the image's parent's included (a clone reads through to it). */
static int load_extents(struct vc_rbd *r)
{
    uint64_t size;
    int rc = vc_librbd.rbd_get_size(r->image, &size);
    if (rc < 0)
        return rc;
    r->n_extents = 0;
    rc = vc_librbd.rbd_diff_iterate2(r->image, NULL, 0, size, 1, 1, add_extent, r);
    if (rc < 0)
        return rc;
    r->has_extents = true;
    return 0;
}

static int rbd_next_data(const struct vc_endpoint *ep, uint64_t off, uint64_t end, uint64_t *start, uint64_t *stop)
{
    struct vc_rbd *r = ep->rbd;
    if (!r->has_extents) {
        int rc = load_extents(r);
        if (rc < 0)
            return rc;
    }
    /* the first extent that ends after off */
    uint64_t lo = 0, hi = r->n_extents;
    while (lo < hi) {
        uint64_t mid = (lo + hi) / 2;
        if ((uint64_t)(r->extents[2 * mid] + r->extents[2 * mid + 1]) <= off)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == r->n_extents || (uint64_t)r->extents[2 * lo] >= end) {
        *start = *stop = end;
        return 0;
    }
    *start = VC_MAX(off, (uint64_t)r->extents[2 * lo]);
    *stop = VC_MIN(end, (uint64_t)(r->extents[2 * lo] + r->extents[2 * lo + 1]));
    return 0;
}

static int rbd_zero(const struct vc_endpoint *ep, uint64_t off, uint64_t len)
{
    ssize_t n = vc_librbd.rbd_write_zeroes(ep->rbd->image, off, len, 0, 0);
    return n < 0 ? (int)n : 0;
}

static int rbd_flush_image(const struct vc_endpoint *ep)
{
    return vc_librbd.rbd_flush(ep->rbd->image);
}

/* A handle opened read-only has no watch, so it never hears of a resize: its size stays the one it
 * was opened with, and reads past a shrunk end return zeros. The size that tells a src that shrank
 * under the copy comes from a handle opened now. A snapshot's size never changes. */
static int rbd_size(const struct vc_endpoint *ep, uint64_t *size)
{
    struct vc_rbd *r = ep->rbd;
    char id[64];
    rbd_image_t now;
    int rc;

    if (r->snap)
        return vc_librbd.rbd_get_size(r->image, size);
    if ((rc = vc_librbd.rbd_get_id(r->image, id, sizeof(id))) < 0 ||
        (rc = vc_librbd.rbd_open_by_id_read_only(r->ioctx, id, &now, NULL)) < 0)
        return rc;
    rc = vc_librbd.rbd_get_size(now, size);
    vc_librbd.rbd_close(now);
    return rc;
}

const struct vc_endpoint_ops vc_endpoint_rbd_ops = {
    .name = "rbd",
    .next_data = rbd_next_data,
    .zero = rbd_zero,
    .flush = rbd_flush_image,
    .size = rbd_size,
};
