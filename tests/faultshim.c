/* faultshim: an LD_PRELOAD library that makes chosen I/O calls of a process fail (or transfer less), for
 * the engine's fault-injection tests. tests/faultshim.py builds it and sets the environment.
 *
 *   gcc -shared -fPIC -O2 -o faultshim.so faultshim.c -ldl
 *
 * Configuration, read once when the library loads (without FAULT_CALL the shim only passes calls on):
 *   FAULT_CALL       pread, pwrite, fallocate, fdatasync, fsync, ioctl, io_submit, io_uring_submit, or
 *                    io_uring_enter (see below); a comma-separated list shares one counter.
 *                    pread covers pread, pread64, __pread_chk, __pread64_chk, preadv, preadv64,
 *                    preadv2, preadv64v2; pwrite the same pwrite family; fallocate covers fallocate,
 *                    fallocate64, posix_fallocate, posix_fallocate64.
 *   FAULT_NTH        the first matching call to fault, 1-based (default 1)
 *   FAULT_COUNT      how many consecutive matching calls fault from there (default 1; 0 or "all": all)
 *   FAULT_ERRNO      an errno name (EIO, ENOSPC, ...) or number (default EIO)
 *   FAULT_SHORT=1    instead of failing, transfer half the bytes (pread/pwrite families), or submit
 *                    half of the iocbs (io_submit); other calls do not support it
 *   FAULT_PATH       only calls on a descriptor whose /proc/self/fd link contains this substring are
 *                    counted (io_submit: any of its iocbs' descriptors); not applied to io_uring_submit
 *                    and io_uring_enter, whose descriptor is the ring (an anon inode), and whose requests
 *                    name registered ("fixed") files by index
 *   FAULT_IOCTL_REQ  ioctl only: count only this request number (e.g. 0x127f for BLKZEROOUT)
 *   FAULT_LOG        append the injection lines to this file instead of stderr
 *
 * Each injection writes one line:
 *   faultshim: pid=P call=NAME n=N fd=FD offset=OFF len=LEN [more=...] result=-EIO|short=BYTES path=PATH
 * (path last: it may contain spaces).
 *
 * Descriptors are resolved on every matching call, never cached: a cache would have to see every way a
 * descriptor number is reused (close, dup2, close_range, libc's own internal closes), and a readlink
 * costs a microsecond next to a transfer.
 *
 * io_submit (libaio) and io_uring_submit (liburing, linked statically into the engine's module) live in
 * a library that Python dlopen()ed RTLD_LOCAL: dlsym(RTLD_NEXT) from here does not see them. The real
 * function is looked up in the caller's own object (found by dladdr on the return address) and its
 * dependencies, then RTLD_NEXT as a fallback.
 *
 * io_uring_enter: for an engine whose call to io_uring_submit does not go through the PLT (liburing
 * linked with hidden visibility, -Bsymbolic, LTO), the shim installs a seccomp filter when the library
 * loads that traps every io_uring_enter(2) that submits (to_submit > 0); the SIGSYS handler counts it and
 * either fails it (-errno in rax) or issues it itself from an address the filter lets through. liburing
 * makes raw syscalls with inline assembly, so interposing syscall(3) would not see them. Threads that
 * block SIGSYS must not submit to a ring (a blocked trap signal kills the process).
 *
 * Thread safety: the counter is atomic; the configuration is read before main() runs. */
#define _GNU_SOURCE
#undef _FORTIFY_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/aio_abi.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/fs.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__has_include)
#if __has_include(<liburing.h>)
#include <liburing.h>
#define HAVE_LIBURING_H 1
#endif
#endif
#ifndef HAVE_LIBURING_H
struct io_uring;
#endif

#define EXPORT __attribute__((visibility("default")))

/* ---------------------------------------------------------------- configuration */

enum kind { K_PREAD, K_PWRITE, K_FALLOCATE, K_FDATASYNC, K_FSYNC, K_IOCTL, K_IO_SUBMIT, K_IO_URING_SUBMIT,
            K_IO_URING_ENTER, K_COUNT };

static const char *const kind_names[K_COUNT] = {
    "pread", "pwrite", "fallocate", "fdatasync", "fsync", "ioctl", "io_submit", "io_uring_submit",
    "io_uring_enter",
};

static struct {
    unsigned kinds; /* bit per enum kind; 0: inert */
    unsigned long nth, count; /* count 0: every call from nth on */
    int err;
    bool short_io;
    const char *path;
    bool have_ioctl_req;
    unsigned long ioctl_req;
    const char *log;
} cfg;

static atomic_ulong counter;   /* matching calls seen */
static atomic_ulong injected;  /* faults injected */

#define E(x) {#x, x}
static const struct {
    const char *name;
    int value;
} errnos[] = {
    E(EPERM),  E(ENOENT),  E(EINTR),   E(EIO),       E(ENXIO),     E(EBADF),   E(EAGAIN),    E(ENOMEM),
    E(EACCES), E(EFAULT),  E(EBUSY),   E(EEXIST),    E(ENODEV),    E(EINVAL),  E(ENFILE),    E(EMFILE),
    E(ENOTTY), E(EFBIG),   E(ENOSPC),  E(ESPIPE),    E(EROFS),     E(EPIPE),   E(ERANGE),    E(ENOSYS),
    E(ENODATA), E(ETIME),  E(ENOLINK), E(EOVERFLOW), E(EOPNOTSUPP), E(ENOTSUP), E(ETIMEDOUT), E(ESTALE),
    E(EDQUOT), E(ECANCELED), E(EREMOTEIO), E(ENOMEDIUM), E(EMEDIUMTYPE), E(EILSEQ), E(ECONNRESET),
    E(ESHUTDOWN), E(EWOULDBLOCK), E(EBADMSG), E(ENOTCONN),
};
#undef E

static const char *errno_name(int e)
{
    for (size_t i = 0; i < sizeof(errnos) / sizeof(errnos[0]); i++)
        if (errnos[i].value == e)
            return errnos[i].name;
    return NULL;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static bool parse_ulong(const char *s, unsigned long *out)
{
    char *end;
    if (!s || !*s)
        return false;
    errno = 0;
    unsigned long v = strtoul(s, &end, 0);
    if (errno || *end)
        return false;
    *out = v;
    return true;
}

static void install_seccomp(void);
static void inherited_seccomp(void);

__attribute__((constructor)) static void faultshim_init(void)
{
    int saved = errno;
    const char *call = getenv("FAULT_CALL");
    const char *v;

    cfg.nth = 1;
    cfg.count = 1;
    cfg.err = EIO;
    cfg.log = getenv("FAULT_LOG");
    if (cfg.log && !*cfg.log)
        cfg.log = NULL;
    if (!call || !*call)
        goto out;

    unsigned kinds = 0;
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", call);
    for (char *save = NULL, *tok = strtok_r(buf, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
        int k;
        for (k = 0; k < K_COUNT && strcmp(tok, kind_names[k]); k++)
            ;
        if (k == K_COUNT) {
            say("faultshim: config error: unknown FAULT_CALL %s: nothing will be injected\n", tok);
            goto out;
        }
        kinds |= 1u << k;
    }
    if ((v = getenv("FAULT_NTH")) && *v && (!parse_ulong(v, &cfg.nth) || cfg.nth == 0)) {
        say("faultshim: config error: FAULT_NTH=%s is not a number >= 1: nothing will be injected\n", v);
        goto out;
    }
    if ((v = getenv("FAULT_COUNT")) && *v) {
        if (!strcmp(v, "all"))
            cfg.count = 0;
        else if (!parse_ulong(v, &cfg.count)) {
            say("faultshim: config error: FAULT_COUNT=%s is neither a number nor \"all\": nothing will be "
                "injected\n", v);
            goto out;
        }
    }
    if ((v = getenv("FAULT_ERRNO")) && *v) {
        unsigned long n;
        size_t i;
        for (i = 0; i < sizeof(errnos) / sizeof(errnos[0]) && strcmp(v, errnos[i].name); i++)
            ;
        if (i < sizeof(errnos) / sizeof(errnos[0]))
            cfg.err = errnos[i].value;
        else if (parse_ulong(v, &n) && n > 0 && n < 4096)
            cfg.err = (int)n;
        else {
            say("faultshim: config error: FAULT_ERRNO=%s is not a known errno name or a number: nothing "
                "will be injected\n", v);
            goto out;
        }
    }
    v = getenv("FAULT_SHORT");
    cfg.short_io = v && *v && strcmp(v, "0") != 0;
    if (cfg.short_io && (kinds & ~((1u << K_PREAD) | (1u << K_PWRITE) | (1u << K_IO_SUBMIT)))) {
        say("faultshim: config error: FAULT_SHORT applies to pread, pwrite and io_submit only: nothing will "
            "be injected\n");
        goto out;
    }
    cfg.path = getenv("FAULT_PATH");
    if (cfg.path && !*cfg.path)
        cfg.path = NULL;
    if ((v = getenv("FAULT_IOCTL_REQ")) && *v) {
        if (!parse_ulong(v, &cfg.ioctl_req)) {
            say("faultshim: config error: FAULT_IOCTL_REQ=%s is not a number: nothing will be injected\n", v);
            goto out;
        }
        cfg.have_ioctl_req = true;
    }
    cfg.kinds = kinds;
    if (kinds & (1u << K_IO_URING_ENTER))
        install_seccomp();
out:
    if (!(cfg.kinds & (1u << K_IO_URING_ENTER)))
        inherited_seccomp();
    errno = saved;
}

/* ---------------------------------------------------------------- logging */

static void say(const char *fmt, ...)
{
    char line[PATH_MAX + 512];
    va_list ap;
    int saved = errno;

    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (n < 0)
        goto out;
    if ((size_t)n >= sizeof(line)) {
        n = sizeof(line) - 1;
        line[n - 1] = '\n';
    }
    int fd = 2;
    if (cfg.log) {
        fd = open(cfg.log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0)
            fd = 2;
    }
    /* One write: lines from several threads or processes never interleave. */
    for (ssize_t done = 0, w; done < n; done += w)
        if ((w = write(fd, line + done, (size_t)(n - done))) <= 0)
            break;
    if (fd != 2)
        close(fd);
out:
    errno = saved;
}

static void fd_path(int fd, char *buf, size_t size)
{
    char link[64];
    int saved = errno;
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, buf, size - 1);
    if (n < 0)
        snprintf(buf, size, "?");
    else
        buf[n] = '\0';
    errno = saved;
}

static const char *result_text(char *buf, size_t size)
{
    const char *name = errno_name(cfg.err);
    if (name)
        snprintf(buf, size, "result=-%s", name);
    else
        snprintf(buf, size, "result=-%d", cfg.err);
    return buf;
}

static void log_injection(const char *call, unsigned long n, int fd, long long offset, unsigned long long len,
                          const char *more, long long short_len, const char *path)
{
    char res[64];
    if (short_len >= 0)
        snprintf(res, sizeof(res), "short=%lld", short_len);
    else
        result_text(res, sizeof(res));
    atomic_fetch_add(&injected, 1);
    say("faultshim: pid=%d call=%s n=%lu fd=%d offset=%lld len=%llu%s%s %s path=%s\n", (int)getpid(), call, n,
        fd, offset, len, more && *more ? " " : "", more ? more : "", res, path);
}

/* ---------------------------------------------------------------- the decision */

static inline bool targeted(enum kind k)
{
    return cfg.kinds & (1u << k);
}

static bool path_matches(const char *path)
{
    return !cfg.path || strstr(path, cfg.path) != NULL;
}

/* Counts a matching call; true (and *n) when this one is to be faulted. */
static bool count_and_decide(unsigned long *n)
{
    unsigned long seen = atomic_fetch_add(&counter, 1) + 1;
    *n = seen;
    return seen >= cfg.nth && (cfg.count == 0 || seen - cfg.nth < cfg.count);
}

/* For the calls on one descriptor: path filter, then the count. */
static bool decide_fd(enum kind k, int fd, char *path, size_t size, unsigned long *n)
{
    if (!targeted(k))
        return false;
    fd_path(fd, path, size);
    if (!path_matches(path))
        return false;
    return count_and_decide(n);
}

static size_t short_len(size_t len)
{
    if (len > 4096 && len % 4096 == 0)
        return (len / 2) & ~(size_t)4095;
    return len / 2;
}

/* ---------------------------------------------------------------- the real functions */

static void *next_fn(const char *name)
{
    void *fn = dlsym(RTLD_NEXT, name);
    if (!fn)
        say("faultshim: cannot find the real %s: %s\n", name, dlerror());
    return fn;
}

/* `type real = ...` for a libc function, resolved once with dlsym(RTLD_NEXT). */
#define REAL(type, name)                                                                                     \
    type real = __atomic_load_n(&real_##name##_cache, __ATOMIC_ACQUIRE);                                     \
    if (!real) {                                                                                             \
        real = (type)next_fn(#name);                                                                         \
        __atomic_store_n(&real_##name##_cache, real, __ATOMIC_RELEASE);                                      \
    }

#define CACHE(type, name) static type real_##name##_cache;

/* A function that lives in the caller's own object or its dependencies (a library dlopen()ed with
 * RTLD_LOCAL, as Python loads extension modules): dlsym(RTLD_NEXT) cannot see those. */
struct caller_fn {
    const void *base;
    const char *name;
    void *fn;
};
static struct caller_fn caller_fns[32];
static unsigned n_caller_fns;
static pthread_mutex_t caller_fns_lock = PTHREAD_MUTEX_INITIALIZER;

static void *caller_fn(const char *name, const void *caller, const void *self)
{
    Dl_info info;
    void *fn = NULL;
    const void *base = NULL;
    int saved = errno;

    if (caller && dladdr(caller, &info) && info.dli_fname)
        base = info.dli_fbase;
    pthread_mutex_lock(&caller_fns_lock);
    for (unsigned i = 0; i < n_caller_fns; i++)
        if (caller_fns[i].base == base && caller_fns[i].name == name) {
            fn = caller_fns[i].fn;
            goto done;
        }
    if (base && info.dli_fname[0]) { /* the main program has an empty name: its scope holds us too */
        void *h = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
        if (h) {
            fn = dlsym(h, name);
            dlclose(h);
        }
        if (fn == self)
            fn = NULL;
    }
    if (!fn)
        fn = dlsym(RTLD_NEXT, name);
    if (fn == self)
        fn = NULL;
    if (!fn)
        say("faultshim: cannot find the real %s for a caller in %s\n", name,
            base ? info.dli_fname : "an unknown object");
    else if (n_caller_fns < sizeof(caller_fns) / sizeof(caller_fns[0]))
        caller_fns[n_caller_fns++] = (struct caller_fn){base, name, fn};
done:
    pthread_mutex_unlock(&caller_fns_lock);
    errno = saved;
    return fn;
}

/* ---------------------------------------------------------------- pread and pwrite */

typedef ssize_t (*pread_fn)(int, void *, size_t, off_t);
typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*pread_chk_fn)(int, void *, size_t, off_t, size_t);
typedef ssize_t (*preadv_fn)(int, const struct iovec *, int, off_t);
typedef ssize_t (*preadv2_fn)(int, const struct iovec *, int, off_t, int);

CACHE(pread_fn, pread)
CACHE(pread_fn, pread64)
CACHE(pread_chk_fn, __pread_chk)
CACHE(pread_chk_fn, __pread64_chk)
CACHE(pwrite_fn, pwrite)
CACHE(pwrite_fn, pwrite64)
CACHE(preadv_fn, preadv)
CACHE(preadv_fn, preadv64)
CACHE(preadv2_fn, preadv2)
CACHE(preadv2_fn, preadv64v2)
CACHE(preadv_fn, pwritev)
CACHE(preadv_fn, pwritev64)
CACHE(preadv2_fn, pwritev2)
CACHE(preadv2_fn, pwritev64v2)

#define NOSYS_IF_NULL(fn)                                                                                    \
    if (!(fn)) {                                                                                             \
        errno = ENOSYS;                                                                                      \
        return -1;                                                                                           \
    }

/* The plain calls: fail, shorten or pass. `call` is the real function applied to (buf, len). */
#define PLAIN_IO(kind, name, fd, buf, len, off, CALL)                                                        \
    do {                                                                                                     \
        char path_[PATH_MAX];                                                                                \
        unsigned long n_;                                                                                    \
        if (decide_fd(kind, fd, path_, sizeof(path_), &n_)) {                                                \
            if (!cfg.short_io) {                                                                             \
                log_injection(name, n_, fd, (long long)(off), (unsigned long long)(len), NULL, -1, path_);   \
                errno = cfg.err;                                                                             \
                return -1;                                                                                   \
            }                                                                                                \
            size_t s_ = short_len(len);                                                                      \
            if (s_) {                                                                                        \
                log_injection(name, n_, fd, (long long)(off), (unsigned long long)(len), NULL, (long long)s_, \
                              path_);                                                                        \
                size_t len_ = s_;                                                                            \
                (void)len_;                                                                                  \
                return CALL(len_);                                                                           \
            }                                                                                                \
        }                                                                                                    \
    } while (0)

#define CALL_PREAD(l) real(fd, buf, l, off)
#define CALL_PREAD_CHK(l) real(fd, buf, l, off, buflen)

EXPORT ssize_t pread(int fd, void *buf, size_t len, off_t off)
{
    REAL(pread_fn, pread)
    NOSYS_IF_NULL(real)
    PLAIN_IO(K_PREAD, "pread", fd, buf, len, off, CALL_PREAD);
    return real(fd, buf, len, off);
}

EXPORT ssize_t pread64(int fd, void *buf, size_t len, off_t off)
{
    REAL(pread_fn, pread64)
    NOSYS_IF_NULL(real)
    PLAIN_IO(K_PREAD, "pread64", fd, buf, len, off, CALL_PREAD);
    return real(fd, buf, len, off);
}

EXPORT ssize_t __pread_chk(int fd, void *buf, size_t len, off_t off, size_t buflen)
{
    REAL(pread_chk_fn, __pread_chk)
    NOSYS_IF_NULL(real)
    PLAIN_IO(K_PREAD, "__pread_chk", fd, buf, len, off, CALL_PREAD_CHK);
    return real(fd, buf, len, off, buflen);
}

EXPORT ssize_t __pread64_chk(int fd, void *buf, size_t len, off_t off, size_t buflen)
{
    REAL(pread_chk_fn, __pread64_chk)
    NOSYS_IF_NULL(real)
    PLAIN_IO(K_PREAD, "__pread64_chk", fd, buf, len, off, CALL_PREAD_CHK);
    return real(fd, buf, len, off, buflen);
}

EXPORT ssize_t pwrite(int fd, const void *buf, size_t len, off_t off)
{
    REAL(pwrite_fn, pwrite)
    NOSYS_IF_NULL(real)
    PLAIN_IO(K_PWRITE, "pwrite", fd, buf, len, off, CALL_PREAD);
    return real(fd, buf, len, off);
}

EXPORT ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off)
{
    REAL(pwrite_fn, pwrite64)
    NOSYS_IF_NULL(real)
    PLAIN_IO(K_PWRITE, "pwrite64", fd, buf, len, off, CALL_PREAD);
    return real(fd, buf, len, off);
}

/* The vectored calls: a short transfer keeps the leading iovecs that make up the shortened length. */
static int vec_decide(enum kind k, const char *name, int fd, const struct iovec *iov, int iovcnt, off_t off,
                      struct iovec *out, int *out_cnt)
{
    char path[PATH_MAX];
    unsigned long n;
    size_t total = 0;

    if (!decide_fd(k, fd, path, sizeof(path), &n))
        return 0;
    if (iovcnt > 0 && iovcnt <= IOV_MAX)
        for (int i = 0; i < iovcnt; i++)
            total += iov[i].iov_len;
    if (!cfg.short_io) {
        log_injection(name, n, fd, (long long)off, (unsigned long long)total, NULL, -1, path);
        return -1;
    }
    size_t want = short_len(total), have = 0;
    if (!want || iovcnt <= 0 || iovcnt > IOV_MAX)
        return 0;
    int c = 0;
    for (; c < iovcnt && have < want; c++) {
        out[c] = iov[c];
        if (have + out[c].iov_len > want)
            out[c].iov_len = want - have;
        have += out[c].iov_len;
    }
    *out_cnt = c;
    log_injection(name, n, fd, (long long)off, (unsigned long long)total, NULL, (long long)want, path);
    return 1;
}

#define VEC_BODY(kind, name, CALL)                                                                           \
    NOSYS_IF_NULL(real)                                                                                      \
    if (targeted(kind)) {                                                                                    \
        struct iovec short_iov[iovcnt > 0 && iovcnt <= IOV_MAX ? iovcnt : 1];                                \
        int short_cnt = 0;                                                                                   \
        int d = vec_decide(kind, name, fd, iov, iovcnt, off, short_iov, &short_cnt);                         \
        if (d < 0) {                                                                                         \
            errno = cfg.err;                                                                                 \
            return -1;                                                                                       \
        }                                                                                                    \
        if (d > 0) {                                                                                         \
            const struct iovec *iov_ = short_iov;                                                            \
            int cnt_ = short_cnt;                                                                            \
            return CALL(iov_, cnt_);                                                                         \
        }                                                                                                    \
    }                                                                                                        \
    return CALL(iov, iovcnt);

#define CALL_V(v, c) real(fd, v, c, off)
#define CALL_V2(v, c) real(fd, v, c, off, flags)

EXPORT ssize_t preadv(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
    REAL(preadv_fn, preadv)
    VEC_BODY(K_PREAD, "preadv", CALL_V)
}

EXPORT ssize_t preadv64(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
    REAL(preadv_fn, preadv64)
    VEC_BODY(K_PREAD, "preadv64", CALL_V)
}

EXPORT ssize_t preadv2(int fd, const struct iovec *iov, int iovcnt, off_t off, int flags)
{
    REAL(preadv2_fn, preadv2)
    VEC_BODY(K_PREAD, "preadv2", CALL_V2)
}

EXPORT ssize_t preadv64v2(int fd, const struct iovec *iov, int iovcnt, off_t off, int flags)
{
    REAL(preadv2_fn, preadv64v2)
    VEC_BODY(K_PREAD, "preadv64v2", CALL_V2)
}

EXPORT ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
    REAL(preadv_fn, pwritev)
    VEC_BODY(K_PWRITE, "pwritev", CALL_V)
}

EXPORT ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
    REAL(preadv_fn, pwritev64)
    VEC_BODY(K_PWRITE, "pwritev64", CALL_V)
}

EXPORT ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t off, int flags)
{
    REAL(preadv2_fn, pwritev2)
    VEC_BODY(K_PWRITE, "pwritev2", CALL_V2)
}

EXPORT ssize_t pwritev64v2(int fd, const struct iovec *iov, int iovcnt, off_t off, int flags)
{
    REAL(preadv2_fn, pwritev64v2)
    VEC_BODY(K_PWRITE, "pwritev64v2", CALL_V2)
}

/* ---------------------------------------------------------------- fallocate, fsync, fdatasync */

typedef int (*fallocate_fn)(int, int, off_t, off_t);
typedef int (*posix_fallocate_fn)(int, off_t, off_t);
typedef int (*sync_fn)(int);
CACHE(fallocate_fn, fallocate)
CACHE(fallocate_fn, fallocate64)
CACHE(posix_fallocate_fn, posix_fallocate)
CACHE(posix_fallocate_fn, posix_fallocate64)
CACHE(sync_fn, fsync)
CACHE(sync_fn, fdatasync)

static bool fallocate_decide(const char *name, int fd, int mode, off_t off, off_t len)
{
    char path[PATH_MAX], more[32];
    unsigned long n;
    if (!decide_fd(K_FALLOCATE, fd, path, sizeof(path), &n))
        return false;
    snprintf(more, sizeof(more), "mode=0x%x", (unsigned)mode);
    log_injection(name, n, fd, (long long)off, (unsigned long long)len, mode >= 0 ? more : NULL, -1, path);
    return true;
}

EXPORT int fallocate(int fd, int mode, off_t off, off_t len)
{
    REAL(fallocate_fn, fallocate)
    NOSYS_IF_NULL(real)
    if (fallocate_decide("fallocate", fd, mode, off, len)) {
        errno = cfg.err;
        return -1;
    }
    return real(fd, mode, off, len);
}

EXPORT int fallocate64(int fd, int mode, off_t off, off_t len)
{
    REAL(fallocate_fn, fallocate64)
    NOSYS_IF_NULL(real)
    if (fallocate_decide("fallocate64", fd, mode, off, len)) {
        errno = cfg.err;
        return -1;
    }
    return real(fd, mode, off, len);
}

/* posix_fallocate returns the error number, errno untouched. */
EXPORT int posix_fallocate(int fd, off_t off, off_t len)
{
    REAL(posix_fallocate_fn, posix_fallocate)
    if (!real)
        return ENOSYS;
    if (fallocate_decide("posix_fallocate", fd, -1, off, len))
        return cfg.err;
    return real(fd, off, len);
}

EXPORT int posix_fallocate64(int fd, off_t off, off_t len)
{
    REAL(posix_fallocate_fn, posix_fallocate64)
    if (!real)
        return ENOSYS;
    if (fallocate_decide("posix_fallocate64", fd, -1, off, len))
        return cfg.err;
    return real(fd, off, len);
}

static bool sync_decide(enum kind k, const char *name, int fd)
{
    char path[PATH_MAX];
    unsigned long n;
    if (!decide_fd(k, fd, path, sizeof(path), &n))
        return false;
    log_injection(name, n, fd, 0, 0, NULL, -1, path);
    return true;
}

EXPORT int fsync(int fd)
{
    REAL(sync_fn, fsync)
    NOSYS_IF_NULL(real)
    if (sync_decide(K_FSYNC, "fsync", fd)) {
        errno = cfg.err;
        return -1;
    }
    return real(fd);
}

EXPORT int fdatasync(int fd)
{
    REAL(sync_fn, fdatasync)
    NOSYS_IF_NULL(real)
    if (sync_decide(K_FDATASYNC, "fdatasync", fd)) {
        errno = cfg.err;
        return -1;
    }
    return real(fd);
}

/* ---------------------------------------------------------------- ioctl */

typedef int (*ioctl_fn)(int, unsigned long, ...);
CACHE(ioctl_fn, ioctl)

EXPORT int ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *); /* every ioctl takes at most one argument, an int or a pointer */
    va_end(ap);

    REAL(ioctl_fn, ioctl)
    NOSYS_IF_NULL(real)
    if (targeted(K_IOCTL) && (!cfg.have_ioctl_req || cfg.ioctl_req == req)) {
        char path[PATH_MAX], more[48];
        unsigned long n;
        if (decide_fd(K_IOCTL, fd, path, sizeof(path), &n)) {
            long long off = -1;
            unsigned long long len = 0;
            if ((req == BLKZEROOUT || req == BLKDISCARD || req == BLKSECDISCARD) && arg) {
                const uint64_t *range = arg;
                off = (long long)range[0];
                len = (unsigned long long)range[1];
            }
            snprintf(more, sizeof(more), "req=0x%lx", req);
            log_injection("ioctl", n, fd, off, len, more, -1, path);
            errno = cfg.err;
            return -1;
        }
    }
    return real(fd, req, arg);
}

/* ---------------------------------------------------------------- io_submit (libaio) */

/* libaio's struct iocb has the kernel's layout: it is what io_submit(2) takes. */
typedef int (*io_submit_fn)(void *, long, struct iocb **);

EXPORT int io_submit(void *ctx, long nr, struct iocb **ios)
{
    io_submit_fn real = caller_fn("io_submit", __builtin_return_address(0), (const void *)io_submit);
    if (!real)
        return -ENOSYS;
    if (!targeted(K_IO_SUBMIT) || nr <= 0 || !ios)
        return real(ctx, nr, ios);

    char path[PATH_MAX];
    long hit = -1;
    for (long i = 0; i < nr && hit < 0; i++) {
        if (!ios[i])
            continue;
        fd_path((int)ios[i]->aio_fildes, path, sizeof(path));
        if (path_matches(path))
            hit = i;
    }
    unsigned long n;
    if (hit < 0 || !count_and_decide(&n))
        return real(ctx, nr, ios);

    const struct iocb *cb = ios[hit];
    const char *op = cb->aio_lio_opcode == IOCB_CMD_PREAD    ? "pread"
                     : cb->aio_lio_opcode == IOCB_CMD_PWRITE ? "pwrite"
                     : cb->aio_lio_opcode == IOCB_CMD_PREADV ? "preadv"
                     : cb->aio_lio_opcode == IOCB_CMD_PWRITEV ? "pwritev"
                     : cb->aio_lio_opcode == IOCB_CMD_FSYNC ? "fsync"
                     : cb->aio_lio_opcode == IOCB_CMD_FDSYNC ? "fdsync"
                                                             : "other";
    char more[64];
    if (cfg.short_io) {
        if (nr < 2)
            return real(ctx, nr, ios);
        long part = nr / 2;
        snprintf(more, sizeof(more), "nr=%ld op=%s iocb=%ld", nr, op, hit);
        log_injection("io_submit", n, (int)cb->aio_fildes, (long long)cb->aio_offset,
                      (unsigned long long)cb->aio_nbytes, more, part, path);
        return real(ctx, part, ios);
    }
    snprintf(more, sizeof(more), "nr=%ld op=%s iocb=%ld", nr, op, hit);
    log_injection("io_submit", n, (int)cb->aio_fildes, (long long)cb->aio_offset,
                  (unsigned long long)cb->aio_nbytes, more, -1, path);
    return -cfg.err; /* libaio's convention: a negative errno, errno untouched */
}

/* ---------------------------------------------------------------- io_uring_submit (liburing) */

typedef int (*io_uring_submit_fn)(struct io_uring *);

static void describe_ring(struct io_uring *ring, int *fd, long long *off, unsigned long long *len, char *more,
                          size_t size)
{
#ifdef HAVE_LIBURING_H
    /* liburing keeps the entries prepared since the last submit between sqe_head and sqe_tail. */
    unsigned pending = ring->sq.sqe_tail - ring->sq.sqe_head;
    *fd = ring->ring_fd;
    if (pending && ring->sq.sqes) {
        const struct io_uring_sqe *sqe = &ring->sq.sqes[ring->sq.sqe_head & ring->sq.ring_mask];
        *off = (long long)sqe->off;
        *len = sqe->len;
        snprintf(more, size, "pending=%u opcode=%u sqe_fd=%d%s", pending, sqe->opcode, sqe->fd,
                 (sqe->flags & IOSQE_FIXED_FILE) ? "(fixed)" : "");
    } else {
        snprintf(more, size, "pending=%u", pending);
    }
#else
    (void)ring;
    *fd = -1;
    snprintf(more, size, "pending=?");
#endif
}

EXPORT int io_uring_submit(struct io_uring *ring)
{
    io_uring_submit_fn real =
        caller_fn("io_uring_submit", __builtin_return_address(0), (const void *)io_uring_submit);
    if (!real)
        return -ENOSYS;
    unsigned long n;
    if (!targeted(K_IO_URING_SUBMIT) || !count_and_decide(&n))
        return real(ring);

    char path[PATH_MAX] = "?", more[96];
    int fd = -1;
    long long off = -1;
    unsigned long long len = 0;
    describe_ring(ring, &fd, &off, &len, more, sizeof(more));
    if (fd >= 0)
        fd_path(fd, path, sizeof(path));
    log_injection("io_uring_submit", n, fd, off, len, more, -1, path);
    return -cfg.err; /* liburing's convention: a negative errno */
}

/* ---------------------------------------------------------------- io_uring_enter (seccomp) */

/* The filter's mark on its traps (si_errno): a SIGSYS without it is someone else's. */
#define TRAP_COOKIE 0x0f51
#define SECCOMP_SI_CODE 1 /* SYS_SECCOMP, which not every libc names */
#define FILTER_ENV "FAULTSHIM_SECCOMP_FILTER"

#if defined(__x86_64__)
/* Our own syscall instruction. The filter lets through the io_uring_enter calls whose return address has
 * the page offset of faultshim_syscall_return: the offset, unlike the address, is the same in every
 * process that loads this build of the shim, so a filter inherited across execve (a shim loaded into
 * `timeout`, which then runs python) still lets the new process's shim through. */
extern long faultshim_syscall6(long nr, long a, long b, long c, long d, long e, long f);
extern char faultshim_syscall_return[];
__asm__(".text\n"
        ".globl faultshim_syscall6\n"
        ".hidden faultshim_syscall6\n"
        ".type faultshim_syscall6,@function\n"
        "faultshim_syscall6:\n"
        "  movq %rdi, %rax\n"
        "  movq %rsi, %rdi\n"
        "  movq %rdx, %rsi\n"
        "  movq %rcx, %rdx\n"
        "  movq %r8, %r10\n"
        "  movq %r9, %r8\n"
        "  movq 8(%rsp), %r9\n"
        "  syscall\n"
        ".globl faultshim_syscall_return\n"
        ".hidden faultshim_syscall_return\n"
        "faultshim_syscall_return:\n"
        "  ret\n"
        ".size faultshim_syscall6, .-faultshim_syscall6\n");

static struct sigaction previous_sigsys;

static void on_sigsys(int sig, siginfo_t *info, void *context)
{
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    int saved = errno;

    if (info->si_code != SECCOMP_SI_CODE || info->si_errno != TRAP_COOKIE || info->si_syscall != __NR_io_uring_enter) {
        /* not our filter's: hand it on */
        if ((previous_sigsys.sa_flags & SA_SIGINFO) && previous_sigsys.sa_sigaction)
            previous_sigsys.sa_sigaction(sig, info, context);
        else if (previous_sigsys.sa_handler != SIG_DFL && previous_sigsys.sa_handler != SIG_IGN)
            previous_sigsys.sa_handler(sig);
        else
            r[REG_RAX] = -ENOSYS;
        errno = saved;
        return;
    }
    unsigned long n;
    if (targeted(K_IO_URING_ENTER) && count_and_decide(&n)) {
        char path[PATH_MAX], more[64];
        int fd = (int)r[REG_RDI];
        fd_path(fd, path, sizeof(path));
        /* The 4th syscall argument (flags) travels in r10. */
        snprintf(more, sizeof(more), "to_submit=%llu flags=0x%llx", (unsigned long long)r[REG_RSI],
                 (unsigned long long)r[REG_R10]);
        log_injection("io_uring_enter", n, fd, -1, 0, more, -1, path);
        r[REG_RAX] = -cfg.err;
    } else {
        r[REG_RAX] = faultshim_syscall6(__NR_io_uring_enter, r[REG_RDI], r[REG_RSI], r[REG_RDX], r[REG_R10],
                                        r[REG_R8], r[REG_R9]);
    }
    errno = saved;
}

static bool install_sigsys_handler(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    sigfillset(&sa.sa_mask);
    return sigaction(SIGSYS, &sa, &previous_sigsys) == 0;
}

/* Traps io_uring_enter(2) calls that submit (to_submit > 0), except our own re-issue. Installed before
 * main(), so every thread has it. It outlives execve: the environment marks its presence, and a shim
 * loaded into the new program installs the handler even when not asked to inject there. */
static void install_seccomp(void)
{
    uint32_t offset = (uint32_t)((uintptr_t)faultshim_syscall_return & 0xfff);
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_enter, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])), /* to_submit */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, instruction_pointer)),
        BPF_STMT(BPF_ALU | BPF_AND | BPF_K, 0xfff),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, offset, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP | TRAP_COOKIE),
    };
    struct sock_fprog prog = {.len = sizeof(filter) / sizeof(filter[0]), .filter = filter};

    if (!install_sigsys_handler() || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0) {
        say("faultshim: config error: cannot install the io_uring_enter filter: %s\n", strerror(errno));
        cfg.kinds = 0;
        return;
    }
    setenv(FILTER_ENV, "1", 1);
}

static void inherited_seccomp(void)
{
    if (getenv(FILTER_ENV))
        install_sigsys_handler();
}
#else
static void install_seccomp(void)
{
    say("faultshim: config error: io_uring_enter is only supported on x86_64\n");
    cfg.kinds = 0;
}

static void inherited_seccomp(void)
{
}
#endif

/* For a test that wants to know from inside the process (via ctypes) what the shim did. */
EXPORT unsigned long faultshim_injected(void)
{
    return atomic_load(&injected);
}

EXPORT unsigned long faultshim_seen(void)
{
    return atomic_load(&counter);
}
