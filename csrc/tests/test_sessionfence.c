/* SPDX-License-Identifier: MIT */
/*
 * C-level tests of the sessionfence core, through its public header, on real files in a
 * fresh temporary directory. No framework: CHECK macros count, the summary line reads
 * "N passed, N failed", and the exit status is 0 only when nothing failed.
 *
 * Build (what .ci/c-tests.sh does, with sanitizers on top):
 *   cc -std=c99 -Wall -Wextra -Werror -DSF_TESTING -Icsrc \
 *      csrc/tests/test_sessionfence.c csrc/sessionfence.c -o test_sessionfence
 * SF_TESTING makes two internal helpers of sessionfence.c visible (the Windows path
 * decoder and the FILETIME conversion), so they are tested on every platform.
 * Portable: POSIX and _WIN32 branches (mingw-w64 builds it; wine runs it).
 */
#if !defined(_WIN32)
#  if defined(__APPLE__)
#    define _DARWIN_C_SOURCE
#  else
#    define _GNU_SOURCE
#  endif
#  define _FILE_OFFSET_BITS 64
#endif

#include "sessionfence.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#  ifndef WIN32_LEAN_AND_MEAN
#    define WIN32_LEAN_AND_MEAN
#  endif
#  if !defined(_WIN32_WINNT) || _WIN32_WINNT < 0x0603
#    undef _WIN32_WINNT
#    define _WIN32_WINNT 0x0603
#  endif
#  include <windows.h>
#  include <winioctl.h>
#else
#  include <fcntl.h>
#  include <sys/stat.h>
#  include <sys/types.h>
#  include <time.h>
#  include <unistd.h>
#endif

#ifdef SF_TESTING
size_t sf_utf8_to_utf16(const char *path, uint16_t *out);
int64_t sf_filetime_to_ns(int64_t ticks);
#endif

#define EMPTY_XXH3_64 0x2D06800538D394C2ULL

/* ------------------------------------------------------------------------------------ */
/* Harness                                                                                */
/* ------------------------------------------------------------------------------------ */

static int n_passed, n_failed;

static void check_(int ok, const char *what, const char *file, int line)
{
    if (ok) {
        n_passed++;
        return;
    }
    n_failed++;
    fprintf(stderr, "%s:%d: FAIL: %s\n", file, line, what);
}

static void check_i64_(int64_t a, int64_t b, const char *ea, const char *eb, const char *file,
                       int line)
{
    if (a == b) {
        n_passed++;
        return;
    }
    n_failed++;
    fprintf(stderr, "%s:%d: FAIL: %s == %s (%lld != %lld)\n", file, line, ea, eb,
            (long long)a, (long long)b);
}

static void check_u64_(uint64_t a, uint64_t b, const char *ea, const char *eb, const char *file,
                       int line)
{
    if (a == b) {
        n_passed++;
        return;
    }
    n_failed++;
    fprintf(stderr, "%s:%d: FAIL: %s == %s (0x%016llx != 0x%016llx)\n", file, line, ea, eb,
            (unsigned long long)a, (unsigned long long)b);
}

#define CHECK(c) check_((c) != 0, #c, __FILE__, __LINE__)
#define CHECK_I(a, b) check_i64_((int64_t)(a), (int64_t)(b), #a, #b, __FILE__, __LINE__)
#define CHECK_U(a, b) check_u64_((uint64_t)(a), (uint64_t)(b), #a, #b, __FILE__, __LINE__)
/* A setup step that must work for the test to mean anything. */
#define REQUIRE(c)                                                                          \
    do {                                                                                    \
        if (!(c)) {                                                                         \
            fprintf(stderr, "%s:%d: setup failed: %s\n", __FILE__, __LINE__, #c);         \
            n_failed++;                                                                     \
            return;                                                                         \
        }                                                                                   \
    } while (0)

static void note(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("  note: ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    va_end(ap);
}

/* ------------------------------------------------------------------------------------ */
/* Portable file helpers (UTF-8 paths)                                                    */
/* ------------------------------------------------------------------------------------ */

static char tmpdir[1024];

static void join(char *out, size_t cap, const char *name)
{
#ifdef _WIN32
    snprintf(out, cap, "%s\\%s", tmpdir, name);
#else
    snprintf(out, cap, "%s/%s", tmpdir, name);
#endif
}

static void sleep_ms(int ms)
{
#ifdef _WIN32
    Sleep((DWORD)ms);
#else
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
#endif
}

#ifdef _WIN32

static wchar_t *wide(const char *s)
{
    static wchar_t bufs[4][1024]; /* test code only: the library keeps no such state */
    static int next;
    wchar_t *w = bufs[next++ & 3];
    if (MultiByteToWideChar(CP_UTF8, 0, s, -1, w, 1024) <= 0)
        w[0] = 0;
    return w;
}

#define SHARE_ALL (FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE)

static int write_at(const char *path, DWORD disposition, int64_t off, const void *data,
                    size_t len)
{
    HANDLE h = CreateFileW(wide(path), GENERIC_WRITE, SHARE_ALL, NULL, disposition,
                           FILE_ATTRIBUTE_NORMAL, NULL);
    DWORD n = 0;
    LARGE_INTEGER li;
    int ok;
    if (h == INVALID_HANDLE_VALUE)
        return -1;
    li.QuadPart = off;
    if (off < 0) {
        li.QuadPart = 0;
        ok = SetFilePointerEx(h, li, NULL, FILE_END);
    } else {
        ok = SetFilePointerEx(h, li, NULL, FILE_BEGIN);
    }
    ok = ok && (len == 0 || (WriteFile(h, data, (DWORD)len, &n, NULL) && n == len));
    CloseHandle(h);
    return ok ? 0 : -1;
}

static int write_file(const char *path, const void *data, size_t len)
{
    return write_at(path, CREATE_ALWAYS, 0, data, len);
}

static int append_file(const char *path, const void *data, size_t len)
{
    return write_at(path, OPEN_EXISTING, -1, data, len);
}

static int pwrite_file(const char *path, int64_t off, const void *data, size_t len)
{
    return write_at(path, OPEN_EXISTING, off, data, len);
}

static int truncate_file(const char *path, int64_t size)
{
    HANDLE h = CreateFileW(wide(path), GENERIC_WRITE, SHARE_ALL, NULL, OPEN_EXISTING,
                           FILE_ATTRIBUTE_NORMAL, NULL);
    LARGE_INTEGER li;
    DWORD ret = 0;
    int ok;
    if (h == INVALID_HANDLE_VALUE)
        return -1;
    /* Sparse where the volume can (NTFS); otherwise a big truncate zero-fills. */
    (void)DeviceIoControl(h, FSCTL_SET_SPARSE, NULL, 0, NULL, 0, &ret, NULL);
    li.QuadPart = size;
    ok = SetFilePointerEx(h, li, NULL, FILE_BEGIN) && SetEndOfFile(h);
    CloseHandle(h);
    return ok ? 0 : -1;
}

/*
 * rename() the POSIX way: FileRenameInfoEx with POSIX semantics (Windows 10 1607+, NTFS)
 * replaces a target that others hold open with FILE_SHARE_DELETE; MoveFileExW (what
 * os.replace calls) cannot, and is the fallback.
 */
static int rename_file(const char *from, const char *to)
{
    const wchar_t *wto = wide(to);
    size_t tlen = wcslen(wto) * sizeof(wchar_t);
    size_t size = sizeof(FILE_RENAME_INFO) + tlen;
    FILE_RENAME_INFO *ri = (FILE_RENAME_INFO *)calloc(1, size);
    HANDLE h;
    int ok = 0;
    if (ri != NULL) {
        DWORD flags = 0x1 /* REPLACE_IF_EXISTS */ | 0x2 /* POSIX_SEMANTICS */;
        memcpy(ri, &flags, sizeof(flags)); /* union { BOOLEAN ReplaceIfExists; DWORD Flags; } */
        ri->RootDirectory = NULL;
        ri->FileNameLength = (DWORD)tlen;
        memcpy(ri->FileName, wto, tlen);
        h = CreateFileW(wide(from), DELETE | SYNCHRONIZE, SHARE_ALL, NULL, OPEN_EXISTING,
                        FILE_ATTRIBUTE_NORMAL, NULL);
        if (h != INVALID_HANDLE_VALUE) {
            ok = SetFileInformationByHandle(h, (FILE_INFO_BY_HANDLE_CLASS)22 /* RenameInfoEx */,
                                            ri, (DWORD)size) != 0;
            CloseHandle(h);
        }
        free(ri);
    }
    if (ok)
        return 0;
    return MoveFileExW(wide(from), wto, MOVEFILE_REPLACE_EXISTING) ? 0 : -1;
}

static int unlink_file(const char *path)
{
    return DeleteFileW(wide(path)) ? 0 : -1;
}

static int make_dir(const char *path)
{
    return CreateDirectoryW(wide(path), NULL) ? 0 : -1;
}

static int remove_dir(const char *path)
{
    return RemoveDirectoryW(wide(path)) ? 0 : -1;
}

static int64_t ft_ns(LARGE_INTEGER t)
{
    return (int64_t)(t.QuadPart - 116444736000000000LL) * 100;
}

static int set_mtime_ns(const char *path, int64_t ns)
{
    HANDLE h = CreateFileW(wide(path), FILE_WRITE_ATTRIBUTES, SHARE_ALL, NULL, OPEN_EXISTING,
                           FILE_ATTRIBUTE_NORMAL, NULL);
    ULARGE_INTEGER t;
    FILETIME ft;
    int ok;
    if (h == INVALID_HANDLE_VALUE)
        return -1;
    t.QuadPart = (ULONGLONG)(ns / 100 + 116444736000000000LL);
    ft.dwLowDateTime = t.LowPart;
    ft.dwHighDateTime = t.HighPart;
    ok = SetFileTime(h, NULL, NULL, &ft) != 0;
    CloseHandle(h);
    return ok ? 0 : -1;
}

/* A metadata-only change: moves ChangeTime, leaves LastWriteTime alone. */
static int touch_metadata(const char *path)
{
    DWORD a = GetFileAttributesW(wide(path));
    if (a == INVALID_FILE_ATTRIBUTES)
        return -1;
    if (!SetFileAttributesW(wide(path), a ^ FILE_ATTRIBUTE_ARCHIVE))
        return -1;
    return 0;
}

typedef struct native_stat {
    uint64_t dev, ino;
    int64_t size, mtime_ns, ctime_ns, birth_ns;
} native_stat;

static int native(const char *path, native_stat *ns)
{
    HANDLE h = CreateFileW(wide(path), FILE_READ_ATTRIBUTES, SHARE_ALL, NULL, OPEN_EXISTING,
                           FILE_FLAG_BACKUP_SEMANTICS, NULL);
    BY_HANDLE_FILE_INFORMATION info;
    FILE_BASIC_INFO basic;
    FILE_ID_INFO id;
    int ok;
    if (h == INVALID_HANDLE_VALUE)
        return -1;
    ok = GetFileInformationByHandle(h, &info) &&
         GetFileInformationByHandleEx(h, FileBasicInfo, &basic, sizeof(basic));
    if (ok) {
        uint64_t low = 0;
        if (GetFileInformationByHandleEx(h, FileIdInfo, &id, sizeof(id)))
            memcpy(&low, id.FileId.Identifier, sizeof(low));
        if (low != 0) {
            ns->dev = (uint64_t)id.VolumeSerialNumber;
            ns->ino = low;
        } else {
            ns->dev = info.dwVolumeSerialNumber;
            ns->ino = ((uint64_t)info.nFileIndexHigh << 32) | info.nFileIndexLow;
        }
        ns->size = (int64_t)(((uint64_t)info.nFileSizeHigh << 32) | info.nFileSizeLow);
        ns->mtime_ns = ft_ns(basic.LastWriteTime);
        ns->ctime_ns = basic.ChangeTime.QuadPart ? ft_ns(basic.ChangeTime) : 0;
        ns->birth_ns = ft_ns(basic.CreationTime);
    }
    CloseHandle(h);
    return ok ? 0 : -1;
}

static int make_tmpdir(void)
{
    wchar_t base[MAX_PATH + 1];
    char b8[MAX_PATH * 4];
    DWORD n = GetTempPathW(MAX_PATH + 1, base);
    int i;
    if (n == 0 || n > MAX_PATH)
        return -1;
    if (WideCharToMultiByte(CP_UTF8, 0, base, -1, b8, (int)sizeof(b8), NULL, NULL) <= 0)
        return -1;
    for (i = 0; i < 100; i++) {
        snprintf(tmpdir, sizeof(tmpdir), "%ssftest-%lu-%lu-%d", b8,
                 (unsigned long)GetCurrentProcessId(), (unsigned long)GetTickCount(), i);
        if (CreateDirectoryW(wide(tmpdir), NULL))
            return 0;
    }
    return -1;
}

#else /* POSIX */

static int write_at(const char *path, int flags, int64_t off, const void *data, size_t len)
{
    int fd = open(path, flags | O_WRONLY, 0644);
    ssize_t n;
    if (fd < 0)
        return -1;
    if (off >= 0)
        n = pwrite(fd, data, len, (off_t)off);
    else
        n = write(fd, data, len);
    if (close(fd) != 0 || n < 0 || (size_t)n != len)
        return -1;
    return 0;
}

static int write_file(const char *path, const void *data, size_t len)
{
    return write_at(path, O_CREAT | O_TRUNC, 0, data, len);
}

static int append_file(const char *path, const void *data, size_t len)
{
    return write_at(path, O_APPEND, -1, data, len);
}

static int pwrite_file(const char *path, int64_t off, const void *data, size_t len)
{
    return write_at(path, 0, off, data, len);
}

static int truncate_file(const char *path, int64_t size)
{
    return truncate(path, (off_t)size);
}

static int rename_file(const char *from, const char *to)
{
    return rename(from, to);
}

static int unlink_file(const char *path)
{
    return unlink(path);
}

static int make_dir(const char *path)
{
    return mkdir(path, 0755);
}

static int remove_dir(const char *path)
{
    return rmdir(path);
}

static int set_mtime_ns(const char *path, int64_t ns)
{
    struct timespec ts[2];
    ts[0].tv_sec = 0;
    ts[0].tv_nsec = UTIME_OMIT;
    ts[1].tv_sec = (time_t)(ns / 1000000000LL);
    ts[1].tv_nsec = (long)(ns % 1000000000LL);
    return utimensat(AT_FDCWD, path, ts, 0);
}

/* A metadata-only change: moves ctime, leaves mtime alone. */
static int touch_metadata(const char *path)
{
    struct stat s;
    if (stat(path, &s) != 0)
        return -1;
    return chmod(path, (s.st_mode & 07777) ^ 0001);
}

typedef struct native_stat {
    uint64_t dev, ino;
    int64_t size, mtime_ns, ctime_ns, birth_ns;
} native_stat;

static int native(const char *path, native_stat *ns)
{
    struct stat s;
    if (stat(path, &s) != 0)
        return -1;
    ns->dev = (uint64_t)s.st_dev;
    ns->ino = (uint64_t)s.st_ino;
    ns->size = (int64_t)s.st_size;
#  if defined(__APPLE__)
    ns->mtime_ns = (int64_t)s.st_mtimespec.tv_sec * 1000000000LL + s.st_mtimespec.tv_nsec;
    ns->ctime_ns = (int64_t)s.st_ctimespec.tv_sec * 1000000000LL + s.st_ctimespec.tv_nsec;
#  else
    ns->mtime_ns = (int64_t)s.st_mtim.tv_sec * 1000000000LL + s.st_mtim.tv_nsec;
    ns->ctime_ns = (int64_t)s.st_ctim.tv_sec * 1000000000LL + s.st_ctim.tv_nsec;
#  endif
    ns->birth_ns = 0;
    return 0;
}

static int make_tmpdir(void)
{
    const char *base = getenv("TMPDIR");
    if (base == NULL || base[0] == 0)
        base = "/tmp";
    snprintf(tmpdir, sizeof(tmpdir), "%s/sftest-XXXXXX", base);
    return mkdtemp(tmpdir) != NULL ? 0 : -1;
}

#endif

/* ------------------------------------------------------------------------------------ */
/* Shared fixtures                                                                        */
/* ------------------------------------------------------------------------------------ */

static const char *const scratch_names[] = {
    "small.jsonl", "empty.jsonl", "big.jsonl", "other.jsonl", "probe.jsonl", "many-a",
    "many-b",      "check.jsonl", "new.jsonl", "range.bin",   "digest.bin",  "sparse.bin",
    "meta.jsonl",  "share.jsonl", "share.tmp", "vec.bin",     "fifo",        NULL};

static void cleanup(void)
{
    char p[1200];
    int i;
    for (i = 0; scratch_names[i] != NULL; i++) {
        join(p, sizeof(p), scratch_names[i]);
        (void)unlink_file(p);
    }
    join(p, sizeof(p), "na\xc3\xafve-\xe2\x82\xac-\xf0\x9f\x98\x80.jsonl");
    (void)unlink_file(p);
    join(p, sizeof(p), "dir");
    (void)remove_dir(p);
    (void)remove_dir(tmpdir);
}

static sf_err fresh_err(void)
{
    sf_err e;
    memset(&e, 0x5A, sizeof(e)); /* garbage: every failure must overwrite every field */
    return e;
}

/* XXH3 sanity buffer of upstream xxHash (fillTestBuffer), as tests/vectors/xxh3.py. */
static void sanity_buffer(uint8_t *out, size_t len)
{
    uint64_t gen = 2654435761ULL;
    size_t i;
    for (i = 0; i < len; i++) {
        out[i] = (uint8_t)(gen >> 56);
        gen *= 11400714785074694797ULL;
    }
}

static int fp_equal(const sf_fp *a, const sf_fp *b)
{
    return a->exists == b->exists && a->dev == b->dev && a->ino == b->ino &&
           a->size == b->size && a->mtime_ns == b->mtime_ns && a->ctime_ns == b->ctime_ns &&
           a->tail_len == b->tail_len && a->tail_hash == b->tail_hash;
}

static sf_fp fp_of(const char *path, int64_t window)
{
    sf_fp fp;
    sf_err err = fresh_err();
    memset(&fp, 0, sizeof(fp));
    if (sf_fingerprint(path, window, &fp, &err) != 0) {
        fprintf(stderr, "sf_fingerprint(%s) failed: code %d errno %d\n", path, err.code,
                err.sys_errno);
        fp.exists = -1;
    }
    return fp;
}

/* Moves the file's mtime well away from now, so "times moved" never hides in a granule. */
static int shift_mtime(const char *path, const sf_fp *fp, int64_t by_ns)
{
    return set_mtime_ns(path, fp->mtime_ns + by_ns);
}

/* ------------------------------------------------------------------------------------ */
/* Tests                                                                                  */
/* ------------------------------------------------------------------------------------ */

/*
 * Renames `from` over `to` while `probe` may hold `to` open. Where the OS offers no rename
 * that replaces an open file (Windows without POSIX rename semantics, e.g. under wine),
 * says so once and lets go of the probe's handle first: the probe must then pick the new
 * file up by re-opening, which is still checked.
 */
static int replace_held(sf_probe *probe, const char *from, const char *to)
{
    static int noted;
    if (rename_file(from, to) == 0)
        return 0;
#ifdef _WIN32
    if (probe != NULL && probe->handle != -1) {
        int64_t keep = probe->has_last;
        sf_fp last = probe->last;
        if (!noted++)
            note("no rename over an open file here (needs POSIX rename semantics); "
                 "the probe lets go first");
        sf_probe_close(probe);
        probe->has_last = keep;
        probe->last = last;
        return rename_file(from, to);
    }
#else
    (void)probe;
    (void)noted;
#endif
    return -1;
}

/*
 * Deletes `path` while `probe` may hold it open. Windows without POSIX delete semantics
 * keeps the name (delete pending) until the last handle closes; real Windows reports that
 * state (sessionfence.c treats it as missing), wine does not. There: say so once and let
 * go of the probe's handle, so the deletion completes and the probe must notice it.
 */
static int unlink_held(sf_probe *probe, const char *path)
{
    static int noted;
    if (unlink_file(path) != 0)
        return -1;
#ifdef _WIN32
    if (probe != NULL && probe->handle != -1 &&
        GetFileAttributesW(wide(path)) != INVALID_FILE_ATTRIBUTES) {
        int64_t keep = probe->has_last;
        sf_fp last = probe->last;
        sf_fp fp;
        sf_err err = fresh_err();
        int32_t same;
        /* If the OS reports the pending delete, the probe already sees the file gone. */
        if (sf_probe_fingerprint(probe, path, 4096, &fp, &same, &err) == 0 && !fp.exists)
            return 0;
        if (!noted++)
            note("a deleted file held open keeps its name and reports no pending delete "
                 "here; the probe lets go first");
        sf_probe_close(probe);
        probe->has_last = keep;
        probe->last = last;
    }
#else
    (void)probe;
    (void)noted;
#endif
    return 0;
}

static void test_version_and_free(void)
{
    const char *v = sf_version();
    CHECK(v != NULL && v[0] != 0);
    sf_free(NULL); /* like free(NULL) */
}

static void test_utf8_invalid_at(void)
{
    static const struct {
        const char *bytes;
        size_t len;
        int64_t want;
    } cases[] = {
        {"", 0, -1},
        {"plain ascii text, longer than eight", 35, -1},
        {"caf\xc3\xa9 \xe6\x97\xa5 \xf0\x9f\x8e\x89", 15, -1},
        {"ab\xff", 3, 2},
        {"abcdefgh\x80", 9, 8},
        {"\xc0\xaf", 2, 0},               /* overlong */
        {"x\xe0\x80\xaf", 4, 1},         /* overlong 3-byte */
        {"\xed\xa0\x80", 3, 0},           /* surrogate */
        {"\xed\x9f\xbf", 3, -1},          /* U+D7FF */
        {"\xf4\x90\x80\x80", 4, 0},       /* above U+10FFFF */
        {"\xf4\x8f\xbf\xbf", 4, -1},      /* U+10FFFF */
        {"ok\xe6\x97", 4, 2},             /* cut by the end */
        {"\xe6\x41\x97", 3, 0},           /* bad continuation */
        {"\xf0\x9f\x8e\x41", 4, 0},
        {"\xf5\x80\x80\x80", 4, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        CHECK(sf_utf8_invalid_at((const uint8_t *)cases[i].bytes, cases[i].len) == cases[i].want);
    }
    CHECK(sf_utf8_invalid_at(NULL, 0) == -1);
}

static void test_xxh3_vectors(void)
{
    static const struct {
        size_t len;
        uint64_t h;
    } v64[] = {{0, 0x2D06800538D394C2ULL},     {1, 0xC44BDFF4074EECDBULL},
               {6, 0x27B56A84CD2D7325ULL},     {12, 0xA713DAF0DFBB77E7ULL},
               {24, 0xA3FE70BF9D3510EBULL},    {48, 0x397DA259ECBA1F11ULL},
               {80, 0xBCDEFBBB2C47C90AULL},    {195, 0xCD94217EE362EC3AULL},
               {403, 0xCDEB804D65C6DEA4ULL},   {512, 0x617E49599013CB6BULL},
               {2048, 0xDD59E2C3A5F038E0ULL},  {2240, 0x6E73A90539CF2948ULL},
               {2367, 0xCB37AEB9E5D361EDULL}};
    static const struct {
        size_t len;
        uint64_t lo, hi;
    } v128[] = {{0, 0x6001C324468D497FULL, 0x99AA06D3014798D8ULL},
                {1, 0xC44BDFF4074EECDBULL, 0xA6CD5E9392000F6AULL},
                {6, 0x3E7039BDDA43CFC6ULL, 0x082AFE0B8162D12AULL},
                {12, 0x061A192713F69AD9ULL, 0x6E3EFD8FC7802B18ULL},
                {24, 0x1E7044D28B1B901DULL, 0x0CE966E4678D3761ULL},
                {48, 0xF942219AED80F67BULL, 0xA002AC4E5478227EULL},
                {81, 0x5E8BAFB9F95FB803ULL, 0x4952F58181AB0042ULL},
                {222, 0xF1AEBD597CEC6B3AULL, 0x337E09641B948717ULL},
                {403, 0xCDEB804D65C6DEA4ULL, 0x1B6DE21E332DD73DULL},
                {512, 0x617E49599013CB6BULL, 0x18D2D110DCC9BCA1ULL},
                {2048, 0xDD59E2C3A5F038E0ULL, 0xF736557FD47073A5ULL},
                {2240, 0x6E73A90539CF2948ULL, 0xCCB134FBFA7CE49DULL}};
    uint8_t buf[2400];
    size_t i;
    uint64_t hi, lo;
    sanity_buffer(buf, sizeof(buf));
    CHECK_U(sf_xxh3_64((const uint8_t *)"", 0), EMPTY_XXH3_64);
    CHECK_U(sf_xxh3_64(NULL, 0), EMPTY_XXH3_64);
    for (i = 0; i < sizeof(v64) / sizeof(v64[0]); i++)
        CHECK_U(sf_xxh3_64(buf, v64[i].len), v64[i].h);
    for (i = 0; i < sizeof(v128) / sizeof(v128[0]); i++) {
        sf_xxh3_128(buf, v128[i].len, &hi, &lo);
        CHECK_U(hi, v128[i].hi);
        CHECK_U(lo, v128[i].lo);
    }
}

static void test_fingerprint(void)
{
    char small[1200], empty[1200], big[1200], missing[1200], notdir[1200], dir[1200];
    static uint8_t data[10000];
    sf_fp fp;
    sf_err err;
    native_stat ns;
    size_t i;

    for (i = 0; i < sizeof(data); i++)
        data[i] = (uint8_t)('a' + i % 26);
    join(small, sizeof(small), "small.jsonl");
    join(empty, sizeof(empty), "empty.jsonl");
    join(big, sizeof(big), "big.jsonl");
    join(missing, sizeof(missing), "missing.jsonl");
    join(notdir, sizeof(notdir), "small.jsonl/child");
    join(dir, sizeof(dir), "dir");
    REQUIRE(write_file(small, "{\"a\":1}\n", 8) == 0);
    REQUIRE(write_file(empty, "", 0) == 0);
    REQUIRE(write_file(big, data, sizeof(data)) == 0);
    REQUIRE(make_dir(dir) == 0);

    /* Missing (ENOENT and ENOTDIR): all zero. */
    memset(&fp, 0x77, sizeof(fp));
    err = fresh_err();
    CHECK_I(sf_fingerprint(missing, 4096, &fp, &err), 0);
    CHECK_I(fp.exists, 0);
    CHECK_U(fp.tail_hash, 0);
    CHECK_I(fp.size, 0);
    memset(&fp, 0x77, sizeof(fp));
    CHECK_I(sf_fingerprint(notdir, 4096, &fp, &err), 0);
    CHECK_I(fp.exists, 0);

    /* Empty: exists, tail of nothing hashes to XXH3_64(""), never 0. */
    fp = fp_of(empty, 4096);
    CHECK_I(fp.exists, 1);
    CHECK_I(fp.size, 0);
    CHECK_I(fp.tail_len, 0);
    CHECK_U(fp.tail_hash, EMPTY_XXH3_64);

    /* Small: the whole file is the window. */
    fp = fp_of(small, 4096);
    CHECK_I(fp.exists, 1);
    CHECK_I(fp.size, 8);
    CHECK_I(fp.tail_len, 8);
    CHECK_U(fp.tail_hash, sf_xxh3_64((const uint8_t *)"{\"a\":1}\n", 8));
    REQUIRE(native(small, &ns) == 0);
    CHECK_U(fp.dev, ns.dev);
    CHECK_U(fp.ino, ns.ino);
    CHECK_I(fp.mtime_ns, ns.mtime_ns);
    CHECK_I(fp.ctime_ns, ns.ctime_ns);

    /* Bigger than the window: only the last `window` bytes count. */
    fp = fp_of(big, 4096);
    CHECK_I(fp.size, (int64_t)sizeof(data));
    CHECK_I(fp.tail_len, 4096);
    CHECK_U(fp.tail_hash, sf_xxh3_64(data + sizeof(data) - 4096, 4096));
    fp = fp_of(big, 1);
    CHECK_U(fp.tail_hash, sf_xxh3_64(data + sizeof(data) - 1, 1));
    fp = fp_of(big, 0);
    CHECK_I(fp.tail_len, 0);
    CHECK_U(fp.tail_hash, EMPTY_XXH3_64);
    fp = fp_of(big, SF_WINDOW_MAX);
    CHECK_I(fp.tail_len, (int64_t)sizeof(data));
    CHECK_U(fp.tail_hash, sf_xxh3_64(data, sizeof(data)));

    /* Window bounds. */
    err = fresh_err();
    CHECK_I(sf_fingerprint(small, -1, &fp, &err), -1);
    CHECK_I(err.code, SF_EVALUE);
    CHECK_I(err.detail, -1);
    CHECK_I(err.sys_errno, 0);
    CHECK_I(err.winerror, 0);
    err = fresh_err();
    CHECK_I(sf_fingerprint(small, SF_WINDOW_MAX + 1, &fp, &err), -1);
    CHECK_I(err.code, SF_EVALUE);
    CHECK_I(err.detail, SF_WINDOW_MAX + 1);

    /* A directory is an error (EISDIR), not a missing file. */
    err = fresh_err();
    CHECK_I(sf_fingerprint(dir, 4096, &fp, &err), -1);
    CHECK_I(err.code, SF_EOS);
    CHECK_I(err.sys_errno, EISDIR);

    /* Not a regular file: EINVAL (and opening a FIFO must not hang). */
#ifdef _WIN32
    err = fresh_err();
    CHECK_I(sf_fingerprint("NUL", 4096, &fp, &err), -1);
    CHECK_I(err.code, SF_EOS);
    CHECK_I(err.sys_errno, EINVAL);
#else
    {
        char fifo[1200];
        join(fifo, sizeof(fifo), "fifo");
        REQUIRE(mkfifo(fifo, 0600) == 0);
        err = fresh_err();
        CHECK_I(sf_fingerprint(fifo, 4096, &fp, &err), -1);
        CHECK_I(err.code, SF_EOS);
        CHECK_I(err.sys_errno, EINVAL);
        CHECK_I(err.winerror, 0);
        if (geteuid() != 0) {
            REQUIRE(chmod(small, 0) == 0);
            err = fresh_err();
            CHECK_I(sf_fingerprint(small, 4096, &fp, &err), -1);
            CHECK_I(err.sys_errno, EACCES);
            REQUIRE(chmod(small, 0644) == 0);
        } else {
            note("running as root: permission-denied case skipped");
        }
    }
#endif
}

static void test_fingerprint_many(void)
{
    char a[1200], b[1200], dir[1200];
    char joined[4096];
    size_t n = 0;
    sf_fp out[4];
    sf_err err;
    sf_fp fa, fb;

    join(a, sizeof(a), "many-a");
    join(b, sizeof(b), "many-b");
    join(dir, sizeof(dir), "dir");
    REQUIRE(write_file(a, "aaa\n", 4) == 0);
    REQUIRE(write_file(b, "bbbbbb\n", 7) == 0);
    fa = fp_of(a, 2);
    fb = fp_of(b, 2);

#define ADD(p)                                                                              \
    do {                                                                                    \
        size_t l_ = strlen(p) + 1;                                                          \
        memcpy(joined + n, (p), l_);                                                        \
        n += l_;                                                                            \
    } while (0)
    ADD(a);
    ADD("does-not-exist-anywhere");
    ADD(b);
    memset(out, 0x77, sizeof(out));
    err = fresh_err();
    CHECK_I(sf_fingerprint_many(joined, 3, 2, out, &err), 0);
    CHECK(fp_equal(&out[0], &fa));
    CHECK_I(out[1].exists, 0);
    CHECK_U(out[1].tail_hash, 0);
    CHECK(fp_equal(&out[2], &fb));

    /* The failing index is reported; nothing is fingerprinted with a bad window. */
    n = 0;
    ADD(a);
    ADD(dir);
    ADD(b);
    err = fresh_err();
    CHECK_I(sf_fingerprint_many(joined, 3, 2, out, &err), -1);
    CHECK_I(err.code, SF_EOS);
    CHECK_I(err.sys_errno, EISDIR);
    CHECK_I(err.where, 1);
    err = fresh_err();
    CHECK_I(sf_fingerprint_many(joined, 1, -5, out, &err), -1);
    CHECK_I(err.code, SF_EVALUE);
    CHECK_I(sf_fingerprint_many(joined, 0, 4096, out, &err), 0);
#undef ADD
}

static void test_probe(void)
{
    char path[1200], other[1200];
    sf_probe probe;
    sf_fp fp, fp2, want;
    sf_err err = fresh_err();
    int32_t same = -1;
    int64_t held;

    join(path, sizeof(path), "probe.jsonl");
    join(other, sizeof(other), "other.jsonl");
    REQUIRE(write_file(path, "line 1\n", 7) == 0);

    sf_probe_init(&probe);
    CHECK_I(probe.handle, -1);
    CHECK_I(probe.has_last, 0);
    probe.racy_ns = -1; /* read every time; the racy-clean shortcut is tested below */

    CHECK_I(sf_probe_fingerprint(&probe, path, 4096, &fp, &same, &err), 0);
    CHECK_I(same, 0);
    want = fp_of(path, 4096);
    CHECK(fp_equal(&fp, &want));
    CHECK(probe.handle != -1);
    held = probe.handle;

    /* Unchanged: same handle, same_as_last. */
    CHECK_I(sf_probe_fingerprint(&probe, path, 4096, &fp2, &same, &err), 0);
    CHECK_I(same, 1);
    CHECK(fp_equal(&fp, &fp2));
    CHECK_I(probe.handle, held);

    /* Appended: the held handle sees it. */
    REQUIRE(append_file(path, "line 2\n", 7) == 0);
    CHECK_I(sf_probe_fingerprint(&probe, path, 4096, &fp2, &same, &err), 0);
    CHECK_I(same, 0);
    CHECK_I(fp2.size, 14);
    want = fp_of(path, 4096);
    CHECK(fp_equal(&fp2, &want));
    CHECK_I(probe.handle, held);

    /* Replaced by rename: the probe follows the path to the new file. */
    REQUIRE(write_file(other, "replacement\n", 12) == 0);
    REQUIRE(replace_held(&probe, other, path) == 0); /* (a rename moves the file's ctime) */
    want = fp_of(path, 4096);
    CHECK_I(sf_probe_fingerprint(&probe, path, 4096, &fp2, &same, &err), 0);
    CHECK_I(same, 0);
    CHECK(fp_equal(&fp2, &want));
    CHECK(fp2.ino != fp.ino);

    /* Unlinked: MISSING, handle released; MISSING again is same_as_last. */
    REQUIRE(unlink_held(&probe, path) == 0);
    CHECK_I(sf_probe_fingerprint(&probe, path, 4096, &fp2, &same, &err), 0);
    CHECK_I(fp2.exists, 0);
    CHECK_I(same, 0);
    CHECK_I(probe.handle, -1);
    CHECK_I(sf_probe_fingerprint(&probe, path, 4096, &fp2, &same, &err), 0);
    CHECK_I(fp2.exists, 0);
    CHECK_I(same, 1);

    /* Re-created: picked up. */
    REQUIRE(write_file(path, "again\n", 6) == 0);
    CHECK_I(sf_probe_fingerprint(&probe, path, 4096, &fp2, &same, &err), 0);
    CHECK_I(same, 0);
    want = fp_of(path, 4096);
    CHECK(fp_equal(&fp2, &want));
    CHECK(probe.handle != -1);

    /* A different window is a different fingerprint. */
    CHECK_I(sf_probe_fingerprint(&probe, path, 2, &fp2, &same, &err), 0);
    CHECK_I(same, 0);
    CHECK_I(fp2.tail_len, 2);

    /* Errors: bad window; a directory at the path. */
    err = fresh_err();
    CHECK_I(sf_probe_fingerprint(&probe, path, -1, &fp2, &same, &err), -1);
    CHECK_I(err.code, SF_EVALUE);
    {
        char dir[1200];
        join(dir, sizeof(dir), "dir");
        err = fresh_err();
        CHECK_I(sf_probe_fingerprint(&probe, dir, 4096, &fp2, &same, &err), -1);
        CHECK_I(err.code, SF_EOS);
        CHECK_I(err.sys_errno, EISDIR);
    }

    /* Racy-clean shortcut: a file whose times are older than the read is not re-read. */
    sf_probe_close(&probe);
    sf_probe_init(&probe);
    REQUIRE(set_mtime_ns(path, want.mtime_ns - 10LL * 1000000000LL) == 0);
    want = fp_of(path, 4096);
    probe.racy_ns = 0; /* anything older than the read itself counts */
    sleep_ms(5);
    CHECK_I(sf_probe_fingerprint(&probe, path, 4096, &fp, &same, &err), 0);
    CHECK(fp_equal(&fp, &want));
    sleep_ms(5);
    CHECK_I(sf_probe_fingerprint(&probe, path, 4096, &fp2, &same, &err), 0);
    CHECK_I(same, 1);
    CHECK(fp_equal(&fp2, &want));
    /* ...but any write moves a time past the read and is seen. */
    REQUIRE(append_file(path, "x", 1) == 0);
    CHECK_I(sf_probe_fingerprint(&probe, path, 4096, &fp2, &same, &err), 0);
    CHECK_I(same, 0);
    CHECK_I(fp2.size, want.size + 1);

    sf_probe_close(&probe);
    CHECK_I(probe.handle, -1);
    CHECK_I(probe.has_last, 0);
    sf_probe_close(&probe); /* idempotent */
    CHECK_I(probe.handle, -1);
}

typedef struct check_case {
    sf_probe *probe; /* NULL: one-shot */
} check_case;

static int check(sf_probe *probe, const char *path, const sf_fp *before, int64_t window,
                 int64_t max_suffix, sf_change *out)
{
    sf_err err = fresh_err();
    int rc = sf_check_append(probe, path, before, window, max_suffix, out, &err);
    if (rc != 0)
        fprintf(stderr, "sf_check_append(%s) failed: code %d errno %d detail %lld\n", path,
                err.code, err.sys_errno, (long long)err.detail);
    return rc;
}

static int suffix_is(const sf_change *c, const char *s, size_t len)
{
    return c->has_suffix == 1 && c->suffix_len == (int64_t)len &&
           (len == 0 || (c->suffix != NULL && memcmp(c->suffix, s, len) == 0));
}

static void release(sf_change *c)
{
    sf_free(c->suffix);
    c->suffix = NULL;
}

static void check_append_kinds(sf_probe *probe)
{
    char path[1200], other[1200];
    sf_fp before, now;
    sf_change c;
    static uint8_t big[20000];
    size_t i;
    const int64_t W = 16;
    const int64_t SEC = 1000000000LL;

    for (i = 0; i < sizeof(big); i++)
        big[i] = (uint8_t)('A' + i % 23);
    join(path, sizeof(path), "check.jsonl");
    join(other, sizeof(other), "other.jsonl");
    REQUIRE(write_file(path, big, 1000) == 0);

    /* UNCHANGED */
    before = fp_of(path, W);
    REQUIRE(check(probe, path, &before, W, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_UNCHANGED);
    CHECK(fp_equal(&c.after, &before));
    CHECK_I(c.has_suffix, 0);
    CHECK(c.suffix == NULL);

    /* APPENDED with its suffix; `after` is the new fingerprint. */
    REQUIRE(append_file(path, "appended!\n", 10) == 0);
    REQUIRE(check(probe, path, &before, W, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_APPENDED);
    CHECK(suffix_is(&c, "appended!\n", 10));
    now = fp_of(path, W);
    CHECK(fp_equal(&c.after, &now));
    release(&c);

    /* APPENDED with a suffix larger than max_suffix: no bytes, still APPENDED. */
    REQUIRE(check(probe, path, &before, W, 9, &c) == 0);
    CHECK_I(c.kind, SF_APPENDED);
    CHECK_I(c.has_suffix, 0);
    CHECK(c.suffix == NULL);
    CHECK(fp_equal(&c.after, &now));

    /* max_suffix exactly the suffix: bytes returned. */
    REQUIRE(check(probe, path, &before, W, 10, &c) == 0);
    CHECK(suffix_is(&c, "appended!\n", 10));
    release(&c);

    /* An edit outside the old window followed by an append is still APPENDED. */
    before = fp_of(path, W);
    REQUIRE(pwrite_file(path, 0, "#", 1) == 0);
    REQUIRE(append_file(path, "more\n", 5) == 0);
    REQUIRE(check(probe, path, &before, W, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_APPENDED);
    CHECK(suffix_is(&c, "more\n", 5));
    release(&c);

    /* A larger window for `after` than `before` used. */
    REQUIRE(check(probe, path, &before, 4096, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_APPENDED);
    now = fp_of(path, 4096);
    CHECK(fp_equal(&c.after, &now));
    release(&c);

    /* TOUCHED: same bytes, times moved. */
    before = fp_of(path, W);
    REQUIRE(shift_mtime(path, &before, -5 * SEC) == 0);
    REQUIRE(check(probe, path, &before, W, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_TOUCHED);
    CHECK_I(c.has_suffix, 0);
    CHECK(c.after.mtime_ns != before.mtime_ns);

    /* Same size, edit outside the tail window: TOUCHED (the controller's business). */
    before = fp_of(path, W);
    REQUIRE(pwrite_file(path, 1, "!", 1) == 0);
    REQUIRE(shift_mtime(path, &before, -7 * SEC) == 0);
    REQUIRE(check(probe, path, &before, W, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_TOUCHED);

    /* REWRITTEN at the same size: a byte inside the old tail window changed. */
    before = fp_of(path, W);
    REQUIRE(pwrite_file(path, before.size - 3, "Z", 1) == 0);
    REQUIRE(shift_mtime(path, &before, -9 * SEC) == 0);
    REQUIRE(check(probe, path, &before, W, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_REWRITTEN);
    CHECK_I(c.has_suffix, 0);

    /* Same size, tail changed, times forced back to the old values: UNCHANGED by rule
       (only the ctime can say otherwise; POSIX moves it, so accept either here). */

    /* REWRITTEN on growth, suffix within max_suffix and beyond it. */
    before = fp_of(path, W);
    REQUIRE(pwrite_file(path, before.size - 1, "Q", 1) == 0);
    REQUIRE(append_file(path, "tail\n", 5) == 0);
    REQUIRE(check(probe, path, &before, W, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_REWRITTEN);
    CHECK_I(c.has_suffix, 0);
    CHECK(c.suffix == NULL);
    REQUIRE(check(probe, path, &before, W, 2, &c) == 0);
    CHECK_I(c.kind, SF_REWRITTEN);
    CHECK_I(c.has_suffix, 0);

    /* A big append with a big old window: read in one span. */
    before = fp_of(path, 4096);
    REQUIRE(append_file(path, big, sizeof(big)) == 0);
    REQUIRE(check(probe, path, &before, 4096, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_APPENDED);
    CHECK_I(c.suffix_len, (int64_t)sizeof(big));
    CHECK(c.suffix != NULL && memcmp(c.suffix, big, sizeof(big)) == 0);
    release(&c);
    REQUIRE(check(probe, path, &before, 4096, 100, &c) == 0);
    CHECK_I(c.kind, SF_APPENDED);
    CHECK_I(c.has_suffix, 0);

    /* TRUNCATED */
    before = fp_of(path, W);
    REQUIRE(truncate_file(path, 10) == 0);
    REQUIRE(check(probe, path, &before, W, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_TRUNCATED);
    now = fp_of(path, W);
    CHECK(fp_equal(&c.after, &now));
    /* ... and truncated to nothing. */
    before = now;
    REQUIRE(truncate_file(path, 0) == 0);
    REQUIRE(check(probe, path, &before, W, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_TRUNCATED);
    CHECK_I(c.after.tail_len, 0);
    CHECK_U(c.after.tail_hash, EMPTY_XXH3_64);

    /* Growth from empty: APPENDED, old window empty. */
    before = fp_of(path, W);
    REQUIRE(append_file(path, "first\n", 6) == 0);
    REQUIRE(check(probe, path, &before, W, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_APPENDED);
    CHECK(suffix_is(&c, "first\n", 6));
    release(&c);

    /* REPLACED: another file renamed over the path. */
    before = fp_of(path, W);
    REQUIRE(write_file(other, "first\nsecond\n", 13) == 0);
    REQUIRE(replace_held(probe, other, path) == 0);
    REQUIRE(check(probe, path, &before, W, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_REPLACED);
    CHECK_I(c.has_suffix, 0);
    now = fp_of(path, W);
    CHECK(fp_equal(&c.after, &now));

    /* DELETED, then missing -> missing (UNCHANGED with a MISSING after). */
    before = now;
    REQUIRE(unlink_held(probe, path) == 0);
    REQUIRE(check(probe, path, &before, W, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_DELETED);
    CHECK_I(c.after.exists, 0);
    {
        sf_fp missing;
        memset(&missing, 0, sizeof(missing));
        REQUIRE(check(probe, path, &missing, W, 1 << 20, &c) == 0);
        CHECK_I(c.kind, SF_UNCHANGED);
        CHECK_I(c.after.exists, 0);
        CHECK_I(c.has_suffix, 0);

        /* CREATED: the whole content; b"" for an empty file; none when too large. */
        REQUIRE(write_file(path, "hello\n", 6) == 0);
        REQUIRE(check(probe, path, &missing, W, 1 << 20, &c) == 0);
        CHECK_I(c.kind, SF_CREATED);
        CHECK(suffix_is(&c, "hello\n", 6));
        now = fp_of(path, W);
        CHECK(fp_equal(&c.after, &now));
        release(&c);
        REQUIRE(check(probe, path, &missing, W, 5, &c) == 0);
        CHECK_I(c.kind, SF_CREATED);
        CHECK_I(c.has_suffix, 0);
        CHECK(fp_equal(&c.after, &now));
        REQUIRE(write_file(path, "", 0) == 0);
        REQUIRE(check(probe, path, &missing, W, 1 << 20, &c) == 0);
        CHECK_I(c.kind, SF_CREATED);
        CHECK(suffix_is(&c, "", 0));
        release(&c);
        REQUIRE(write_file(path, big, sizeof(big)) == 0);
        REQUIRE(check(probe, path, &missing, W, 100, &c) == 0);
        CHECK_I(c.kind, SF_CREATED);
        CHECK_I(c.has_suffix, 0);
        CHECK_I(c.after.tail_len, W);
        CHECK_U(c.after.tail_hash, sf_xxh3_64(big + sizeof(big) - W, (size_t)W));
    }
}

static void test_check_append(void)
{
    sf_probe probe;
    char path[1200], dir[1200];
    sf_fp before;
    sf_change c;
    sf_err err;

    check_append_kinds(NULL);
    sf_probe_init(&probe);
    probe.racy_ns = -1;
    check_append_kinds(&probe);
    sf_probe_close(&probe);

    /* Argument errors. */
    join(path, sizeof(path), "check.jsonl");
    join(dir, sizeof(dir), "dir");
    REQUIRE(write_file(path, "abc\n", 4) == 0);
    before = fp_of(path, 4);
    err = fresh_err();
    CHECK_I(sf_check_append(NULL, path, &before, -1, 10, &c, &err), -1);
    CHECK_I(err.code, SF_EVALUE);
    err = fresh_err();
    CHECK_I(sf_check_append(NULL, path, &before, 4, -1, &c, &err), -1);
    CHECK_I(err.code, SF_EVALUE);
    CHECK_I(err.detail, -1);
    before.tail_len = before.size + 1;
    err = fresh_err();
    CHECK_I(sf_check_append(NULL, path, &before, 4, 10, &c, &err), -1);
    CHECK_I(err.code, SF_EVALUE);
    before = fp_of(path, 4);
    before.size = -1;
    err = fresh_err();
    CHECK_I(sf_check_append(NULL, path, &before, 4, 10, &c, &err), -1);
    CHECK_I(err.code, SF_EVALUE);
    before = fp_of(path, 4);
    err = fresh_err();
    CHECK_I(sf_check_append(NULL, dir, &before, 4, 10, &c, &err), -1);
    CHECK_I(err.code, SF_EOS);
    CHECK_I(err.sys_errno, EISDIR);
}

static void read_range_cases(sf_probe *probe)
{
    char path[1200], missing[1200];
    uint8_t buf[64];
    sf_err err;

    join(path, sizeof(path), "range.bin");
    join(missing, sizeof(missing), "range-missing.bin");
    REQUIRE(write_file(path, "0123456789", 10) == 0);

    memset(buf, 0, sizeof(buf));
    err = fresh_err();
    CHECK_I(sf_read_range(probe, path, 0, 5, buf, &err), 0);
    CHECK(memcmp(buf, "01234", 5) == 0);
    CHECK_I(sf_read_range(probe, path, 7, 3, buf, &err), 0);
    CHECK(memcmp(buf, "789", 3) == 0);
    CHECK_I(sf_read_range(probe, path, 10, 0, buf, &err), 0);
    CHECK_I(sf_read_range(probe, path, 0, 0, buf, &err), 0);

    err = fresh_err();
    CHECK_I(sf_read_range(probe, path, 9, 2, buf, &err), -1);
    CHECK_I(err.code, SF_ESHORT);
    CHECK_I(err.detail, 10);
    err = fresh_err();
    CHECK_I(sf_read_range(probe, path, 11, 0, buf, &err), -1);
    CHECK_I(err.code, SF_ESHORT);
    err = fresh_err();
    CHECK_I(sf_read_range(probe, path, INT64_MAX, 1, buf, &err), -1);
    CHECK_I(err.code, SF_ESHORT);
    err = fresh_err();
    CHECK_I(sf_read_range(probe, path, 0, INT64_MAX, buf, &err), -1);
    CHECK_I(err.code, SF_ESHORT);
    err = fresh_err();
    CHECK_I(sf_read_range(probe, path, -1, 1, buf, &err), -1);
    CHECK_I(err.code, SF_EVALUE);
    err = fresh_err();
    CHECK_I(sf_read_range(probe, path, 0, -1, buf, &err), -1);
    CHECK_I(err.code, SF_EVALUE);
    err = fresh_err();
    CHECK_I(sf_read_range(probe, missing, 0, 1, buf, &err), -1);
    CHECK_I(err.code, SF_EOS);
    CHECK_I(err.sys_errno, ENOENT);

    /* The path, not the first file: after a replacement the new bytes are read. */
    REQUIRE(write_file(missing, "abcdefghij", 10) == 0);
    REQUIRE(replace_held(probe, missing, path) == 0);
    CHECK_I(sf_read_range(probe, path, 2, 3, buf, &err), 0);
    CHECK(memcmp(buf, "cde", 3) == 0);
}

static void test_read_range(void)
{
    sf_probe probe;
    read_range_cases(NULL);
    sf_probe_init(&probe);
    read_range_cases(&probe);
    sf_probe_close(&probe);
}

/*
 * The block digest's definition, from one-shot XXH3-128 calls (sf_xxh3_128), for the
 * block states (sf_bdigest_new) to be checked against: with H = XXH3-128 in canonical big-endian
 * bytes, XXH3-128(H(block 1) || ... || H(block k) || H(rest) || le64(len)).
 */
static void canonical128(uint64_t hi, uint64_t lo, uint8_t out[16])
{
    int i;
    for (i = 0; i < 8; i++) {
        out[i] = (uint8_t)(hi >> (56 - 8 * i));
        out[8 + i] = (uint8_t)(lo >> (56 - 8 * i));
    }
}

static uint8_t *block_hashes(const uint8_t *data, size_t len, size_t *count)
{
    size_t k = len / SF_DIGEST_BLOCK, i;
    uint8_t *out = (uint8_t *)malloc(16 * (k + 1));
    uint64_t hi, lo;
    if (out == NULL)
        return NULL;
    for (i = 0; i < k; i++) {
        sf_xxh3_128(data + i * SF_DIGEST_BLOCK, SF_DIGEST_BLOCK, &hi, &lo);
        canonical128(hi, lo, out + 16 * i);
    }
    *count = k;
    return out;
}

static int ref_digest(const uint8_t *data, size_t len, uint64_t *hi, uint64_t *lo)
{
    size_t k = 0, i;
    uint8_t *hashes = block_hashes(data, len, &k);
    uint8_t *joined;
    uint64_t h, l;
    if (hashes == NULL)
        return -1;
    joined = (uint8_t *)malloc(16 * (k + 1) + 8);
    if (joined == NULL) {
        free(hashes);
        return -1;
    }
    memcpy(joined, hashes, 16 * k);
    sf_xxh3_128(data + k * SF_DIGEST_BLOCK, len - k * SF_DIGEST_BLOCK, &h, &l);
    canonical128(h, l, joined + 16 * k);
    for (i = 0; i < 8; i++)
        joined[16 * (k + 1) + i] = (uint8_t)((uint64_t)len >> (8 * i));
    sf_xxh3_128(joined, 16 * (k + 1) + 8, hi, lo);
    free(joined);
    free(hashes);
    return 0;
}

static void test_digests(void)
{
    char path[1200], missing[1200];
    /* more than two 1 MiB digest blocks, and than eight 256 KiB read chunks */
    enum { DATA_LEN = 2 * SF_DIGEST_BLOCK + 3 };
    static const struct {
        size_t len;
        uint64_t hi, lo;
    } vectors[] = {{0, 0x0532AD8675074226ULL, 0x704FF6CFBD05C2E8ULL},
                   {1, 0x78DC71F1613A3D95ULL, 0x4C6772CE20003542ULL},
                   {2240, 0x545F418229018F33ULL, 0x7EE91DFA5F3157B0ULL},
                   {SF_DIGEST_BLOCK - 1, 0x6E59A0DB95D0D667ULL, 0x7733FE83D02684C1ULL},
                   {SF_DIGEST_BLOCK, 0xF2FF66189C04B487ULL, 0x96DA90A955AE2C45ULL},
                   {DATA_LEN, 0x831FD0E831603587ULL, 0x11BE8BD981621CC5ULL}};
    static const size_t steps[] = {1, 7919, 256 * 1024, SF_DIGEST_BLOCK - 1, SF_DIGEST_BLOCK,
                                   SF_DIGEST_BLOCK + 1, DATA_LEN};
    uint8_t *data = (uint8_t *)malloc(DATA_LEN);
    uint64_t hi, lo, hi2, lo2;
    sf_err err;
    void *s, *s2;
    size_t i, j;

    REQUIRE(data != NULL);
    sanity_buffer(data, DATA_LEN);
    join(path, sizeof(path), "digest.bin");
    join(missing, sizeof(missing), "digest-missing.bin");
    REQUIRE(write_file(path, data, DATA_LEN) == 0);

    /* Block digests: pinned vectors over prefixes of the file (size argument), and the
       reference; sf_content_digest is the plain XXH3-128 of the same prefix. */
    for (i = 0; i < sizeof(vectors) / sizeof(vectors[0]); i++) {
        err = fresh_err();
        s = sf_bdigest_new();
        REQUIRE(s != NULL);
        CHECK_I(sf_digest_update_file(s, path, (int64_t)vectors[i].len, &err), 0);
        CHECK_I(sf_digest_value(s, &hi, &lo), 0);
        sf_digest_free(s);
        CHECK_U(hi, vectors[i].hi);
        CHECK_U(lo, vectors[i].lo);
        REQUIRE(ref_digest(data, vectors[i].len, &hi2, &lo2) == 0);
        CHECK_U(hi2, vectors[i].hi);
        CHECK_U(lo2, vectors[i].lo);
        CHECK_I(sf_content_digest(path, (int64_t)vectors[i].len, &hi, &lo, &err), 0);
        sf_xxh3_128(data, vectors[i].len, &hi2, &lo2);
        CHECK_U(hi, hi2);
        CHECK_U(lo, lo2);
    }
    /* Block digests streamed in pieces of every size equal the reference. */
    REQUIRE(ref_digest(data, DATA_LEN, &hi, &lo) == 0);
    for (j = 0; j < sizeof(steps) / sizeof(steps[0]); j++) {
        int failed = 0;
        s = sf_bdigest_new();
        REQUIRE(s != NULL);
        for (i = 0; i < DATA_LEN; i += steps[j]) {
            size_t n = DATA_LEN - i < steps[j] ? DATA_LEN - i : steps[j];
            failed |= sf_digest_update(s, data + i, n) != 0;
        }
        CHECK(!failed);
        CHECK_I(sf_digest_value(s, &hi2, &lo2), 0);
        CHECK_U(hi, hi2);
        CHECK_U(lo, lo2);
        s2 = sf_digest_copy(s); /* a copy keeps the mode */
        REQUIRE(s2 != NULL);
        CHECK_I(sf_digest_value(s2, &hi2, &lo2), 0);
        CHECK_U(hi, hi2);
        sf_digest_free(s2);
        sf_digest_free(s);
    }

    /* Plain: whole file (-1) == one-shot XXH3-128 == streamed in pieces of every size. */
    err = fresh_err();
    CHECK_I(sf_content_digest(path, -1, &hi, &lo, &err), 0);
    sf_xxh3_128(data, DATA_LEN, &hi2, &lo2);
    CHECK_U(hi, hi2);
    CHECK_U(lo, lo2);
    for (j = 0; j < sizeof(steps) / sizeof(steps[0]); j++) {
        int failed = 0;
        s = sf_digest_new();
        REQUIRE(s != NULL);
        for (i = 0; i < DATA_LEN; i += steps[j]) {
            size_t n = DATA_LEN - i < steps[j] ? DATA_LEN - i : steps[j];
            failed |= sf_digest_update(s, data + i, n) != 0;
        }
        CHECK(!failed);
        CHECK_I(sf_digest_update(s, NULL, 0), 0);
        CHECK_I(sf_digest_value(s, &hi2, &lo2), 0);
        CHECK_U(hi, hi2);
        CHECK_U(lo, lo2);
        sf_digest_free(s);
    }

    /* Rolling forward: a prefix from the file, then the appended bytes. */
    s = sf_digest_new();
    REQUIRE(s != NULL);
    CHECK_I(sf_digest_update_file(s, path, 1300000, &err), 0);
    s2 = sf_digest_copy(s);
    REQUIRE(s2 != NULL);
    CHECK_I(sf_digest_update(s, data + 1300000, DATA_LEN - 1300000), 0);
    CHECK_I(sf_digest_value(s, &hi2, &lo2), 0);
    CHECK_U(hi, hi2);
    CHECK_U(lo, lo2);
    /* The copy is independent: still the 1300000-byte prefix. */
    CHECK_I(sf_digest_value(s2, &hi2, &lo2), 0);
    {
        uint64_t ph, pl;
        CHECK_I(sf_content_digest(path, 1300000, &ph, &pl, &err), 0);
        CHECK_U(hi2, ph);
        CHECK_U(lo2, pl);
    }
    sf_digest_free(s2);
    sf_digest_free(s);
    sf_digest_free(NULL);

    /* From block hashes: j whole blocks' hashes plus the bytes after them, any j. */
    {
        size_t k = 0;
        uint8_t *hashes = block_hashes(data, DATA_LEN, &k);
        uint64_t bh, bl;
        REQUIRE(hashes != NULL);
        REQUIRE(ref_digest(data, DATA_LEN, &bh, &bl) == 0);
        CHECK_I((int64_t)k, 2);
        s = sf_digest_new(); /* a plain state takes no block hashes */
        REQUIRE(s != NULL);
        CHECK_I(sf_digest_add_blocks(s, hashes, 1), -1);
        sf_digest_free(s);
        for (j = 0; j <= k; j++) {
            s = sf_bdigest_new();
            REQUIRE(s != NULL);
            CHECK_I(sf_digest_add_blocks(s, hashes, j), 0);
            CHECK_I(sf_digest_update(s, data + j * SF_DIGEST_BLOCK,
                                     DATA_LEN - j * SF_DIGEST_BLOCK), 0);
            CHECK_I(sf_digest_value(s, &hi2, &lo2), 0);
            CHECK_U(bh, hi2);
            CHECK_U(bl, lo2);
            /* Refused once a partial block was fed (the hashes would land mid-block). */
            if (j < k)
                CHECK_I(sf_digest_add_blocks(s, hashes, 1), -1);
            sf_digest_free(s);
        }
        s = sf_bdigest_new();
        REQUIRE(s != NULL);
        CHECK_I(sf_digest_add_blocks(s, NULL, 0), 0);
        CHECK_I(sf_digest_add_blocks(s, NULL, 1), -1);
        CHECK_I(sf_digest_update(s, NULL, 1), -1);
        CHECK_I(sf_digest_add_blocks(s, hashes, 2), 0);
        /* A whole-block update keeps the state at a boundary: more hashes are fine. */
        CHECK_I(sf_digest_update(s, data, SF_DIGEST_BLOCK), 0);
        CHECK_I(sf_digest_add_blocks(s, hashes, 1), 0);
        sf_digest_free(s);
        free(hashes);
    }

    /* Whole file through update_file(-1). */
    s = sf_digest_new();
    REQUIRE(s != NULL);
    CHECK_I(sf_digest_update_file(s, path, -1, &err), 0);
    CHECK_I(sf_digest_value(s, &hi2, &lo2), 0);
    CHECK_U(hi, hi2);
    CHECK_U(lo, lo2);

    /* Errors: shorter than asked, missing, bad size, directory. */
    err = fresh_err();
    CHECK_I(sf_digest_update_file(s, path, (int64_t)DATA_LEN + 1, &err), -1);
    CHECK_I(err.code, SF_ESHORT);
    CHECK_I(err.detail, (int64_t)DATA_LEN);
    sf_digest_free(s);
    err = fresh_err();
    CHECK_I(sf_content_digest(path, (int64_t)DATA_LEN + 1, &hi, &lo, &err), -1);
    CHECK_I(err.code, SF_ESHORT);
    err = fresh_err();
    CHECK_I(sf_content_digest(missing, -1, &hi, &lo, &err), -1);
    CHECK_I(err.code, SF_EOS);
    CHECK_I(err.sys_errno, ENOENT);
    err = fresh_err();
    CHECK_I(sf_content_digest(path, -2, &hi, &lo, &err), -1);
    CHECK_I(err.code, SF_EVALUE);
    {
        char dir[1200];
        join(dir, sizeof(dir), "dir");
        err = fresh_err();
        CHECK_I(sf_content_digest(dir, -1, &hi, &lo, &err), -1);
        CHECK_I(err.code, SF_EOS);
        CHECK_I(err.sys_errno, EISDIR);
    }
    free(data);
}

/* 64-bit offsets: a sparse file past 4 GiB (OVERLAPPED.OffsetHigh, off_t on 32-bit). */
static void test_large_offsets(void)
{
    char path[1200];
    const int64_t size = (5LL << 30) + 123;
    sf_fp fp;
    sf_change c;
    uint8_t buf[8];
    sf_err err = fresh_err();

    join(path, sizeof(path), "sparse.bin");
    REQUIRE(write_file(path, "", 0) == 0);
    if (truncate_file(path, size - 4) != 0) {
        note("cannot make a 5 GiB sparse file here: large-offset case skipped");
        (void)unlink_file(path);
        return;
    }
    REQUIRE(append_file(path, "TAIL", 4) == 0);
    fp = fp_of(path, 4);
    CHECK_I(fp.size, size);
    CHECK_U(fp.tail_hash, sf_xxh3_64((const uint8_t *)"TAIL", 4));
    CHECK_I(sf_read_range(NULL, path, size - 6, 6, buf, &err), 0);
    CHECK(memcmp(buf, "\0\0TAIL", 6) == 0);
    REQUIRE(append_file(path, "MORE", 4) == 0);
    REQUIRE(check(NULL, path, &fp, 4, 16, &c) == 0);
    CHECK_I(c.kind, SF_APPENDED);
    CHECK(suffix_is(&c, "MORE", 4));
    release(&c);
    REQUIRE(unlink_file(path) == 0);
}

/* ctime is the status-change time (Windows: ChangeTime, never the creation time). */
static void test_ctime_is_change_time(void)
{
    char path[1200];
    sf_fp before, after;
    sf_change c;
    native_stat ns;
    int i;

    join(path, sizeof(path), "meta.jsonl");
    REQUIRE(write_file(path, "meta\n", 5) == 0);
    before = fp_of(path, 4096);
    after = before;
    for (i = 0; i < 200 && after.ctime_ns == before.ctime_ns; i++) {
        sleep_ms(10);
        REQUIRE(touch_metadata(path) == 0);
        after = fp_of(path, 4096);
    }
    REQUIRE(native(path, &ns) == 0);
#ifdef _WIN32
    if (ns.ctime_ns == 0) {
        note("this volume records no ChangeTime: ctime case skipped");
        return;
    }
#endif
    CHECK(after.ctime_ns != before.ctime_ns);
    CHECK_I(after.mtime_ns, before.mtime_ns);
    CHECK_I(after.ctime_ns, ns.ctime_ns);
#ifdef _WIN32
    CHECK(after.ctime_ns != ns.birth_ns);
#endif
    REQUIRE(check(NULL, path, &before, 4096, 1 << 20, &c) == 0);
    CHECK_I(c.kind, SF_TOUCHED);
}

/* Another process may append to, rename over and delete a file a probe holds open. */
static void test_share_modes(void)
{
    char path[1200], tmp[1200];
    sf_probe probe;
    sf_fp fp;
    sf_err err = fresh_err();
    int32_t same;

    join(path, sizeof(path), "share.jsonl");
    join(tmp, sizeof(tmp), "share.tmp");
    REQUIRE(write_file(path, "held\n", 5) == 0);
    sf_probe_init(&probe);
    probe.racy_ns = -1;
    REQUIRE(sf_probe_fingerprint(&probe, path, 4096, &fp, &same, &err) == 0);
    CHECK(probe.handle != -1);
    CHECK_I(append_file(path, "more\n", 5), 0);       /* FILE_SHARE_WRITE */
    CHECK_I(write_file(tmp, "new\n", 4), 0);
    CHECK_I(replace_held(&probe, tmp, path), 0);      /* FILE_SHARE_DELETE (target) */
    REQUIRE(sf_probe_fingerprint(&probe, path, 4096, &fp, &same, &err) == 0);
    CHECK_I(fp.size, 4);
    CHECK_I(rename_file(path, tmp), 0);               /* FILE_SHARE_DELETE (source) */
    CHECK_I(unlink_file(tmp), 0);                     /* FILE_SHARE_DELETE */
    REQUIRE(sf_probe_fingerprint(&probe, path, 4096, &fp, &same, &err) == 0);
    CHECK_I(fp.exists, 0);
    sf_probe_close(&probe);
}

/* Non-ASCII names travel as UTF-8 (Windows: converted to UTF-16 by sessionfence.c). */
static void test_unicode_path(void)
{
    char path[1200];
    sf_fp fp;
    join(path, sizeof(path), "na\xc3\xafve-\xe2\x82\xac-\xf0\x9f\x98\x80.jsonl");
    REQUIRE(write_file(path, "unicode\n", 8) == 0);
    fp = fp_of(path, 4096);
    CHECK_I(fp.exists, 1);
    CHECK_I(fp.size, 8);
    REQUIRE(unlink_file(path) == 0);
#ifdef _WIN32
    {
        /* An invalid UTF-8 path is an error (EINVAL), never another file. */
        sf_err err = fresh_err();
        char bad[1200];
        join(bad, sizeof(bad), "bad-\xff.jsonl");
        CHECK_I(sf_fingerprint(bad, 4096, &fp, &err), -1);
        CHECK_I(err.code, SF_EOS);
        CHECK_I(err.sys_errno, EINVAL);
        CHECK_I(err.winerror, ERROR_NO_UNICODE_TRANSLATION);
    }
#endif
}

#ifdef SF_TESTING
static int utf16_is(const char *s, const uint16_t *want, size_t n)
{
    uint16_t out[16];
    size_t got = sf_utf8_to_utf16(s, NULL);
    if (got != n + 1 || got > 16)
        return 0;
    if (sf_utf8_to_utf16(s, out) != n + 1)
        return 0;
    return memcmp(out, want, n * sizeof(uint16_t)) == 0 && out[n] == 0;
}

static void test_utf8_decoder(void)
{
    static const uint16_t ascii[] = {'a', '/', 'b'};
    static const uint16_t two[] = {0x00EF};
    static const uint16_t three[] = {0x20AC};
    static const uint16_t four[] = {0xD83D, 0xDE00};
    static const uint16_t lone_hi[] = {'x', 0xD800, 'y'};
    static const uint16_t lone_lo[] = {0xDFFF};
    static const uint16_t pair_cesu[] = {0xD83D, 0xDE00}; /* two "surrogatepass" halves */
    static const uint16_t max[] = {0xDBFF, 0xDFFF};
    CHECK(utf16_is("", ascii, 0));
    CHECK(utf16_is("a/b", ascii, 3));
    CHECK(utf16_is("\xc3\xaf", two, 1));
    CHECK(utf16_is("\xe2\x82\xac", three, 1));
    CHECK(utf16_is("\xf0\x9f\x98\x80", four, 2));
    CHECK(utf16_is("x\xed\xa0\x80y", lone_hi, 3));
    CHECK(utf16_is("\xed\xbf\xbf", lone_lo, 1));
    CHECK(utf16_is("\xed\xa0\xbd\xed\xb8\x80", pair_cesu, 2));
    CHECK(utf16_is("\xf4\x8f\xbf\xbf", max, 2));
    /* What Python never produces: rejected, never replaced. */
    CHECK_I(sf_utf8_to_utf16("\xff", NULL), 0);
    CHECK_I(sf_utf8_to_utf16("\x80", NULL), 0);
    CHECK_I(sf_utf8_to_utf16("\xc0\x80", NULL), 0);         /* overlong NUL */
    CHECK_I(sf_utf8_to_utf16("\xe0\x80\xaf", NULL), 0);     /* overlong '/' */
    CHECK_I(sf_utf8_to_utf16("\xf0\x80\x80\xaf", NULL), 0); /* overlong '/' */
    CHECK_I(sf_utf8_to_utf16("\xf4\x90\x80\x80", NULL), 0); /* > U+10FFFF */
    CHECK_I(sf_utf8_to_utf16("a\xe2\x82", NULL), 0);        /* truncated */
    CHECK_I(sf_utf8_to_utf16("\xe2\x82z", NULL), 0);
}

static void test_filetime(void)
{
    const int64_t epoch = 116444736000000000LL;
    CHECK_I(sf_filetime_to_ns(0), 0);
    CHECK_I(sf_filetime_to_ns(epoch), 0);
    CHECK_I(sf_filetime_to_ns(epoch + 1), 100);
    CHECK_I(sf_filetime_to_ns(epoch - 1), -100);
    CHECK_I(sf_filetime_to_ns(epoch + 17000000000000000LL), 1700000000000000000LL);
    CHECK_I(sf_filetime_to_ns(1), INT64_MIN);          /* 1601: below int64 ns */
    CHECK_I(sf_filetime_to_ns(INT64_MAX), INT64_MAX);  /* 30828: above */
    CHECK_I(sf_filetime_to_ns(-5), INT64_MIN);
    CHECK_I(sf_filetime_to_ns(INT64_MIN), INT64_MIN);
}
#endif

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (make_tmpdir() != 0) {
        fprintf(stderr, "cannot create a temporary directory\n");
        return 2;
    }
    printf("sessionfence C tests (library %s) in %s\n", sf_version(), tmpdir);

#define RUN(t)                                                                              \
    do {                                                                                    \
        int before_ = n_failed;                                                             \
        t();                                                                                \
        printf("%-28s %s\n", #t, n_failed == before_ ? "ok" : "FAILED");                   \
    } while (0)
    RUN(test_version_and_free);
    RUN(test_xxh3_vectors);
    RUN(test_utf8_invalid_at);
    RUN(test_fingerprint);
    RUN(test_fingerprint_many);
    RUN(test_probe);
    RUN(test_check_append);
    RUN(test_read_range);
    RUN(test_digests);
    RUN(test_large_offsets);
    RUN(test_ctime_is_change_time);
    RUN(test_share_modes);
    RUN(test_unicode_path);
#ifdef SF_TESTING
    RUN(test_utf8_decoder);
    RUN(test_filetime);
#endif
#undef RUN

    cleanup();
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed == 0 ? 0 : 1;
}
