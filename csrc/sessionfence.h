/* SPDX-License-Identifier: MIT */
/*
 * sessionfence C hot path: stat + tail hash, append classification, positional reads
 * and XXH3-128 content digests (plain and block-structured). Every function is reentrant: no global
 * mutable state, because cffi calls them with the GIL released.
 *
 * Keep the declarations between the CDEF markers in sync with what cffi parses
 * (csrc/build_ffi.py extracts them from this file).
 */
#ifndef SESSIONFENCE_H
#define SESSIONFENCE_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
#define SF_OK 0
#define SF_EOS 1        /* OS error: see sys_errno / winerror */
#define SF_EVALUE 2     /* bad argument: see detail */
#define SF_EUNSTABLE 3  /* the file never held still */
#define SF_ENOMEM 4
#define SF_ESHORT 5     /* the file is shorter than asked: detail = its size */

#define SF_WINDOW_MAX 1048576
#define SF_DIGEST_BLOCK 1048576  /* block size of the content digest (see below) */
#define SF_RACY_NS 2000000000

#define SF_UNCHANGED 0
#define SF_APPENDED 1
#define SF_TOUCHED 2
#define SF_REWRITTEN 3
#define SF_TRUNCATED 4
#define SF_REPLACED 5
#define SF_CREATED 6
#define SF_DELETED 7

typedef struct sf_fp {
    int64_t exists;
    uint64_t dev;
    uint64_t ino;
    int64_t size;
    int64_t mtime_ns;
    int64_t ctime_ns;
    int64_t tail_len;
    uint64_t tail_hash;
} sf_fp;

typedef struct sf_err {
    int32_t code;
    int32_t sys_errno;
    int32_t winerror;
    int32_t where;      /* index of the failing path in sf_fingerprint_many */
    int64_t detail;
} sf_err;

typedef struct sf_probe {
    int64_t handle;     /* fd, or HANDLE on Windows; -1 when closed */
    uint64_t dev;
    uint64_t ino;
    int64_t has_last;
    sf_fp last;         /* last fingerprint returned, so unchanged polls can reuse it */
    int64_t read_at_ns; /* wall clock just before the read that produced `last` */
    int64_t racy_ns;    /* timestamp granularity margin of the racy-clean rule */
} sf_probe;

typedef struct sf_change {
    int32_t kind;
    int32_t has_suffix;
    sf_fp after;
    uint8_t *suffix;    /* malloc'd, release with sf_free */
    int64_t suffix_len;
} sf_change;

const char *sf_version(void);
uint64_t sf_xxh3_64(const uint8_t *buf, size_t len);
void sf_xxh3_128(const uint8_t *buf, size_t len, uint64_t *hi, uint64_t *lo);
void sf_free(void *ptr);

int sf_fingerprint(const char *path, int64_t window, sf_fp *out, sf_err *err);
int sf_fingerprint_many(const char *paths, int64_t count, int64_t window, sf_fp *out, sf_err *err);

void sf_probe_init(sf_probe *probe);
int sf_probe_fingerprint(sf_probe *probe, const char *path, int64_t window, sf_fp *out,
                         int32_t *same_as_last, sf_err *err);
void sf_probe_close(sf_probe *probe);
/*
 * Held-probe verdicts: the probe's last look (its `last` fingerprint, from
 * sf_probe_fingerprint, sf_probe_adopt or sf_probe_poll) is the baseline. sf_probe_adopt
 * makes a known fingerprint the baseline (never taken as racy-clean: its read time is
 * unknown). sf_probe_poll classifies the change since the baseline like sf_check_append
 * (an unchanged, racy-clean file costs one stat) and makes `out->after` the new baseline.
 * SF_EVALUE when the probe has no baseline yet.
 */
void sf_probe_adopt(sf_probe *probe, const sf_fp *fp);
int sf_probe_poll(sf_probe *probe, const char *path, int64_t window, int64_t max_suffix,
                  sf_change *out, sf_err *err);

/*
 * One poll of many files (a ManyProbe): `last` holds each file's fingerprint from the
 * previous poll (all zero = MISSING before the first), read at `read_at_ns` (INT64_MIN: no
 * previous poll). Each file costs one stat when it is racy-clean against `last`, else a
 * stable fingerprint. The new fingerprints go to `next` and, when every file succeeded, are
 * copied to `last`; `changed` gets the indices (ascending) of the files whose fingerprint
 * differs, `*n_changed` their count, `*started` the read time to pass to the next poll.
 * On an error nothing is copied and err->where names the failing file.
 */
int sf_many_poll(const char *paths, int64_t count, int64_t window, int64_t racy_ns,
                 int64_t read_at_ns, sf_fp *last, sf_fp *next, int64_t *changed,
                 int64_t *n_changed, int64_t *started, sf_err *err);

int sf_check_append(sf_probe *probe, const char *path, const sf_fp *before, int64_t window,
                    int64_t max_suffix, sf_change *out, sf_err *err);
int sf_read_range(sf_probe *probe, const char *path, int64_t offset, int64_t length,
                  uint8_t *buf, sf_err *err);

/*
 * Content digests. sf_content_digest and the states of sf_digest_new are the plain
 * XXH3-128 (seed 0) of the bytes (SPEC 2.3). The states of sf_bdigest_new are the
 * block-structured digest the fence keeps (SF_DIGEST_BLOCK-byte blocks, H = XXH3-128 seed
 * 0 in its canonical big-endian 16 bytes):
 *   XXH3-128( H(block 1) || ... || H(block k) || H(the bytes after block k) || le64(n) )
 * with k = n / SF_DIGEST_BLOCK, so it can be rebuilt from the hashes of the whole blocks
 * (sf_digest_add_blocks) and the bytes of the last partial one, without the others.
 * A state is not thread-safe; different states are independent. Every int function
 * returns 0, or -1 on failure (sf_digest_new / sf_bdigest_new / sf_digest_copy: NULL when
 * out of memory).
 */
int sf_content_digest(const char *path, int64_t size, uint64_t *hi, uint64_t *lo, sf_err *err);
void *sf_digest_new(void);
void *sf_bdigest_new(void);
void sf_digest_free(void *state);
void *sf_digest_copy(const void *state);
int sf_digest_update(void *state, const uint8_t *buf, size_t len);
/* `count` whole-block hashes (16 canonical bytes each) as if their blocks had been fed;
   -1 for a plain state or one not at a block boundary (a partial block was fed). */
int sf_digest_add_blocks(void *state, const uint8_t *hashes, size_t count);
int sf_digest_value(const void *state, uint64_t *hi, uint64_t *lo);
int sf_digest_update_file(void *state, const char *path, int64_t size, sf_err *err);
/*
 * Where strict UTF-8 decoding of buf[0, len) fails: the offset of the first byte of the
 * first malformed sequence (an invalid lead byte, a bad continuation byte, an overlong
 * form, a surrogate, a code point above U+10FFFF, or a sequence cut by the end), exactly
 * what Python's bytes.decode("utf-8") reports as the error's start; -1 when all of it is
 * valid. The transcript parser uses it to know a line needs no replacement characters.
 */
int64_t sf_utf8_invalid_at(const uint8_t *buf, size_t len);
/* CDEF-END */

#endif
