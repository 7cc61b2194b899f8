/* SPDX-License-Identifier: MIT */
#ifndef _WIN32
#  ifndef _FILE_OFFSET_BITS
#    define _FILE_OFFSET_BITS 64
#  endif
#  ifndef _GNU_SOURCE
#    define _GNU_SOURCE
#  endif
#endif

#include "sessionfence.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include "xxhash/xxhash.h"

#ifdef _WIN32
#  ifndef WIN32_LEAN_AND_MEAN
#    define WIN32_LEAN_AND_MEAN
#  endif
#  include <windows.h>
#else
#  include <fcntl.h>
#  include <sys/stat.h>
#  include <sys/types.h>
#  include <time.h>
#  include <unistd.h>
#endif

#ifndef SF_PACKAGE_VERSION
#  define SF_PACKAGE_VERSION "unknown"
#endif

/*
 * A file that keeps moving while we read it gets this many tries before UnstableFileError.
 * The first SF_SPIN_TRIES retry at once; later ones back off (1 us doubling to 1 ms), so a
 * writer on another core (we run without the GIL) gets room to finish: the whole budget
 * spans about 50 ms.
 */
#define SF_STABLE_TRIES 64
#define SF_SPIN_TRIES 8
/* Small windows are read into the stack; the default window is 4 KiB. */
#define SF_STACK_WINDOW 16384
#define SF_DIGEST_CHUNK (256 * 1024)

typedef struct sf_stat {
    uint64_t dev;
    uint64_t ino;
    int64_t size;
    int64_t mtime_ns;
    int64_t ctime_ns;
    int64_t nlink;
    int32_t is_reg;
    int32_t is_dir;
} sf_stat;

typedef int64_t sf_handle;
#define SF_NO_HANDLE ((sf_handle)-1)

static int fail_value(sf_err *err, int64_t detail)
{
    err->code = SF_EVALUE;
    err->detail = detail;
    return -1;
}

static int fail_nomem(sf_err *err)
{
    err->code = SF_ENOMEM;
    err->sys_errno = ENOMEM;
    return -1;
}

static int fail_errno(sf_err *err, int e)
{
    err->code = SF_EOS;
    err->sys_errno = e;
    err->winerror = 0;
    return -1;
}

static int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

static int same_state(const sf_stat *a, const sf_stat *b)
{
    return a->dev == b->dev && a->ino == b->ino && a->size == b->size &&
           a->mtime_ns == b->mtime_ns && a->ctime_ns == b->ctime_ns;
}

static void backoff(int tries)
{
    long us;
    if (tries < SF_SPIN_TRIES)
        return;
    us = tries - SF_SPIN_TRIES >= 10 ? 1000L : 1L << (tries - SF_SPIN_TRIES);
#ifdef _WIN32
    Sleep(us >= 1000 ? 1 : 0);
#else
    {
        struct timespec ts;
        ts.tv_sec = 0;
        ts.tv_nsec = us * 1000L;
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
    }
#endif
}

/* Wall-clock time in ns since 1970: file timestamps come from the same clock. */
static int64_t realtime_ns(void)
{
#ifdef _WIN32
    FILETIME ft;
    ULARGE_INTEGER t;
    GetSystemTimePreciseAsFileTime(&ft);
    t.LowPart = ft.dwLowDateTime;
    t.HighPart = ft.dwHighDateTime;
    return (int64_t)(t.QuadPart - 116444736000000000ULL) * 100;
#else
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return INT64_MIN; /* no clock: never trust the cache */
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
#endif
}

/* ------------------------------------------------------------------------------------ */
/* Platform layer: open, stat, positional read, close.                                   */
/* ------------------------------------------------------------------------------------ */

#ifdef _WIN32

static int win_to_errno(DWORD w)
{
    switch (w) {
    case ERROR_FILE_NOT_FOUND:
    case ERROR_PATH_NOT_FOUND:
    case ERROR_INVALID_DRIVE:
    case ERROR_BAD_NETPATH:
    case ERROR_BAD_NET_NAME:
        return ENOENT;
    case ERROR_DIRECTORY:
        return ENOTDIR;
    case ERROR_ACCESS_DENIED:
    case ERROR_SHARING_VIOLATION:
    case ERROR_LOCK_VIOLATION:
        return EACCES;
    case ERROR_NOT_ENOUGH_MEMORY:
    case ERROR_OUTOFMEMORY:
        return ENOMEM;
    case ERROR_FILENAME_EXCED_RANGE:
        return ENAMETOOLONG;
    case ERROR_INVALID_NAME:
    case ERROR_INVALID_PARAMETER:
        return EINVAL;
    case ERROR_CANT_RESOLVE_FILENAME:
        return ELOOP;
    default:
        return EIO;
    }
}

static int fail_win(sf_err *err, DWORD w)
{
    err->code = SF_EOS;
    err->winerror = (int32_t)w;
    err->sys_errno = win_to_errno(w);
    return -1;
}

static wchar_t *utf8_to_wide(const char *path, sf_err *err)
{
    int n = MultiByteToWideChar(CP_UTF8, 0, path, -1, NULL, 0);
    wchar_t *w;
    if (n <= 0) {
        fail_win(err, GetLastError());
        return NULL;
    }
    w = (wchar_t *)malloc((size_t)n * sizeof(wchar_t));
    if (w == NULL) {
        fail_nomem(err);
        return NULL;
    }
    if (MultiByteToWideChar(CP_UTF8, 0, path, -1, w, n) <= 0) {
        fail_win(err, GetLastError());
        free(w);
        return NULL;
    }
    return w;
}

static int is_missing_win(DWORD w)
{
    return w == ERROR_FILE_NOT_FOUND || w == ERROR_PATH_NOT_FOUND || w == ERROR_INVALID_DRIVE ||
           w == ERROR_BAD_NETPATH || w == ERROR_BAD_NET_NAME || w == ERROR_DIRECTORY;
}

/* 100 ns ticks since 1601 to ns since 1970. */
static int64_t filetime_ns(LONGLONG t)
{
    return (int64_t)(t - 116444736000000000LL) * 100;
}

static int h_stat(sf_handle h, sf_stat *st, sf_err *err)
{
    BY_HANDLE_FILE_INFORMATION info;
    FILE_BASIC_INFO basic;
    HANDLE fh = (HANDLE)(intptr_t)h;
    if (!GetFileInformationByHandle(fh, &info))
        return fail_win(err, GetLastError());
    if (!GetFileInformationByHandleEx(fh, FileBasicInfo, &basic, sizeof(basic)))
        return fail_win(err, GetLastError());
    st->dev = (uint64_t)info.dwVolumeSerialNumber;
    st->ino = ((uint64_t)info.nFileIndexHigh << 32) | (uint64_t)info.nFileIndexLow;
    st->size = (int64_t)(((uint64_t)info.nFileSizeHigh << 32) | (uint64_t)info.nFileSizeLow);
    st->mtime_ns = filetime_ns(basic.LastWriteTime.QuadPart);
    /* ChangeTime is NTFS's status-change time: the analogue of st_ctime, not creation time. */
    st->ctime_ns = filetime_ns(basic.ChangeTime.QuadPart);
    st->nlink = (int64_t)info.nNumberOfLinks;
    st->is_dir = (info.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY) != 0;
    st->is_reg = !st->is_dir && GetFileType(fh) == FILE_TYPE_DISK;
    return 0;
}

/* Share modes let other processes append to, rename and delete the file while we hold it. */
#define SF_SHARE (FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE)

static int h_open(const char *path, sf_handle *out, int *missing, sf_err *err)
{
    wchar_t *w = utf8_to_wide(path, err);
    HANDLE fh;
    DWORD e;
    *missing = 0;
    if (w == NULL)
        return -1;
    fh = CreateFileW(w, GENERIC_READ, SF_SHARE, NULL, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, NULL);
    if (fh == INVALID_HANDLE_VALUE) {
        DWORD attrs;
        e = GetLastError();
        if (is_missing_win(e)) {
            free(w);
            *missing = 1;
            return 0;
        }
        attrs = GetFileAttributesW(w);
        free(w);
        if (e == ERROR_ACCESS_DENIED && attrs != INVALID_FILE_ATTRIBUTES &&
            (attrs & FILE_ATTRIBUTE_DIRECTORY)) {
            err->code = SF_EOS;
            err->winerror = (int32_t)e;
            err->sys_errno = EISDIR;
            return -1;
        }
        return fail_win(err, e);
    }
    free(w);
    *out = (sf_handle)(intptr_t)fh;
    return 0;
}

static int path_stat(const char *path, sf_stat *st, int *missing, sf_err *err)
{
    wchar_t *w = utf8_to_wide(path, err);
    HANDLE fh;
    int rc;
    *missing = 0;
    if (w == NULL)
        return -1;
    /* No access rights needed to read attributes; BACKUP_SEMANTICS lets directories open. */
    fh = CreateFileW(w, 0, SF_SHARE, NULL, OPEN_EXISTING, FILE_FLAG_BACKUP_SEMANTICS, NULL);
    free(w);
    if (fh == INVALID_HANDLE_VALUE) {
        DWORD e = GetLastError();
        if (is_missing_win(e)) {
            *missing = 1;
            return 0;
        }
        return fail_win(err, e);
    }
    rc = h_stat((sf_handle)(intptr_t)fh, st, err);
    CloseHandle(fh);
    return rc;
}

static void h_close(sf_handle h)
{
    if (h != SF_NO_HANDLE)
        CloseHandle((HANDLE)(intptr_t)h);
}

/* Reads up to len bytes at off; *got < len only at end of file. */
static int h_pread(sf_handle h, uint8_t *buf, int64_t len, int64_t off, int64_t *got, sf_err *err)
{
    HANDLE fh = (HANDLE)(intptr_t)h;
    int64_t done = 0;
    while (done < len) {
        OVERLAPPED ov;
        DWORD want = (DWORD)((len - done) > 0x40000000 ? 0x40000000 : (len - done));
        DWORD n = 0;
        uint64_t pos = (uint64_t)(off + done);
        memset(&ov, 0, sizeof(ov));
        ov.Offset = (DWORD)(pos & 0xffffffffu);
        ov.OffsetHigh = (DWORD)(pos >> 32);
        if (!ReadFile(fh, buf + done, want, &n, &ov)) {
            DWORD e = GetLastError();
            if (e == ERROR_HANDLE_EOF)
                break;
            return fail_win(err, e);
        }
        if (n == 0)
            break;
        done += n;
    }
    *got = done;
    return 0;
}

#else /* POSIX */

#ifndef O_CLOEXEC
#  define O_CLOEXEC 0
#endif
#ifndef O_NOCTTY
#  define O_NOCTTY 0
#endif

static void fill_stat(const struct stat *s, sf_stat *st)
{
    st->dev = (uint64_t)s->st_dev;
    st->ino = (uint64_t)s->st_ino;
    st->size = (int64_t)s->st_size;
#if defined(__APPLE__)
    st->mtime_ns = (int64_t)s->st_mtimespec.tv_sec * 1000000000LL + s->st_mtimespec.tv_nsec;
    st->ctime_ns = (int64_t)s->st_ctimespec.tv_sec * 1000000000LL + s->st_ctimespec.tv_nsec;
#else
    st->mtime_ns = (int64_t)s->st_mtim.tv_sec * 1000000000LL + s->st_mtim.tv_nsec;
    st->ctime_ns = (int64_t)s->st_ctim.tv_sec * 1000000000LL + s->st_ctim.tv_nsec;
#endif
    st->nlink = (int64_t)s->st_nlink;
    st->is_reg = S_ISREG(s->st_mode) ? 1 : 0;
    st->is_dir = S_ISDIR(s->st_mode) ? 1 : 0;
}

static int h_stat(sf_handle h, sf_stat *st, sf_err *err)
{
    struct stat s;
    if (fstat((int)h, &s) != 0)
        return fail_errno(err, errno);
    fill_stat(&s, st);
    return 0;
}

static int h_open(const char *path, sf_handle *out, int *missing, sf_err *err)
{
    int fd;
    *missing = 0;
    do {
        /* O_NONBLOCK: opening a FIFO must not hang; regular files ignore it. */
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR) {
            *missing = 1;
            return 0;
        }
        return fail_errno(err, errno);
    }
    *out = (sf_handle)fd;
    return 0;
}

static int path_stat(const char *path, sf_stat *st, int *missing, sf_err *err)
{
    struct stat s;
    *missing = 0;
    if (stat(path, &s) != 0) {
        if (errno == ENOENT || errno == ENOTDIR) {
            *missing = 1;
            return 0;
        }
        return fail_errno(err, errno);
    }
    fill_stat(&s, st);
    return 0;
}

static void h_close(sf_handle h)
{
    if (h != SF_NO_HANDLE)
        (void)close((int)h);
}

static int h_pread(sf_handle h, uint8_t *buf, int64_t len, int64_t off, int64_t *got, sf_err *err)
{
    int64_t done = 0;
    while (done < len) {
        size_t want = (size_t)((len - done) > 0x40000000 ? 0x40000000 : (len - done));
        ssize_t n = pread((int)h, buf + done, want, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail_errno(err, errno);
        }
        if (n == 0)
            break;
        done += n;
    }
    *got = done;
    return 0;
}

#endif

/* ------------------------------------------------------------------------------------ */
/* Shared building blocks.                                                               */
/* ------------------------------------------------------------------------------------ */

static int check_regular(const sf_stat *st, sf_err *err)
{
    if (st->is_dir)
        return fail_errno(err, EISDIR);
    if (!st->is_reg)
        return fail_errno(err, EINVAL);
    return 0;
}

/* Opens path; *missing set (and no handle) when it does not exist. */
static int open_regular(const char *path, sf_handle *h, sf_stat *st, int *missing, sf_err *err)
{
    *h = SF_NO_HANDLE;
    if (h_open(path, h, missing, err) != 0 || *missing)
        return *missing ? 0 : -1;
    if (h_stat(*h, st, err) != 0 || check_regular(st, err) != 0) {
        h_close(*h);
        *h = SF_NO_HANDLE;
        return -1;
    }
    return 0;
}

static void fp_from(sf_fp *fp, const sf_stat *st, int64_t tail_len, uint64_t tail_hash)
{
    fp->exists = 1;
    fp->dev = st->dev;
    fp->ino = st->ino;
    fp->size = st->size;
    fp->mtime_ns = st->mtime_ns;
    fp->ctime_ns = st->ctime_ns;
    fp->tail_len = tail_len;
    fp->tail_hash = tail_hash;
}

static void fp_missing(sf_fp *fp)
{
    memset(fp, 0, sizeof(*fp));
}

/* A scratch buffer that lives on the stack for small sizes. */
typedef struct sf_buf {
    uint8_t *ptr;
    int64_t cap;
    int heap;
} sf_buf;

static int buf_reserve(sf_buf *b, uint8_t *stack, int64_t stack_cap, int64_t need, sf_err *err)
{
    if (need <= b->cap)
        return 0;
    if (b->heap)
        free(b->ptr);
    b->heap = 0;
    b->cap = 0;
    if (need <= stack_cap) {
        b->ptr = stack;
        b->cap = stack_cap;
        return 0;
    }
    b->ptr = (uint8_t *)malloc((size_t)need);
    if (b->ptr == NULL)
        return fail_nomem(err);
    b->heap = 1;
    b->cap = need;
    return 0;
}

static void buf_release(sf_buf *b)
{
    if (b->heap)
        free(b->ptr);
    b->ptr = NULL;
    b->cap = 0;
    b->heap = 0;
}

/*
 * Stable tail fingerprint of an open file. `pre` is the state the caller already has
 * (fstat of h, or a path stat naming the same file); it is refreshed on every retry.
 */
static int stable_tail(sf_handle h, sf_stat *pre, int64_t window, sf_fp *out, sf_err *err)
{
    uint8_t stack[SF_STACK_WINDOW];
    sf_buf b = {NULL, 0, 0};
    int tries;
    for (tries = 0; tries < SF_STABLE_TRIES; tries++) {
        sf_stat post;
        int64_t tl = pre->size < window ? pre->size : window;
        backoff(tries);
        int64_t got = 0;
        if (buf_reserve(&b, stack, sizeof(stack), tl, err) != 0)
            return -1;
        if (tl > 0 && h_pread(h, b.ptr, tl, pre->size - tl, &got, err) != 0) {
            buf_release(&b);
            return -1;
        }
        if (h_stat(h, &post, err) != 0) {
            buf_release(&b);
            return -1;
        }
        if (got == tl && same_state(pre, &post)) {
            fp_from(out, pre, tl, XXH3_64bits(b.ptr, (size_t)tl));
            buf_release(&b);
            return 0;
        }
        *pre = post;
    }
    buf_release(&b);
    err->code = SF_EUNSTABLE;
    return -1;
}

/* ------------------------------------------------------------------------------------ */
/* Public functions.                                                                      */
/* ------------------------------------------------------------------------------------ */

const char *sf_version(void)
{
    return SF_PACKAGE_VERSION;
}

uint64_t sf_xxh3_64(const uint8_t *buf, size_t len)
{
    return XXH3_64bits(buf, len);
}

void sf_xxh3_128(const uint8_t *buf, size_t len, uint64_t *hi, uint64_t *lo)
{
    XXH128_hash_t h = XXH3_128bits(buf, len);
    *hi = h.high64;
    *lo = h.low64;
}

void sf_free(void *ptr)
{
    free(ptr);
}

static int window_ok(int64_t window, sf_err *err)
{
    if (window < 0 || window > SF_WINDOW_MAX)
        return fail_value(err, window);
    return 0;
}

int sf_fingerprint(const char *path, int64_t window, sf_fp *out, sf_err *err)
{
    sf_handle h;
    sf_stat st;
    int missing;
    int rc;
    if (window_ok(window, err) != 0)
        return -1;
    if (open_regular(path, &h, &st, &missing, err) != 0)
        return -1;
    if (missing) {
        fp_missing(out);
        return 0;
    }
    rc = stable_tail(h, &st, window, out, err);
    h_close(h);
    return rc;
}

int sf_fingerprint_many(const char *paths, int64_t count, int64_t window, sf_fp *out, sf_err *err)
{
    const char *p = paths;
    int64_t i;
    for (i = 0; i < count; i++) {
        if (sf_fingerprint(p, window, &out[i], err) != 0) {
            err->where = (int32_t)(i > INT32_MAX ? INT32_MAX : i);
            return -1;
        }
        p += strlen(p) + 1;
    }
    return 0;
}

void sf_probe_init(sf_probe *probe)
{
    memset(probe, 0, sizeof(*probe));
    probe->handle = SF_NO_HANDLE;
    probe->racy_ns = SF_RACY_NS;
}

void sf_probe_close(sf_probe *probe)
{
    h_close(probe->handle);
    probe->handle = SF_NO_HANDLE;
    probe->has_last = 0;
}

/*
 * Points the probe at the file the path names now: keeps the held handle when the path
 * still names it, re-opens otherwise. *missing when the path names nothing.
 */
static int probe_attach(sf_probe *probe, const char *path, sf_stat *st, int *missing, sf_err *err)
{
    sf_handle h;
    if (path_stat(path, st, missing, err) != 0)
        return -1;
    if (*missing) {
        sf_probe_close(probe);
        return 0;
    }
    if (check_regular(st, err) != 0)
        return -1;
    if (probe->handle != SF_NO_HANDLE && probe->dev == st->dev && probe->ino == st->ino)
        return 0;
    sf_probe_close(probe);
    if (open_regular(path, &h, st, missing, err) != 0 || *missing)
        return *missing ? 0 : -1;
    probe->handle = h;
    probe->dev = st->dev;
    probe->ino = st->ino;
    return 0;
}

/*
 * Git's racy-clean rule: a fingerprint read at time T of a file whose mtime and ctime were
 * both older than T - racy_ns (at least one timestamp granule of any filesystem we meet:
 * 2 s covers FAT, ext3, HFS+ and NFS servers) cannot describe content that changed while
 * the stat stayed equal, because a later write stamps a time past T - racy_ns.
 */
static int racy_clean(const sf_probe *probe, const sf_stat *st, int64_t window)
{
    const sf_fp *last = &probe->last;
    int64_t horizon;
    if (!probe->has_last || !last->exists || probe->racy_ns < 0 ||
        probe->read_at_ns == INT64_MIN || probe->read_at_ns < INT64_MIN + probe->racy_ns)
        return 0;
    horizon = probe->read_at_ns - probe->racy_ns;
    return st->dev == last->dev && st->ino == last->ino && st->size == last->size &&
           st->mtime_ns == last->mtime_ns && st->ctime_ns == last->ctime_ns &&
           last->tail_len == min64(st->size, window) && last->mtime_ns < horizon &&
           last->ctime_ns < horizon;
}

int sf_probe_fingerprint(sf_probe *probe, const char *path, int64_t window, sf_fp *out,
                         int32_t *same_as_last, sf_err *err)
{
    sf_stat st;
    int missing;
    int64_t started = realtime_ns();
    *same_as_last = 0;
    if (window_ok(window, err) != 0)
        return -1;
    if (probe_attach(probe, path, &st, &missing, err) != 0)
        return -1;
    if (!missing && racy_clean(probe, &st, window)) {
        /* Same stat as a read that happened well after the file last changed: any write
           since would have moved mtime or ctime, so the bytes are the ones we hashed. */
        *out = probe->last;
        *same_as_last = 1;
        return 0;
    }
    if (missing) {
        fp_missing(out);
    } else if (stable_tail(probe->handle, &st, window, out, err) != 0) {
        return -1;
    }
    probe->read_at_ns = started;
    if (probe->has_last && memcmp(&probe->last, out, sizeof(*out)) == 0)
        *same_as_last = 1;
    probe->last = *out;
    probe->has_last = 1;
    return 0;
}

/* The handle check_append and read_range work on: the probe's, or a one-shot open. */
typedef struct sf_target {
    sf_handle h;
    int owned;
} sf_target;

static int target_open(sf_probe *probe, const char *path, sf_target *t, sf_stat *st,
                       int *missing, sf_err *err)
{
    t->h = SF_NO_HANDLE;
    t->owned = 0;
    if (probe != NULL) {
        if (probe_attach(probe, path, st, missing, err) != 0 || *missing)
            return *missing ? 0 : -1;
        t->h = probe->handle;
        return 0;
    }
    if (open_regular(path, &t->h, st, missing, err) != 0)
        return -1;
    t->owned = !*missing;
    return 0;
}

static void target_close(sf_target *t)
{
    if (t->owned)
        h_close(t->h);
    t->h = SF_NO_HANDLE;
    t->owned = 0;
}

/*
 * One classification attempt against the state `st`. Returns 1 when the reads saw the
 * file stop short (it shrank under us), so the caller re-stats and tries again.
 */
static int classify_once(sf_handle h, const sf_stat *st, const sf_fp *before, int64_t window,
                         int64_t max_suffix, sf_change *out, uint8_t **scratch, sf_err *err)
{
    int64_t size = st->size;
    int64_t aw = min64(size, window);
    int64_t lo, span, got;
    uint8_t *buf;
    uint64_t after_hash;

    out->has_suffix = 0;
    out->suffix_len = 0;

    if (!before->exists) {
        /* CREATED: whole content when small enough, else just the new tail window. */
        int whole = size <= max_suffix;
        lo = whole ? 0 : size - aw;
        out->kind = SF_CREATED;
    } else if (st->dev != before->dev || st->ino != before->ino) {
        lo = size - aw;
        out->kind = SF_REPLACED;
    } else if (size < before->size) {
        lo = size - aw;
        out->kind = SF_TRUNCATED;
    } else if (size == before->size) {
        lo = size - (aw > before->tail_len ? aw : before->tail_len);
        out->kind = SF_UNCHANGED;
    } else {
        int64_t old_lo = before->size - before->tail_len;
        int64_t suffix = size - before->size;
        if (suffix <= max_suffix) {
            /* One read covers the old window, the suffix and the new tail window. */
            lo = min64(old_lo, size - aw);
            out->kind = SF_APPENDED; /* confirmed or refuted from the bytes below */
        } else {
            /* Suffix too large to return: read the old window and the new tail apart. */
            int64_t old_got = 0;
            uint8_t *old = (uint8_t *)malloc((size_t)(before->tail_len > 0 ? before->tail_len : 1));
            if (old == NULL)
                return fail_nomem(err);
            if (h_pread(h, old, before->tail_len, old_lo, &old_got, err) != 0) {
                free(old);
                return -1;
            }
            if (old_got != before->tail_len) {
                free(old);
                return 1;
            }
            out->kind = XXH3_64bits(old, (size_t)before->tail_len) == before->tail_hash
                            ? SF_APPENDED : SF_REWRITTEN;
            free(old);
            lo = size - aw;
        }
    }

    span = size - lo;
    buf = (uint8_t *)malloc((size_t)(span > 0 ? span : 1));
    if (buf == NULL)
        return fail_nomem(err);
    if (h_pread(h, buf, span, lo, &got, err) != 0) {
        free(buf);
        return -1;
    }
    if (got != span) {
        free(buf);
        return 1;
    }
    after_hash = XXH3_64bits(buf + (span - aw), (size_t)aw);
    fp_from(&out->after, st, aw, after_hash);

    if (before->exists && st->dev == before->dev && st->ino == before->ino) {
        if (size == before->size) {
            if (st->mtime_ns != before->mtime_ns || st->ctime_ns != before->ctime_ns) {
                const uint8_t *old = buf + (span - before->tail_len);
                out->kind = XXH3_64bits(old, (size_t)before->tail_len) == before->tail_hash
                                ? SF_TOUCHED : SF_REWRITTEN;
            }
        } else if (size > before->size && size - before->size <= max_suffix) {
            const uint8_t *old = buf + (before->size - before->tail_len - lo);
            out->kind = XXH3_64bits(old, (size_t)before->tail_len) == before->tail_hash
                            ? SF_APPENDED : SF_REWRITTEN;
            if (out->kind == SF_APPENDED) {
                out->has_suffix = 1;
                out->suffix_len = size - before->size;
                memmove(buf, buf + (before->size - lo), (size_t)out->suffix_len);
                *scratch = buf;
                return 0;
            }
        }
    } else if (!before->exists && size <= max_suffix) {
        out->has_suffix = 1;
        out->suffix_len = size;
        *scratch = buf;
        return 0;
    }
    free(buf);
    return 0;
}

int sf_check_append(sf_probe *probe, const char *path, const sf_fp *before, int64_t window,
                    int64_t max_suffix, sf_change *out, sf_err *err)
{
    sf_target t;
    sf_stat st;
    int missing, tries;

    memset(out, 0, sizeof(*out));
    if (window_ok(window, err) != 0)
        return -1;
    if (max_suffix < 0)
        return fail_value(err, max_suffix);
    if (before->exists &&
        (before->size < 0 || before->tail_len < 0 || before->tail_len > before->size ||
         before->tail_len > SF_WINDOW_MAX))
        return fail_value(err, before->tail_len);

    if (target_open(probe, path, &t, &st, &missing, err) != 0)
        return -1;
    if (missing) {
        out->kind = before->exists ? SF_DELETED : SF_UNCHANGED;
        fp_missing(&out->after);
        return 0;
    }
    for (tries = 0; tries < SF_STABLE_TRIES; tries++) {
        uint8_t *scratch = NULL;
        sf_stat post;
        int rc;
        backoff(tries);
        rc = classify_once(t.h, &st, before, window, max_suffix, out, &scratch, err);
        if (rc < 0) {
            target_close(&t);
            return -1;
        }
        if (rc == 0) {
            if (h_stat(t.h, &post, err) != 0) {
                free(scratch);
                target_close(&t);
                return -1;
            }
            if (same_state(&st, &post)) {
                out->suffix = scratch;
                target_close(&t);
                return 0;
            }
            st = post;
        } else if (h_stat(t.h, &st, err) != 0) {
            target_close(&t);
            return -1;
        }
        free(scratch);
        out->has_suffix = 0;
        out->suffix_len = 0;
    }
    target_close(&t);
    err->code = SF_EUNSTABLE;
    return -1;
}

int sf_read_range(sf_probe *probe, const char *path, int64_t offset, int64_t length,
                  uint8_t *buf, sf_err *err)
{
    sf_target t;
    sf_stat st;
    int missing;
    int64_t got = 0;
    if (offset < 0 || length < 0)
        return fail_value(err, offset < 0 ? offset : length);
    if (target_open(probe, path, &t, &st, &missing, err) != 0)
        return -1;
    if (missing)
        return fail_errno(err, ENOENT);
    if (offset > st.size || length > st.size - offset) {
        target_close(&t);
        err->code = SF_ESHORT;
        err->detail = st.size;
        return -1;
    }
    if (h_pread(t.h, buf, length, offset, &got, err) != 0) {
        target_close(&t);
        return -1;
    }
    target_close(&t);
    if (got != length) {
        err->code = SF_ESHORT;
        err->detail = offset + got;
        return -1;
    }
    return 0;
}

void *sf_digest_new(void)
{
    XXH3_state_t *s = XXH3_createState();
    if (s != NULL && XXH3_128bits_reset(s) != XXH_OK) {
        XXH3_freeState(s);
        return NULL;
    }
    return s;
}

void sf_digest_free(void *state)
{
    if (state != NULL)
        XXH3_freeState((XXH3_state_t *)state);
}

void *sf_digest_copy(const void *state)
{
    XXH3_state_t *s = XXH3_createState();
    if (s != NULL)
        XXH3_copyState(s, (const XXH3_state_t *)state);
    return s;
}

int sf_digest_update(void *state, const uint8_t *buf, size_t len)
{
    return XXH3_128bits_update((XXH3_state_t *)state, buf, len) == XXH_OK ? 0 : -1;
}

void sf_digest_value(const void *state, uint64_t *hi, uint64_t *lo)
{
    XXH128_hash_t h = XXH3_128bits_digest((const XXH3_state_t *)state);
    *hi = h.high64;
    *lo = h.low64;
}

int sf_digest_update_file(void *state, const char *path, int64_t size, sf_err *err)
{
    sf_handle h;
    sf_stat st;
    int missing;
    int64_t off = 0;
    uint8_t *chunk;
    if (size < -1)
        return fail_value(err, size);
    if (open_regular(path, &h, &st, &missing, err) != 0)
        return -1;
    if (missing)
        return fail_errno(err, ENOENT);
    if (size == -1)
        size = st.size;
    if (size > st.size) {
        h_close(h);
        err->code = SF_ESHORT;
        err->detail = st.size;
        return -1;
    }
    chunk = (uint8_t *)malloc(SF_DIGEST_CHUNK);
    if (chunk == NULL) {
        h_close(h);
        return fail_nomem(err);
    }
    while (off < size) {
        int64_t want = min64(SF_DIGEST_CHUNK, size - off);
        int64_t got = 0;
        if (h_pread(h, chunk, want, off, &got, err) != 0)
            break;
        if (got != want) {
            err->code = SF_ESHORT;
            err->detail = off + got;
            break;
        }
        if (XXH3_128bits_update((XXH3_state_t *)state, chunk, (size_t)got) != XXH_OK) {
            err->code = SF_ENOMEM;
            break;
        }
        off += got;
    }
    free(chunk);
    h_close(h);
    return off == size ? 0 : -1;
}

int sf_content_digest(const char *path, int64_t size, uint64_t *hi, uint64_t *lo, sf_err *err)
{
    void *s = sf_digest_new();
    int rc;
    if (s == NULL)
        return fail_nomem(err);
    rc = sf_digest_update_file(s, path, size, err);
    if (rc == 0)
        sf_digest_value(s, hi, lo);
    sf_digest_free(s);
    return rc;
}
