/*
 * Shared helpers for the C API test programs in tests/c/. Include this first (it sets the
 * POSIX feature macro before any system header).
 *
 * Every program is run as `prog <fixtures dir> <work dir>`: the fixtures dir is
 * tests/fixtures, the work dir a fresh empty directory the program may write into.
 *
 * This header defines main(): it runs the program's `static int test_main(int, char **)` on a
 * fresh thread and joins it. LeakSanitizer treats every word on a live thread's stack as a
 * root, and stale copies of pointers left in dead stack frames of the main thread would hide a
 * missing hdb_*_free; a joined thread's stack is no longer scanned, so any hdb object the
 * program forgot (or hdb failed) to free is reported.
 *
 * CHECK(cond, fmt, ...) prints "ok N: <what>" and counts the check, or prints
 * "FAIL file:line: <what>" with hdb_last_error_message() and exits with status 1 at once
 * (via _Exit, so a failure is not buried under leak reports of the objects it did not free).
 */
#ifndef HDB_TEST_COMMON_H
#define HDB_TEST_COMMON_H

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "hdb.h"

static int g_checks = 0;

static inline void test_fail(const char *file, int line, const char *cond, const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "FAIL %s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n  condition: %s\n  hdb_last_error_message(): '%s'\n", cond,
            hdb_last_error_message());
    fflush(stderr);
    _Exit(1);
}

static inline void test_ok(const char *fmt, ...) {
    va_list ap;
    g_checks++;
    printf("ok %d: ", g_checks);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}

#define CHECK(cond, ...)                                        \
    do {                                                        \
        if (cond) {                                             \
            test_ok(__VA_ARGS__);                               \
        } else {                                                \
            test_fail(__FILE__, __LINE__, #cond, __VA_ARGS__);  \
        }                                                       \
    } while (0)

/* Checks that `call` returns `want`; on mismatch names both statuses. */
#define CHECK_STATUS(call, want, ...)                                                        \
    do {                                                                                     \
        hdb_status check_status_got_ = (call);                                               \
        hdb_status check_status_want_ = (want);                                              \
        if (check_status_got_ == check_status_want_) {                                       \
            test_ok(__VA_ARGS__);                                                            \
        } else {                                                                             \
            fflush(stdout);                                                                  \
            fprintf(stderr, "FAIL %s:%d: %s returned %s (%u), expected %s (%u)\n", __FILE__, \
                    __LINE__, #call, hdb_status_name(check_status_got_),                     \
                    (unsigned)check_status_got_, hdb_status_name(check_status_want_),        \
                    (unsigned)check_status_want_);                                           \
            test_fail(__FILE__, __LINE__, #call, __VA_ARGS__);                               \
        }                                                                                    \
    } while (0)

static inline bool last_error_contains(const char *needle) {
    const char *m = hdb_last_error_message();
    return m != NULL && strstr(m, needle) != NULL;
}

static inline bool last_error_nonempty(void) {
    const char *m = hdb_last_error_message();
    return m != NULL && m[0] != '\0';
}

/* Checks that hdb_last_error_message() contains `needle`. */
#define CHECK_MSG(needle, ...)                                                             \
    do {                                                                                   \
        const char *check_msg_needle_ = (needle);                                          \
        if (last_error_contains(check_msg_needle_)) {                                      \
            test_ok(__VA_ARGS__);                                                          \
        } else {                                                                           \
            fflush(stdout);                                                                \
            fprintf(stderr, "FAIL %s:%d: the last error message lacks '%s'\n", __FILE__, \
                    __LINE__, check_msg_needle_);                                          \
            test_fail(__FILE__, __LINE__, "last_error_contains(" #needle ")", __VA_ARGS__); \
        }                                                                                  \
    } while (0)

/* Strict UTF-8 validation (no overlongs, no surrogates, at most U+10FFFF). */
static inline bool utf8_valid(const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned c = *p;
        int n;
        unsigned min;
        if (c < 0x80) {
            p++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            n = 1, min = 0x80, c &= 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            n = 2, min = 0x800, c &= 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            n = 3, min = 0x10000, c &= 0x07;
        } else {
            return false;
        }
        p++;
        for (int i = 0; i < n; i++, p++) {
            if ((*p & 0xC0) != 0x80) return false;
            c = (c << 6) | (*p & 0x3F);
        }
        if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return false;
    }
    return true;
}

/* `dir` + "/" + `name` into `out`; exits on truncation. */
static inline void path_join(char *out, size_t size, const char *dir, const char *name) {
    int n = snprintf(out, size, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= size) {
        fprintf(stderr, "FAIL: path too long: %s/%s\n", dir, name);
        _Exit(1);
    }
}

static inline void make_dir(const char *path) {
    if (mkdir(path, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "FAIL: mkdir %s: %s\n", path, strerror(errno));
        _Exit(1);
    }
}

static inline void write_file(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (f == NULL || (len > 0 && fwrite(data, 1, len, f) != len) || fclose(f) != 0) {
        fprintf(stderr, "FAIL: cannot write %s: %s\n", path, strerror(errno));
        _Exit(1);
    }
}

static inline void write_text(const char *path, const char *text) {
    write_file(path, text, strlen(text));
}

/*
 * Writes a safetensors file by hand: the 8-byte little-endian length of `header_json`, the
 * header, then `data_len` zero bytes of tensor data. `claimed_header_len` replaces the true
 * header length in the length field when non-zero (to fake a header longer than the file).
 */
static inline void write_safetensors_ex(const char *path, const char *header_json, size_t data_len,
                                        uint64_t claimed_header_len) {
    size_t hlen = strlen(header_json);
    uint64_t field = claimed_header_len ? claimed_header_len : (uint64_t)hlen;
    size_t total = 8 + hlen + data_len;
    unsigned char *buf = calloc(1, total);
    if (buf == NULL) {
        fprintf(stderr, "FAIL: out of memory\n");
        _Exit(1);
    }
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(field >> (8 * i));
    memcpy(buf + 8, header_json, hlen);
    write_file(path, buf, total);
    free(buf);
}

static inline void write_safetensors(const char *path, const char *header_json, size_t data_len) {
    write_safetensors_ex(path, header_json, data_len, 0);
}

/* Checks argv and returns (fixtures dir, work dir). */
static inline void parse_args(int argc, char **argv, const char **fixtures, const char **work) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s <tests/fixtures dir> <empty work dir>\n", argv[0]);
        _Exit(2);
    }
    *fixtures = argv[1];
    *work = argv[2];
    setvbuf(stdout, NULL, _IOLBF, 0);
}

static inline int test_done(const char *program) {
    printf("PASS %s: %d checks\n", program, g_checks);
    return 0;
}

static int test_main(int argc, char **argv);

typedef struct {
    int argc;
    char **argv;
    int rc;
} test_thread_args;

static void *test_thread(void *p) {
    test_thread_args *a = p;
    a->rc = test_main(a->argc, a->argv);
    return NULL;
}

int main(int argc, char **argv) {
    test_thread_args a = {argc, argv, 1};
    pthread_t t;
    int e = pthread_create(&t, NULL, test_thread, &a);
    if (e != 0) {
        fprintf(stderr, "FAIL: pthread_create: %s\n", strerror(e));
        return 1;
    }
    e = pthread_join(t, NULL);
    if (e != 0) {
        fprintf(stderr, "FAIL: pthread_join: %s\n", strerror(e));
        return 1;
    }
    return a.rc;
}

#endif /* HDB_TEST_COMMON_H */
