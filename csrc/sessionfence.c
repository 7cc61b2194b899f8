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
/* Windows 8.1 (what CPython 3.10+ needs): FILE_ID_INFO, GetSystemTimePreciseAsFileTime. */
#  if !defined(_WIN32_WINNT) || _WIN32_WINNT < 0x0603
#    undef _WIN32_WINNT
#    define _WIN32_WINNT 0x0603
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

/*
 * Every failure sets every field of *err (callers reuse one sf_err across calls, so a
 * field left over from an earlier error must never leak into the next report).
 */
static int fail_with(sf_err *err, int32_t code, int32_t sys_errno, int32_t winerror,
                     int64_t detail)
{
    err->code = code;
    err->sys_errno = sys_errno;
    err->winerror = winerror;
    err->where = 0;
    err->detail = detail;
    return -1;
}

static int fail_value(sf_err *err, int64_t detail)
{
    return fail_with(err, SF_EVALUE, 0, 0, detail);
}

static int fail_nomem(sf_err *err)
{
    return fail_with(err, SF_ENOMEM, ENOMEM, 0, 0);
}

static int fail_errno(sf_err *err, int e)
{
    return fail_with(err, SF_EOS, e, 0, 0);
}

static int fail_short(sf_err *err, int64_t detail)
{
    return fail_with(err, SF_ESHORT, 0, 0, detail);
}

static int fail_unstable(sf_err *err)
{
    return fail_with(err, SF_EUNSTABLE, 0, 0, 0);
}

/*
 * malloc for a byte count that arrives as int64_t: refuses what size_t cannot hold (32-bit
 * builds) instead of truncating it, and never asks for 0 bytes (malloc(0) may be NULL).
 */
static uint8_t *alloc_bytes(int64_t n)
{
    if (n < 0 || (uint64_t)n > (uint64_t)(PTRDIFF_MAX - 1))
        return NULL;
    return (uint8_t *)malloc(n > 0 ? (size_t)n : 1);
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

#if defined(_WIN32) || defined(SF_TESTING)
#  ifdef SF_TESTING
#    define SF_INTERNAL /* visible to csrc/tests/test_sessionfence.c */
#  else
#    define SF_INTERNAL static
#  endif

/*
 * Windows FILETIME (100 ns ticks since 1601) to ns since 1970, without signed overflow:
 * 0 means "not recorded" (FAT has no ChangeTime) and stays 0; values whose ns count does
 * not fit in int64_t (before 1677 or after 2262) saturate. CPython computes the same
 * numbers for every time that fits (and sessionfence/_winstat.py mirrors this function).
 */
SF_INTERNAL int64_t sf_filetime_to_ns(int64_t ticks)
{
    const int64_t epoch = 116444736000000000LL; /* 1970-01-01 in FILETIME ticks */
    int64_t rel;
    if (ticks == 0)
        return 0;
    if (ticks < INT64_MIN + epoch)
        return INT64_MIN;
    rel = ticks - epoch;
    if (rel > INT64_MAX / 100)
        return INT64_MAX;
    if (rel < INT64_MIN / 100)
        return INT64_MIN;
    return rel * 100;
}

/*
 * Paths arrive as os.fsencode() makes them on Windows: UTF-8 with "surrogatepass", so a
 * lone surrogate (legal in an NTFS name) comes as a 3-byte sequence ED A0..BF xx and must
 * pass through as that UTF-16 unit. MultiByteToWideChar would replace it with U+FFFD (or
 * any invalid byte) and open a different file, so we decode ourselves. Writes the UTF-16
 * units and a terminating 0 to out (when out is not NULL) and returns how many units that
 * is, terminator included; returns 0 for bytes Python would never produce.
 */
SF_INTERNAL size_t sf_utf8_to_utf16(const char *path, uint16_t *out)
{
    const unsigned char *s = (const unsigned char *)path;
    size_t n = 0;
    while (*s != 0) {
        uint32_t cp;
        int extra, i;
        unsigned char c = *s++;
        if (c < 0x80) {
            cp = c;
            extra = 0;
        } else if (c >= 0xC2 && c <= 0xDF) {
            cp = c & 0x1Fu;
            extra = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            cp = c & 0x0Fu;
            extra = 2;
        } else if (c >= 0xF0 && c <= 0xF4) {
            cp = c & 0x07u;
            extra = 3;
        } else {
            return 0; /* continuation byte without a lead, or an invalid lead */
        }
        for (i = 0; i < extra; i++) {
            if ((s[i] & 0xC0u) != 0x80u)
                return 0; /* truncated sequence (this also stops at the terminating 0) */
            cp = (cp << 6) | (s[i] & 0x3Fu);
        }
        s += extra;
        if ((extra == 2 && cp < 0x800) || (extra == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
            return 0; /* overlong or out of range */
        if (cp >= 0x10000) {
            if (out != NULL) {
                out[n] = (uint16_t)(0xD800u + ((cp - 0x10000u) >> 10));
                out[n + 1] = (uint16_t)(0xDC00u + ((cp - 0x10000u) & 0x3FFu));
            }
            n += 2;
        } else {
            if (out != NULL)
                out[n] = (uint16_t)cp; /* surrogates included: "surrogatepass" */
            n += 1;
        }
    }
    if (out != NULL)
        out[n] = 0;
    return n + 1;
}
#endif

/* Wall-clock time in ns since 1970: file timestamps come from the same clock. */
static int64_t realtime_ns(void)
{
#ifdef _WIN32
    FILETIME ft;
    ULARGE_INTEGER t;
    GetSystemTimePreciseAsFileTime(&ft);
    t.LowPart = ft.dwLowDateTime;
    t.HighPart = ft.dwHighDateTime;
    return sf_filetime_to_ns((int64_t)t.QuadPart);
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
    case ERROR_NO_UNICODE_TRANSLATION:
        return EINVAL;
    case ERROR_CANT_RESOLVE_FILENAME:
        return ELOOP;
    default:
        return EIO;
    }
}

static int fail_win(sf_err *err, DWORD w)
{
    return fail_with(err, SF_EOS, win_to_errno(w), (int32_t)w, 0);
}

/* wchar_t is UTF-16 on Windows: sf_utf8_to_utf16 writes straight into a wchar_t buffer. */
typedef char sf_wchar_is_16_bits[sizeof(wchar_t) == sizeof(uint16_t) ? 1 : -1];

static wchar_t *utf8_to_wide(const char *path, sf_err *err)
{
    size_t n = sf_utf8_to_utf16(path, NULL);
    wchar_t *w;
    if (n == 0) {
        fail_win(err, ERROR_NO_UNICODE_TRANSLATION);
        return NULL;
    }
    w = (wchar_t *)malloc(n * sizeof(wchar_t));
    if (w == NULL) {
        fail_nomem(err);
        return NULL;
    }
    (void)sf_utf8_to_utf16(path, (uint16_t *)w);
    return w;
}

static int is_missing_win(DWORD w)
{
    return w == ERROR_FILE_NOT_FOUND || w == ERROR_PATH_NOT_FOUND || w == ERROR_INVALID_DRIVE ||
           w == ERROR_BAD_NETPATH || w == ERROR_BAD_NET_NAME || w == ERROR_DIRECTORY;
}

/*
 * A file deleted while someone holds it open stays "delete pending" under its name until
 * the last handle closes (Windows before POSIX delete semantics, other file systems, wine).
 * Such a file is gone for our purposes: h_stat reports nlink 0 for it, and opening it fails
 * with ERROR_ACCESS_DENIED, which only the NTSTATUS (STATUS_DELETE_PENDING) tells apart
 * from a real permission problem.
 */
#define SF_STATUS_DELETE_PENDING 0xC0000056UL

static int delete_pending_error(DWORD e)
{
    typedef LONG(WINAPI * rtl_status_fn)(void);
    HMODULE ntdll;
    rtl_status_fn get_status;
    if (e != ERROR_ACCESS_DENIED)
        return 0;
    ntdll = GetModuleHandleW(L"ntdll.dll");
    if (ntdll == NULL)
        return 0;
    /* Through void (*)(void): the generic function pointer type (-Wcast-function-type). */
    get_status = (rtl_status_fn)(void (*)(void))GetProcAddress(ntdll, "RtlGetLastNtStatus");
    return get_status != NULL && (ULONG)get_status() == SF_STATUS_DELETE_PENDING;
}

static int h_stat(sf_handle h, sf_stat *st, sf_err *err)
{
    FILE_STANDARD_INFO std_info;
    FILE_BASIC_INFO basic;
    FILE_ID_INFO id;
    HANDLE fh = (HANDLE)(intptr_t)h;
    uint64_t low = 0;
    if (!GetFileInformationByHandleEx(fh, FileBasicInfo, &basic, sizeof(basic)))
        return fail_win(err, GetLastError());
    if (!GetFileInformationByHandleEx(fh, FileStandardInfo, &std_info, sizeof(std_info)))
        return fail_win(err, GetLastError());
    /*
     * dev and ino the way CPython >= 3.12 fills os.stat() on Windows: the 64-bit volume
     * serial and the low 64 bits of the 128-bit file id of FILE_ID_INFO (ReFS ids can be
     * wider; NTFS ids fit and carry a sequence number, so a reused MFT record gets a new
     * ino), else (FAT, old servers) the 32-bit serial and 64-bit index of the older call.
     */
    if (GetFileInformationByHandleEx(fh, FileIdInfo, &id, sizeof(id)))
        memcpy(&low, id.FileId.Identifier, sizeof(low)); /* little-endian: the low half */
    if (low != 0) {
        st->dev = (uint64_t)id.VolumeSerialNumber;
        st->ino = low;
    } else {
        BY_HANDLE_FILE_INFORMATION info;
        if (!GetFileInformationByHandle(fh, &info))
            return fail_win(err, GetLastError());
        st->dev = (uint64_t)info.dwVolumeSerialNumber;
        st->ino = ((uint64_t)info.nFileIndexHigh << 32) | (uint64_t)info.nFileIndexLow;
    }
    st->size = (int64_t)std_info.EndOfFile.QuadPart;
    st->mtime_ns = sf_filetime_to_ns((int64_t)basic.LastWriteTime.QuadPart);
    /* ChangeTime is NTFS's status-change time: the analogue of st_ctime, not creation time. */
    st->ctime_ns = sf_filetime_to_ns((int64_t)basic.ChangeTime.QuadPart);
    st->nlink = std_info.DeletePending ? 0 : (int64_t)std_info.NumberOfLinks;
    st->is_dir = std_info.Directory || (basic.FileAttributes & FILE_ATTRIBUTE_DIRECTORY) != 0;
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
        if (is_missing_win(e) || delete_pending_error(e)) {
            free(w);
            *missing = 1;
            return 0;
        }
        attrs = GetFileAttributesW(w);
        free(w);
        if (e == ERROR_ACCESS_DENIED && attrs != INVALID_FILE_ATTRIBUTES &&
            (attrs & FILE_ATTRIBUTE_DIRECTORY))
            return fail_with(err, SF_EOS, EISDIR, (int32_t)e, 0);
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
    /* Attribute access only (what os.stat asks for: FileBasicInfo needs it, and it is granted
       where reading is not); BACKUP_SEMANTICS lets directories open, so they report EISDIR. */
    fh = CreateFileW(w, FILE_READ_ATTRIBUTES, SF_SHARE, NULL, OPEN_EXISTING,
                     FILE_FLAG_BACKUP_SEMANTICS, NULL);
    free(w);
    if (fh == INVALID_HANDLE_VALUE) {
        DWORD e = GetLastError();
        if (is_missing_win(e) || delete_pending_error(e)) {
            *missing = 1;
            return 0;
        }
        return fail_win(err, e);
    }
    rc = h_stat((sf_handle)(intptr_t)fh, st, err);
    CloseHandle(fh);
    if (rc == 0 && st->nlink == 0)
        *missing = 1; /* delete pending: gone once its holders close it */
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
    int flags = O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
    *missing = 0;
#ifdef O_NOATIME
    /* Our reads leave the access time alone: relatime would otherwise dirty the inode on
       the first read after every write. Only the file's owner may ask (EPERM else). */
    flags |= O_NOATIME;
#endif
    for (;;) {
        /* O_NONBLOCK: opening a FIFO must not hang; regular files ignore it. */
        fd = open(path, flags);
        if (fd >= 0 || errno != EINTR) {
#ifdef O_NOATIME
            if (fd < 0 && errno == EPERM && (flags & O_NOATIME)) {
                flags &= ~O_NOATIME;
                continue;
            }
#endif
            break;
        }
    }
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
#ifdef _WIN32
    if (st->nlink == 0) {
        /* Delete pending (see delete_pending_error): gone, and holding it delays that. */
        h_close(*h);
        *h = SF_NO_HANDLE;
        *missing = 1;
    }
#endif
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
    b->ptr = alloc_bytes(need);
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
 * A probe's held handle can outlive its file's last name. The path stat and the read are
 * two steps: a file unlinked in between is read through the kept handle although the path
 * names nothing (or a new file) by then; and file systems that make inode numbers up (FUSE,
 * some network file systems) can give a new file the number of one still held open, so
 * equal dev/ino alone does not prove the handle reads the path's file. Such a handle's file
 * has no links left, which the fstat that ends every read shows: the reader returns
 * SF_STALE and the caller re-opens the path. (On local POSIX file systems an open file's
 * inode number is not reused; NTFS ids carry a sequence number; a delete-pending Windows
 * file reports nlink 0 from h_stat.)
 */
#define SF_STALE 1

/*
 * Stable tail fingerprint of an open file. `pre` is the state the caller already has
 * (fstat of h, or a path stat naming the same file); it is refreshed on every retry.
 * With `linked`, a file that lost its last link gives SF_STALE (see above).
 */
static int stable_tail(sf_handle h, sf_stat *pre, int64_t window, int linked, sf_fp *out,
                       sf_err *err)
{
    uint8_t stack[SF_STACK_WINDOW];
    sf_buf b = {NULL, 0, 0};
    int tries;
    for (tries = 0; tries < SF_STABLE_TRIES; tries++) {
        sf_stat post;
        int64_t tl = min64(pre->size, window);
        int64_t got = 0;
        backoff(tries);
        if (buf_reserve(&b, stack, (int64_t)sizeof(stack), tl, err) != 0)
            return -1;
        if (tl > 0 && h_pread(h, b.ptr, tl, pre->size - tl, &got, err) != 0) {
            buf_release(&b);
            return -1;
        }
        if (h_stat(h, &post, err) != 0) {
            buf_release(&b);
            return -1;
        }
        if (linked && post.nlink == 0) {
            buf_release(&b);
            return SF_STALE;
        }
        if (got == tl && same_state(pre, &post)) {
            fp_from(out, pre, tl, XXH3_64bits(b.ptr, (size_t)tl));
            buf_release(&b);
            return 0;
        }
        *pre = post;
    }
    buf_release(&b);
    return fail_unstable(err);
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

int64_t sf_utf8_invalid_at(const uint8_t *buf, size_t len)
{
    size_t i = 0;
    if (buf == NULL)
        return len ? 0 : -1;
    while (i < len) {
        /* ASCII runs 8 bytes at a time (memcpy: no unaligned access) */
        while (len - i >= 8) {
            uint64_t w;
            memcpy(&w, buf + i, 8);
            if (w & UINT64_C(0x8080808080808080))
                break;
            i += 8;
        }
        if (i >= len)
            break;
        uint8_t c = buf[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        uint8_t lo = 0x80, hi = 0xBF; /* the range of the second byte */
        if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        } else if (c == 0xE0) {
            need = 2;
            lo = 0xA0; /* no overlong 3-byte forms */
        } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
            need = 2;
        } else if (c == 0xED) {
            need = 2;
            hi = 0x9F; /* no surrogates */
        } else if (c == 0xF0) {
            need = 3;
            lo = 0x90; /* no overlong 4-byte forms */
        } else if (c >= 0xF1 && c <= 0xF3) {
            need = 3;
        } else if (c == 0xF4) {
            need = 3;
            hi = 0x8F; /* nothing above U+10FFFF */
        } else {
            return (int64_t)i; /* 0x80-0xC1, 0xF5-0xFF never lead */
        }
        if (len - i - 1 < need)
            return (int64_t)i;
        if (buf[i + 1] < lo || buf[i + 1] > hi)
            return (int64_t)i;
        for (size_t k = 2; k <= need; k++) {
            if ((buf[i + k] & 0xC0) != 0x80)
                return (int64_t)i;
        }
        i += need + 1;
    }
    return -1;
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
    rc = stable_tail(h, &st, window, 0, out, err);
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

/* Lets go of the held file but keeps `last` (a missing file polls as same_as_last). */
static void probe_drop(sf_probe *probe)
{
    h_close(probe->handle);
    probe->handle = SF_NO_HANDLE;
    probe->dev = 0;
    probe->ino = 0;
}

void sf_probe_close(sf_probe *probe)
{
    probe_drop(probe);
    probe->has_last = 0;
}

/*
 * Points the probe at the file the path names now: keeps the held handle when the path
 * still names it, re-opens otherwise (always, with `reopen`). *missing when the path
 * names nothing. *fresh tells whether the handle was opened by this call.
 */
static int probe_attach(sf_probe *probe, const char *path, int reopen, sf_stat *st,
                        int *missing, int *fresh, sf_err *err)
{
    sf_handle h;
    *fresh = 0;
    if (path_stat(path, st, missing, err) != 0)
        return -1;
    if (*missing) {
        probe_drop(probe);
        return 0;
    }
    if (check_regular(st, err) != 0)
        return -1;
    if (!reopen && probe->handle != SF_NO_HANDLE && probe->dev == st->dev &&
        probe->ino == st->ino)
        return 0;
    probe_drop(probe);
    if (open_regular(path, &h, st, missing, err) != 0 || *missing)
        return *missing ? 0 : -1;
    *fresh = 1;
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
static int racy_clean_fp(const sf_fp *last, int64_t read_at_ns, int64_t racy_ns,
                         const sf_stat *st, int64_t window)
{
    int64_t horizon;
    if (!last->exists || racy_ns < 0 || read_at_ns == INT64_MIN ||
        read_at_ns < INT64_MIN + racy_ns)
        return 0;
    horizon = read_at_ns - racy_ns;
    return st->dev == last->dev && st->ino == last->ino && st->size == last->size &&
           st->mtime_ns == last->mtime_ns && st->ctime_ns == last->ctime_ns &&
           last->tail_len == min64(st->size, window) && last->mtime_ns < horizon &&
           last->ctime_ns < horizon;
}

static int racy_clean(const sf_probe *probe, const sf_stat *st, int64_t window)
{
    return probe->has_last && racy_clean_fp(&probe->last, probe->read_at_ns, probe->racy_ns,
                                            st, window);
}

int sf_probe_fingerprint(sf_probe *probe, const char *path, int64_t window, sf_fp *out,
                         int32_t *same_as_last, sf_err *err)
{
    sf_stat st;
    int missing, fresh, reopen;
    int64_t started = realtime_ns();
    *same_as_last = 0;
    if (window_ok(window, err) != 0)
        return -1;
    for (reopen = 0;; reopen = 1) {
        int rc;
        if (probe_attach(probe, path, reopen, &st, &missing, &fresh, err) != 0)
            return -1;
        if (missing) {
            fp_missing(out);
            break;
        }
        if (!fresh && racy_clean(probe, &st, window)) {
            /* Same stat as a read that happened well after the file last changed: any
               write since would have moved mtime or ctime, so the bytes are the ones we
               hashed. (A re-created file that reuses the inode has a new ctime.) */
            *out = probe->last;
            *same_as_last = 1;
            return 0;
        }
        rc = stable_tail(probe->handle, &st, window, !fresh, out, err);
        if (rc < 0)
            return -1;
        if (rc == 0)
            break;
        /* SF_STALE: the held handle's file is gone; the next pass opens the path anew. */
    }
    probe->read_at_ns = started;
    if (probe->has_last && memcmp(&probe->last, out, sizeof(*out)) == 0)
        *same_as_last = 1;
    probe->last = *out;
    probe->has_last = 1;
    return 0;
}

/*
 * The handle check_append and read_range work on: the probe's, or a one-shot open.
 * `linked` is set when it is a probe's handle kept from an earlier call, which must be
 * checked for SF_STALE after reading.
 */
typedef struct sf_target {
    sf_handle h;
    int owned;
    int linked;
} sf_target;

static int target_open(sf_probe *probe, const char *path, int reopen, sf_target *t,
                       sf_stat *st, int *missing, sf_err *err)
{
    t->h = SF_NO_HANDLE;
    t->owned = 0;
    t->linked = 0;
    if (probe != NULL) {
        int fresh;
        if (probe_attach(probe, path, reopen, st, missing, &fresh, err) != 0 || *missing)
            return *missing ? 0 : -1;
        t->h = probe->handle;
        t->linked = !fresh;
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
            uint8_t *old = alloc_bytes(before->tail_len);
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
    buf = alloc_bytes(span);
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
            /* The old window is always re-hashed: on a filesystem whose timestamps are
             * coarser than the writes (jiffies, NFS, FAT) a same-size rewrite can leave
             * mtime and ctime equal, and only the bytes tell. */
            const uint8_t *old = buf + (span - before->tail_len);
            if (XXH3_64bits(old, (size_t)before->tail_len) != before->tail_hash)
                out->kind = SF_REWRITTEN;
            else if (st->mtime_ns != before->mtime_ns || st->ctime_ns != before->ctime_ns)
                out->kind = SF_TOUCHED;
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

/*
 * The classify / re-stat loop of sf_check_append on an open target: 0 with *out filled,
 * -1 on error, SF_STALE when a kept probe handle turned out to read an unlinked file.
 */
static int check_target(const sf_target *t, sf_stat *st, const sf_fp *before, int64_t window,
                        int64_t max_suffix, sf_change *out, sf_err *err)
{
    int tries;
    for (tries = 0; tries < SF_STABLE_TRIES; tries++) {
        uint8_t *scratch = NULL;
        sf_stat post;
        int rc;
        backoff(tries);
        rc = classify_once(t->h, st, before, window, max_suffix, out, &scratch, err);
        if (rc < 0)
            return -1;
        if (h_stat(t->h, &post, err) != 0) {
            free(scratch);
            return -1;
        }
        if (t->linked && post.nlink == 0) {
            free(scratch);
            return SF_STALE;
        }
        if (rc == 0 && same_state(st, &post)) {
            out->suffix = scratch;
            return 0;
        }
        /* The file moved under us (or a read stopped short): classify the new state. */
        *st = post;
        free(scratch);
        out->has_suffix = 0;
        out->suffix_len = 0;
    }
    return fail_unstable(err);
}

/*
 * sf_check_append, and with `racy` (a probe's poll against its own `last`) the racy-clean
 * shortcut of sf_probe_fingerprint: a kept handle whose stat equals `last`, read long
 * enough after the file's last change, is UNCHANGED without a read.
 */
static int check_append_impl(sf_probe *probe, const char *path, const sf_fp *before,
                             int64_t window, int64_t max_suffix, int racy, sf_change *out,
                             sf_err *err)
{
    int reopen;

    memset(out, 0, sizeof(*out));
    if (window_ok(window, err) != 0)
        return -1;
    if (max_suffix < 0)
        return fail_value(err, max_suffix);
    if (before->exists &&
        (before->size < 0 || before->tail_len < 0 || before->tail_len > before->size ||
         before->tail_len > SF_WINDOW_MAX))
        return fail_value(err, before->tail_len);

    for (reopen = 0;; reopen = 1) {
        sf_target t;
        sf_stat st;
        int missing, rc;
        if (target_open(probe, path, reopen, &t, &st, &missing, err) != 0)
            return -1;
        if (missing) {
            out->kind = before->exists ? SF_DELETED : SF_UNCHANGED;
            fp_missing(&out->after);
            return 0;
        }
        if (racy && t.linked && racy_clean(probe, &st, window)) {
            out->kind = SF_UNCHANGED;
            out->after = probe->last;
            return 0;
        }
        rc = check_target(&t, &st, before, window, max_suffix, out, err);
        target_close(&t);
        if (rc != SF_STALE)
            return rc;
        memset(out, 0, sizeof(*out));
    }
}

int sf_check_append(sf_probe *probe, const char *path, const sf_fp *before, int64_t window,
                    int64_t max_suffix, sf_change *out, sf_err *err)
{
    return check_append_impl(probe, path, before, window, max_suffix, 0, out, err);
}

void sf_probe_adopt(sf_probe *probe, const sf_fp *fp)
{
    probe->last = *fp;
    probe->has_last = 1;
    probe->read_at_ns = INT64_MIN; /* unknown read time: never racy-clean */
}

int sf_probe_poll(sf_probe *probe, const char *path, int64_t window, int64_t max_suffix,
                  sf_change *out, sf_err *err)
{
    sf_fp before;
    int64_t started = realtime_ns();
    if (!probe->has_last) {
        memset(out, 0, sizeof(*out));
        return fail_value(err, 0);
    }
    before = probe->last;
    if (check_append_impl(probe, path, &before, window, max_suffix, 1, out, err) != 0)
        return -1;
    /* `after` was read (or proven by the racy-clean rule) after `started`. */
    probe->read_at_ns = started;
    probe->last = out->after;
    return 0;
}

int sf_many_poll(const char *paths, int64_t count, int64_t window, int64_t racy_ns,
                 int64_t read_at_ns, sf_fp *last, sf_fp *next, int64_t *changed,
                 int64_t *n_changed, int64_t *started, sf_err *err)
{
    const char *p = paths;
    int64_t i, n = 0;
    *n_changed = 0;
    *started = realtime_ns();
    if (window_ok(window, err) != 0 || count < 0)
        return count < 0 ? fail_value(err, count) : -1;
    for (i = 0; i < count; i++, p += strlen(p) + 1) {
        sf_stat st;
        int missing;
        if (path_stat(p, &st, &missing, err) != 0)
            goto failed;
        if (missing) {
            fp_missing(&next[i]);
        } else if (racy_clean_fp(&last[i], read_at_ns, racy_ns, &st, window)) {
            next[i] = last[i];
            continue;
        } else if (sf_fingerprint(p, window, &next[i], err) != 0) {
            goto failed;
        }
        if (memcmp(&next[i], &last[i], sizeof(sf_fp)) != 0)
            changed[n++] = i;
    }
    for (i = 0; i < n; i++)
        last[changed[i]] = next[changed[i]];
    *n_changed = n;
    return 0;
failed:
    err->where = (int32_t)(i > INT32_MAX ? INT32_MAX : i);
    return -1;
}

int sf_read_range(sf_probe *probe, const char *path, int64_t offset, int64_t length,
                  uint8_t *buf, sf_err *err)
{
    int reopen;
    if (offset < 0 || length < 0)
        return fail_value(err, offset < 0 ? offset : length);
    for (reopen = 0;; reopen = 1) {
        sf_target t;
        sf_stat st;
        int missing;
        int64_t got = 0;
        if (target_open(probe, path, reopen, &t, &st, &missing, err) != 0)
            return -1;
        if (missing)
            return fail_errno(err, ENOENT);
        if (offset > st.size || length > st.size - offset) {
            target_close(&t);
            return fail_short(err, st.size);
        }
        if (h_pread(t.h, buf, length, offset, &got, err) != 0) {
            target_close(&t);
            return -1;
        }
        if (t.linked) {
            sf_stat post;
            if (h_stat(t.h, &post, err) != 0) {
                target_close(&t);
                return -1;
            }
            if (post.nlink == 0) {
                target_close(&t);
                continue; /* SF_STALE: read the file the path names now */
            }
        }
        target_close(&t);
        if (got != length)
            return fail_short(err, offset + got);
        return 0;
    }
}

/*
 * The content digest is block-structured, so that it can be rebuilt from the hashes of
 * whole blocks without their bytes (the transcript index stores them):
 *
 *   digest(data) = XXH3-128( H(block 1) || ... || H(block k) || H(rest) || le64(len) )
 *
 * where the blocks are the SF_DIGEST_BLOCK-byte pieces of data, `rest` the (possibly
 * empty) bytes after the last whole one, H the XXH3-128 (seed 0) of a piece in its
 * canonical (big-endian) 16 bytes, and le64(len) the total length. The state is a
 * streaming XXH3-128 over the whole-block hashes (`outer`), one over the partial block
 * (`inner`), the partial block's length and the total length.
 */
typedef struct sf_digest {
    XXH3_state_t *outer;
    XXH3_state_t *inner;
    uint64_t fill;  /* bytes in the partial block, < SF_DIGEST_BLOCK */
    uint64_t total; /* bytes fed */
    int blocks;     /* 1: block-structured (above); 0: plain XXH3-128 of the bytes (inner) */
} sf_digest;

void sf_digest_free(void *state)
{
    sf_digest *d = (sf_digest *)state;
    if (d == NULL)
        return;
    XXH3_freeState(d->outer);
    XXH3_freeState(d->inner);
    free(d);
}

static sf_digest *digest_alloc(void)
{
    sf_digest *d = (sf_digest *)malloc(sizeof(*d));
    if (d == NULL)
        return NULL;
    d->outer = XXH3_createState();
    d->inner = XXH3_createState();
    d->fill = 0;
    d->total = 0;
    d->blocks = 0;
    if (d->outer == NULL || d->inner == NULL) {
        sf_digest_free(d);
        return NULL;
    }
    return d;
}

static void *digest_new(int blocks)
{
    sf_digest *d = digest_alloc();
    if (d == NULL)
        return NULL;
    if (XXH3_128bits_reset(d->outer) != XXH_OK || XXH3_128bits_reset(d->inner) != XXH_OK) {
        sf_digest_free(d);
        return NULL;
    }
    d->blocks = blocks;
    return d;
}

void *sf_digest_new(void)
{
    return digest_new(0);
}

void *sf_bdigest_new(void)
{
    return digest_new(1);
}

void *sf_digest_copy(const void *state)
{
    const sf_digest *src = (const sf_digest *)state;
    sf_digest *d = digest_alloc();
    if (d == NULL)
        return NULL;
    XXH3_copyState(d->outer, src->outer);
    XXH3_copyState(d->inner, src->inner);
    d->fill = src->fill;
    d->total = src->total;
    d->blocks = src->blocks;
    return d;
}

/* Closes the full partial block: its hash goes to `outer`, `inner` starts over. */
static int digest_close_block(sf_digest *d)
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(d->inner));
    if (XXH3_128bits_update(d->outer, c.digest, sizeof(c.digest)) != XXH_OK ||
        XXH3_128bits_reset(d->inner) != XXH_OK)
        return -1;
    d->fill = 0;
    return 0;
}

int sf_digest_update(void *state, const uint8_t *buf, size_t len)
{
    sf_digest *d = (sf_digest *)state;
    if (len == 0)
        return 0;
    if (buf == NULL)
        return -1;
    if (!d->blocks) {
        if (XXH3_128bits_update(d->inner, buf, len) != XXH_OK)
            return -1;
        d->total += (uint64_t)len;
        return 0;
    }
    while (len > 0) {
        uint64_t room = (uint64_t)SF_DIGEST_BLOCK - d->fill;
        size_t n = (uint64_t)len < room ? len : (size_t)room;
        if (XXH3_128bits_update(d->inner, buf, n) != XXH_OK)
            return -1;
        d->fill += n;
        d->total += n;
        buf += n;
        len -= n;
        if (d->fill == (uint64_t)SF_DIGEST_BLOCK && digest_close_block(d) != 0)
            return -1;
    }
    return 0;
}

int sf_digest_add_blocks(void *state, const uint8_t *hashes, size_t count)
{
    sf_digest *d = (sf_digest *)state;
    if (count == 0)
        return 0;
    if (hashes == NULL || !d->blocks || d->fill != 0 || count > SIZE_MAX / 16 ||
        count > (UINT64_MAX - d->total) / (uint64_t)SF_DIGEST_BLOCK)
        return -1;
    /* One update over all of them: a stream hashes the same however it is cut. */
    if (XXH3_128bits_update(d->outer, hashes, 16 * count) != XXH_OK)
        return -1;
    d->total += (uint64_t)count * (uint64_t)SF_DIGEST_BLOCK;
    return 0;
}

int sf_digest_value(const void *state, uint64_t *hi, uint64_t *lo)
{
    const sf_digest *d = (const sf_digest *)state;
    XXH3_state_t last; /* statically allocated states are allowed (XXH_STATIC_LINKING_ONLY) */
    XXH128_canonical_t c;
    XXH128_hash_t h;
    uint8_t len[8];
    int i;
    if (!d->blocks) {
        h = XXH3_128bits_digest(d->inner);
        *hi = h.high64;
        *lo = h.low64;
        return 0;
    }
    XXH3_copyState(&last, d->outer);
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(d->inner));
    for (i = 0; i < 8; i++)
        len[i] = (uint8_t)(d->total >> (8 * i));
    /* Updates of a valid state with valid buffers cannot fail; checked all the same. */
    if (XXH3_128bits_update(&last, c.digest, sizeof(c.digest)) != XXH_OK ||
        XXH3_128bits_update(&last, len, sizeof(len)) != XXH_OK) {
        *hi = 0;
        *lo = 0;
        return -1;
    }
    h = XXH3_128bits_digest(&last);
    *hi = h.high64;
    *lo = h.low64;
    return 0;
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
        return fail_short(err, st.size);
    }
    chunk = alloc_bytes(SF_DIGEST_CHUNK);
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
            fail_short(err, off + got);
            break;
        }
        if (sf_digest_update(state, chunk, (size_t)got) != 0) {
            fail_nomem(err);
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
    if (rc == 0 && sf_digest_value(s, hi, lo) != 0)
        rc = fail_nomem(err);
    sf_digest_free(s);
    return rc;
}
