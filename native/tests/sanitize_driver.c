/* A test driver for the reference prover built with sanitizers (tests/test_native_sanitizers.py).
 *
 * It calls the ABI functions directly, without Python in the way, so that AddressSanitizer,
 * LeakSanitizer, UndefinedBehaviorSanitizer or ThreadSanitizer see every byte the prover
 * touches, over real sectors written by damocles_ext.post.fixtures, and on the error paths that
 * a normal run never takes: every allocation failing in turn, writes failing on a full disk,
 * and cancellation.
 *
 * It is linked with -Wl,--wrap=malloc,--wrap=calloc: only the prover's own allocations (and this
 * file's) go through the wrappers below, which fail the n-th one on request. OpenSSL's
 * allocations happen inside libcrypto and are not affected. And with -Wl,--wrap=pread, to make
 * the prover's n-th read find the end of its file.
 *
 *   sanitize_driver SCENARIO WORKDIR MINER WINDOW_TYPE WINNING_TYPE (ID COMM_R_HEX CACHE SEALED)...
 *
 * Scenarios: prove, nomem, nomem-openssl, write-failure, short-read, threads, cancel,
 * cancel-race. Exit 0 when every check holds; otherwise "FAIL: ..." on stderr and exit 1 (a
 * sanitizer report exits non-zero by itself).
 */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "dext_prover.h"

#define MAX_SECTORS 16

/* ---- allocation failure injection ------------------------------------------------------- */

void *__real_malloc(size_t size);
void *__real_calloc(size_t count, size_t size);
void *__wrap_malloc(size_t size);
void *__wrap_calloc(size_t count, size_t size);

static long fail_at = -1; /* index of the allocation to fail; -1: none */
static long allocations;  /* allocations since arm_failure() */
static int failed_one;

static void arm_failure(long index)
{
    allocations = 0;
    failed_one = 0;
    fail_at = index;
}

static void disarm_failure(void)
{
    fail_at = -1;
}

static int fail_this_allocation(void)
{
    if (fail_at < 0)
        return 0;
    if (allocations++ != fail_at)
        return 0;
    failed_one = 1;
    return 1;
}

void *__wrap_malloc(size_t size)
{
    return fail_this_allocation() ? NULL : __real_malloc(size);
}

void *__wrap_calloc(size_t count, size_t size)
{
    return fail_this_allocation() ? NULL : __real_calloc(count, size);
}

/* OpenSSL's own allocations, for the nomem-openssl scenario: installed before its first one. */
static void *crypto_malloc(size_t size, const char *file, int line)
{
    (void)file;
    (void)line;
    return fail_this_allocation() ? NULL : __real_malloc(size);
}

static void *crypto_realloc(void *ptr, size_t size, const char *file, int line)
{
    (void)file;
    (void)line;
    return fail_this_allocation() ? NULL : realloc(ptr, size);
}

static void crypto_free(void *ptr, const char *file, int line)
{
    (void)file;
    (void)line;
    free(ptr);
}

/* ---- short read injection ---------------------------------------------------------------- */

/* Linked with -Wl,--wrap=pread too: the prover's reads can be made to find the end of the file
 * early, as when a file shrinks between the prover's fstat and its read, with a stale errno
 * left from an earlier call. */
ssize_t __real_pread(int fd, void *buf, size_t count, off_t offset);
ssize_t __wrap_pread(int fd, void *buf, size_t count, off_t offset);

static long eof_at = -1; /* index of the pread to answer with end of file; -1: none */
static long preads;
static int eof_given;

ssize_t __wrap_pread(int fd, void *buf, size_t count, off_t offset)
{
    if (eof_at >= 0 && preads++ == eof_at) {
        eof_given = 1;
        errno = ENOENT; /* stale: what an earlier call left, which says nothing of this read */
        return 0;
    }
    return __real_pread(fd, buf, count, offset);
}

/* ---- helpers ------------------------------------------------------------------------------ */

static int failures;

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("FAIL: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    failures++;
}

static int open_descriptors(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d) {
        perror("/proc/self/fd");
        exit(2);
    }
    int n = 0;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

static int parse_hex32(const char *hex, uint8_t out[32])
{
    if (strlen(hex) != 64)
        return -1;
    for (int i = 0; i < 32; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (uint8_t)v;
    }
    return 0;
}

static int read_comm_c(const char *cache_dir, uint8_t out[32])
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/p_aux", cache_dir);
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    size_t n = fread(out, 1, 32, f);
    fclose(f);
    return n == 32 ? 0 : -1;
}

typedef struct fixture {
    const char *workdir;
    dext_replica replicas[MAX_SECTORS];
    size_t count;
    dext_post_task window, winning;
    uint8_t comm_c[32]; /* of replicas[0] */
} fixture;

static const char *status_name(int32_t status)
{
    static const char *const names[] = {"DEXT_OK",         "DEXT_ERR_INVALID_ARGUMENT",
                                        "DEXT_ERR_SECTOR", "DEXT_ERR_CANCELLED",
                                        "DEXT_ERR_IO",     "DEXT_ERR_NOMEM",
                                        "DEXT_ERR_INVALID_PROOF", "DEXT_ERR_INTERNAL"};
    return status >= 0 && status <= 7 ? names[status] : "unknown status";
}

static void expect_status(const char *what, int32_t got, int32_t want)
{
    if (got != want)
        fail("%s: %s (%d), expected %s; dext_last_error: %s", what, status_name(got), got,
             status_name(want), dext_last_error(NULL));
}

static void progress_ignored(void *ctx, const char *phase, uint64_t done, uint64_t total)
{
    (void)ctx;
    (void)phase;
    (void)done;
    (void)total;
}

/* ---- the operations under test ------------------------------------------------------------ */

enum op { OP_OPEN, OP_WINDOW, OP_WINNING, OP_VERIFY, OP_BUILD_TREE, OP_COUNT };
static const char *const OP_NAMES[] = {"dext_open", "dext_window_post", "dext_winning_post",
                                       "dext_verify", "dext_build_tree"};

/* What window_post must produce when it succeeds despite an injected failure (OpenSSL may
 * tolerate one, e.g. in its error queue): exactly the proofs of a run without failures. */
static const dext_result *expected_window;

static int same_result(const dext_result *a, const dext_result *b)
{
    if (a->proof_count != b->proof_count || a->fault_count != b->fault_count)
        return 0;
    for (size_t i = 0; i < a->proof_count; i++)
        if (a->proofs[i].len != b->proofs[i].len ||
            memcmp(a->proofs[i].ptr, b->proofs[i].ptr, a->proofs[i].len) != 0)
            return 0;
    return 1;
}

/* One call of `op` with a fresh handle made beforehand (with allocation failures disarmed);
 * the status, and whether *result_out was left NULL on failure. */
static int32_t run_op(enum op op, const fixture *fx, dext_handle *h, const dext_bytes *proofs,
                      size_t proof_count, int *result_contract_ok)
{
    dext_result *result = (dext_result *)1; /* must be overwritten */
    int32_t status = DEXT_OK;
    char cache[4200];
    uint8_t comm_r[32];
    *result_contract_ok = 1;
    switch (op) {
    case OP_OPEN: {
        dext_handle *other = dext_open("{\"rows_to_discard\": 2}");
        status = other ? DEXT_OK : DEXT_ERR_NOMEM;
        if (!other && !strstr(dext_last_error(NULL), "out of memory"))
            status = DEXT_ERR_INTERNAL;
        dext_close(other);
        return status;
    }
    case OP_WINDOW:
        status = dext_window_post(h, &fx->window, progress_ignored, NULL, NULL, &result);
        break;
    case OP_WINNING:
        status = dext_winning_post(h, &fx->winning, progress_ignored, NULL, NULL, &result);
        break;
    case OP_VERIFY:
        return dext_verify(h, &fx->window, proofs, proof_count);
    case OP_BUILD_TREE:
        snprintf(cache, sizeof(cache), "%s/built", fx->workdir);
        return dext_build_tree(h, fx->window.proof_type, fx->replicas[0].sealed_file, cache,
                               fx->comm_c, comm_r, progress_ignored, NULL, NULL);
    default:
        return DEXT_ERR_INTERNAL;
    }
    if (status == DEXT_OK) {
        if (op == OP_WINDOW && expected_window && !same_result(result, expected_window)) {
            fail("dext_window_post returned DEXT_OK with another result (%zu proofs, %zu faults)",
                 result->proof_count, result->fault_count);
        }
        dext_result_free(result);
    } else if (result != NULL)
        *result_contract_ok = 0;
    return status;
}

/* ---- scenarios ---------------------------------------------------------------------------- */

static void scenario_prove(const fixture *fx)
{
    int before = open_descriptors();
    dext_handle *h = dext_open(NULL);
    if (!h) {
        fail("dext_open: %s", dext_last_error(NULL));
        return;
    }
    dext_result *window = NULL, *winning = NULL;
    expect_status("window_post", dext_window_post(h, &fx->window, progress_ignored, NULL, NULL,
                                                  &window), DEXT_OK);
    expect_status("winning_post", dext_winning_post(h, &fx->winning, progress_ignored, NULL,
                                                    NULL, &winning), DEXT_OK);
    if (window && winning) {
        if (window->fault_count != 0 || window->proof_count != (fx->count + 1) / 2)
            fail("window_post: %zu proofs and %zu faults for %zu sound sectors",
                 window->proof_count, window->fault_count, fx->count);
        expect_status("verify window", dext_verify(h, &fx->window, window->proofs,
                                                   window->proof_count), DEXT_OK);
        expect_status("verify winning", dext_verify(h, &fx->winning, winning->proofs,
                                                    winning->proof_count), DEXT_OK);
        /* A flipped bit must be caught, with the sanitizers watching the verifier's reads. */
        window->proofs[0].ptr[window->proofs[0].len - 1] ^= 1;
        expect_status("verify a damaged proof", dext_verify(h, &fx->window, window->proofs,
                                                            window->proof_count),
                      DEXT_ERR_INVALID_PROOF);
    }
    dext_result_free(window);
    dext_result_free(winning);

    char cache[4200];
    uint8_t comm_r[32];
    snprintf(cache, sizeof(cache), "%s/rebuilt", fx->workdir);
    expect_status("build_tree", dext_build_tree(h, fx->window.proof_type,
                                                fx->replicas[0].sealed_file, cache, fx->comm_c,
                                                comm_r, progress_ignored, NULL, NULL), DEXT_OK);
    if (memcmp(comm_r, fx->replicas[0].comm_r, 32) != 0)
        fail("build_tree: comm_r differs from the fixture's");
    dext_close(h);
    if (open_descriptors() != before)
        fail("proving left %d descriptors open", open_descriptors() - before);
}

/* openssl: OpenSSL's allocations fail too. It cannot say which of its failures were allocations,
 * so then DEXT_ERR_INTERNAL is also right, and DEXT_OK if the result is the right one; never a
 * fault, a bad-argument or a bad-proof answer. */
static void scenario_nomem(const fixture *fx, int openssl)
{
    dext_handle *h = dext_open(NULL);
    if (!h) {
        fail("dext_open: %s", dext_last_error(NULL));
        return;
    }
    dext_result *good = NULL;
    if (dext_window_post(h, &fx->window, NULL, NULL, NULL, &good) != DEXT_OK) {
        fail("window_post without injected failures: %s", dext_last_error(NULL));
        dext_close(h);
        return;
    }
    expected_window = good;
    for (int op = 0; op < OP_COUNT; op++) {
        long points = 0;
        for (long k = 0;; k++) {
            int before = open_descriptors();
            int contract_ok;
            arm_failure(k);
            int32_t status = run_op((enum op)op, fx, h, good->proofs, good->proof_count,
                                    &contract_ok);
            disarm_failure();
            int injected = failed_one;
            if (open_descriptors() != before)
                fail("%s with allocation %ld failing left %d descriptors open", OP_NAMES[op], k,
                     open_descriptors() - before);
            if (!contract_ok)
                fail("%s with allocation %ld failing: *result_out not NULL", OP_NAMES[op], k);
            if (!injected) {
                expect_status(OP_NAMES[op], status, DEXT_OK);
                break;
            }
            points++;
            if (openssl && (status == DEXT_ERR_INTERNAL || status == DEXT_OK))
                continue;
            if (status != DEXT_ERR_NOMEM) {
                char what[128];
                snprintf(what, sizeof(what), "%s with allocation %ld failing", OP_NAMES[op], k);
                expect_status(what, status, DEXT_ERR_NOMEM);
            }
        }
        if (points == 0)
            fail("%s made no allocation to fail", OP_NAMES[op]);
        printf("%s: %ld allocation failure points, each %s\n", OP_NAMES[op], points,
               openssl ? "DEXT_ERR_NOMEM, DEXT_ERR_INTERNAL or the right result"
                       : "DEXT_ERR_NOMEM");
    }
    expected_window = NULL;
    dext_result_free(good);
    dext_close(h);
}

static void scenario_write_failure(const fixture *fx)
{
    /* /dev/full accepts the open and fails every write with ENOSPC: a full disk on demand. The
     * prover opens "<name>.tmp" with O_TRUNC, which follows our symlink. */
    static const char *const targets[] = {"sc-02-data-tree-r-last.dat.tmp", "p_aux.tmp"};
    dext_handle *h = dext_open(NULL);
    if (!h) {
        fail("dext_open: %s", dext_last_error(NULL));
        return;
    }
    for (size_t i = 0; i < sizeof(targets) / sizeof(targets[0]); i++) {
        char cache[4200], link[8400], what[256];
        uint8_t comm_r[32];
        snprintf(cache, sizeof(cache), "%s/full-%zu", fx->workdir, i);
        snprintf(link, sizeof(link), "%s/%s", cache, targets[i]);
        if (mkdir(cache, 0755) != 0 || symlink("/dev/full", link) != 0) {
            perror(link);
            exit(2);
        }
        snprintf(what, sizeof(what), "build_tree with %s on a full disk", targets[i]);
        int before = open_descriptors();
        int32_t status = dext_build_tree(h, fx->window.proof_type, fx->replicas[0].sealed_file,
                                         cache, fx->comm_c, comm_r, NULL, NULL, NULL);
        int leaked = open_descriptors() - before;
        expect_status(what, status, DEXT_ERR_IO);
        if (status == DEXT_ERR_IO && !strstr(dext_last_error(NULL), strerror(ENOSPC)))
            fail("%s: the message does not give the cause: %s", what, dext_last_error(NULL));
        if (leaked != 0)
            fail("%s: %d descriptor%s left open", what, leaked, leaked == 1 ? "" : "s");
        struct stat st;
        if (lstat(link, &st) == 0)
            fail("%s: the temporary file %s was left behind", what, link);
    }
    dext_close(h);
}

/* Every read of the prover finding the end of its file early, in turn: a fault of that sector
 * (window_post) or DEXT_ERR_SECTOR (winning_post, build_tree), with a message that says the
 * file ended, not the errno some earlier call left; no descriptor left open. */
static void scenario_short_read(const fixture *fx)
{
    dext_handle *h = dext_open(NULL);
    if (!h) {
        fail("dext_open: %s", dext_last_error(NULL));
        return;
    }
    static const char *const names[] = {"dext_window_post", "dext_winning_post",
                                        "dext_build_tree"};
    char ended[128];
    snprintf(ended, sizeof(ended), ": %s", strerror(ENODATA));
    for (int op = 0; op < 3; op++) {
        long points = 0;
        for (long k = 0;; k++) {
            char cache[4200];
            uint8_t comm_r[32];
            dext_result *result = NULL;
            int before = open_descriptors();
            int32_t status;
            snprintf(cache, sizeof(cache), "%s/short-read", fx->workdir);
            eof_at = k;
            preads = 0;
            eof_given = 0;
            if (op == 0)
                status = dext_window_post(h, &fx->window, NULL, NULL, NULL, &result);
            else if (op == 1)
                status = dext_winning_post(h, &fx->winning, NULL, NULL, NULL, &result);
            else
                status = dext_build_tree(h, fx->window.proof_type, fx->replicas[0].sealed_file,
                                         cache, fx->comm_c, comm_r, NULL, NULL, NULL);
            eof_at = -1;
            if (open_descriptors() != before)
                fail("%s with read %ld ending early left %d descriptors open", names[op], k,
                     open_descriptors() - before);
            if (!eof_given) {
                expect_status(names[op], status, DEXT_OK);
                dext_result_free(result);
                break;
            }
            points++;
            if (op == 0) {
                expect_status(names[op], status, DEXT_OK);
                if (result && (result->fault_count != 1 || result->proof_count != 0))
                    fail("%s with read %ld ending early: %zu faults and %zu proofs, expected "
                         "the one sector read as a fault", names[op], k, result->fault_count,
                         result->proof_count);
                dext_result_free(result);
                continue;
            }
            expect_status(names[op], status, DEXT_ERR_SECTOR);
            const char *msg = dext_last_error(NULL);
            if (status == DEXT_ERR_SECTOR && (!strstr(msg, ended) || strstr(msg, strerror(ENOENT))))
                fail("%s with read %ld ending early: the message does not say so: %s", names[op],
                     k, msg);
        }
        if (points == 0)
            fail("%s made no read to cut short", names[op]);
        printf("%s: %ld reads, each cut short in turn\n", names[op], points);
    }
    dext_close(h);
}

/* Handles used by several threads at once, as the host does (one handle per concurrent
 * request): the library must keep no shared state but the thread-local error message. Each
 * thread proves, verifies, builds a tree into its own cache dir and fails a call, whose
 * message must be its own; results are freed on another thread than the one they came from. */
#define THREADS 4

typedef struct worker {
    const fixture *fx;
    int index;
    dext_result *result; /* freed by main */
    char problem[256];
} worker;

static void *work(void *arg)
{
    worker *w = arg;
    const fixture *fx = w->fx;
    dext_handle *h = dext_open(NULL);
    if (!h) {
        snprintf(w->problem, sizeof(w->problem), "dext_open: %s", dext_last_error(NULL));
        return NULL;
    }
    for (int round = 0; round < 3 && !w->problem[0]; round++) {
        dext_result *window = NULL, *winning = NULL;
        char cache[4200], bad_type[64];
        uint8_t comm_r[32];
        if (dext_window_post(h, &fx->window, progress_ignored, NULL, NULL, &window) != DEXT_OK ||
            dext_verify(h, &fx->window, window->proofs, window->proof_count) != DEXT_OK ||
            dext_winning_post(h, &fx->winning, progress_ignored, NULL, NULL, &winning) != DEXT_OK)
            snprintf(w->problem, sizeof(w->problem), "proving: %s", dext_last_error(NULL));
        snprintf(cache, sizeof(cache), "%s/thread-%d", fx->workdir, w->index);
        if (!w->problem[0] &&
            (dext_build_tree(h, fx->window.proof_type, fx->replicas[0].sealed_file, cache,
                             fx->comm_c, comm_r, progress_ignored, NULL, NULL) != DEXT_OK ||
             memcmp(comm_r, fx->replicas[0].comm_r, 32) != 0))
            snprintf(w->problem, sizeof(w->problem), "build_tree: %s", dext_last_error(NULL));
        dext_post_task bad = fx->window;
        snprintf(bad_type, sizeof(bad_type), "NoSuchType%d", w->index);
        bad.proof_type = bad_type;
        dext_result *none = NULL;
        if (!w->problem[0] &&
            (dext_window_post(h, &bad, NULL, NULL, NULL, &none) != DEXT_ERR_INVALID_ARGUMENT ||
             !strstr(dext_last_error(h), bad_type)))
            snprintf(w->problem, sizeof(w->problem), "another thread's message: %s",
                     dext_last_error(h));
        dext_result_free(window);
        if (w->result)
            dext_result_free(winning);
        else
            w->result = winning;
    }
    dext_close(h);
    return NULL;
}

static void scenario_threads(const fixture *fx)
{
    worker workers[THREADS];
    pthread_t threads[THREADS];
    for (int i = 0; i < THREADS; i++) {
        workers[i] = (worker){.fx = fx, .index = i};
        if (pthread_create(&threads[i], NULL, work, &workers[i]) != 0) {
            perror("pthread_create");
            exit(2);
        }
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        if (workers[i].problem[0])
            fail("thread %d: %s", i, workers[i].problem);
        dext_result_free(workers[i].result);
    }
}

/* Sets the flag from another thread while the prover runs, then lets the prover go on: the
 * prover must see it at its next check. */
typedef struct setter {
    int32_t *flag;
    sem_t go;
    pthread_t thread;
    int started;
    int join_in_callback; /* 1: deterministic (the callback waits); 0: a real race */
} setter;

static void *set_flag(void *arg)
{
    setter *s = arg;
    while (sem_wait(&s->go) != 0 && errno == EINTR) {
    }
    __atomic_store_n(s->flag, 1, __ATOMIC_RELEASE); /* the host's side of the contract */
    return NULL;
}

static void progress_cancels(void *ctx, const char *phase, uint64_t done, uint64_t total)
{
    setter *s = ctx;
    (void)phase;
    (void)total;
    if (done != 0 || s->started)
        return;
    s->started = 1;
    sem_post(&s->go);
    if (s->join_in_callback)
        pthread_join(s->thread, NULL);
}

static int32_t window_post_cancelled_by_thread(dext_handle *h, const fixture *fx,
                                               int join_in_callback)
{
    int32_t flag = 0;
    setter s = {.flag = &flag, .join_in_callback = join_in_callback};
    sem_init(&s.go, 0, 0);
    if (pthread_create(&s.thread, NULL, set_flag, &s) != 0) {
        perror("pthread_create");
        exit(2);
    }
    dext_result *result = NULL;
    int32_t status = dext_window_post(h, &fx->window, progress_cancels, &s, &flag, &result);
    if (!s.started)
        sem_post(&s.go);
    if (!join_in_callback || !s.started)
        pthread_join(s.thread, NULL);
    sem_destroy(&s.go);
    dext_result_free(result);
    return status;
}

static void scenario_cancel(const fixture *fx)
{
    dext_handle *h = dext_open(NULL);
    if (!h) {
        fail("dext_open: %s", dext_last_error(NULL));
        return;
    }
    int32_t flag = 1; /* already set when the call starts */
    dext_result *result = (dext_result *)1;
    uint8_t comm_r[32];
    char cache[4200];
    snprintf(cache, sizeof(cache), "%s/cancelled", fx->workdir);
    expect_status("window_post, flag set before",
                  dext_window_post(h, &fx->window, NULL, NULL, &flag, &result),
                  DEXT_ERR_CANCELLED);
    if (result)
        fail("window_post cancelled: *result_out not NULL");
    result = (dext_result *)1;
    expect_status("winning_post, flag set before",
                  dext_winning_post(h, &fx->winning, NULL, NULL, &flag, &result),
                  DEXT_ERR_CANCELLED);
    if (result)
        fail("winning_post cancelled: *result_out not NULL");
    expect_status("build_tree, flag set before",
                  dext_build_tree(h, fx->window.proof_type, fx->replicas[0].sealed_file, cache,
                                  fx->comm_c, comm_r, NULL, NULL, &flag),
                  DEXT_ERR_CANCELLED);
    expect_status("window_post, flag set by another thread during the call",
                  window_post_cancelled_by_thread(h, fx, 1), DEXT_ERR_CANCELLED);
    if (!strstr(dext_last_error(NULL), "after 0 of"))
        fail("window_post did not stop at its next check: %s", dext_last_error(NULL));
    dext_close(h);
}

/* For ThreadSanitizer: the flag is stored by one thread while the prover reads it on another,
 * with nothing else ordering them. A non-atomic read of the flag is a data race it reports. */
static void scenario_cancel_race(const fixture *fx)
{
    dext_handle *h = dext_open(NULL);
    if (!h) {
        fail("dext_open: %s", dext_last_error(NULL));
        return;
    }
    for (int i = 0; i < 20; i++) {
        int32_t status = window_post_cancelled_by_thread(h, fx, 0);
        if (status != DEXT_OK && status != DEXT_ERR_CANCELLED)
            expect_status("window_post racing a cancel", status, DEXT_ERR_CANCELLED);
    }
    dext_close(h);
}

int main(int argc, char **argv)
{
    if (argc < 10 || (argc - 6) % 4 != 0) {
        fprintf(stderr, "usage: %s SCENARIO WORKDIR MINER WINDOW_TYPE WINNING_TYPE "
                        "(SECTOR_ID COMM_R_HEX CACHE_DIR SEALED_FILE)...\n", argv[0]);
        return 2;
    }
    if (strcmp(argv[1], "nomem-openssl") == 0 &&
        !CRYPTO_set_mem_functions(crypto_malloc, crypto_realloc, crypto_free)) {
        fprintf(stderr, "CRYPTO_set_mem_functions failed: OpenSSL allocated before main\n");
        return 2;
    }
    static fixture fx;
    fx.workdir = argv[2];
    uint64_t miner = strtoull(argv[3], NULL, 10);
    fx.count = (size_t)(argc - 6) / 4;
    if (fx.count > MAX_SECTORS) {
        fprintf(stderr, "at most %d sectors\n", MAX_SECTORS);
        return 2;
    }
    for (size_t i = 0; i < fx.count; i++) {
        char **a = argv + 6 + 4 * i;
        fx.replicas[i].sector_id = strtoull(a[0], NULL, 10);
        if (parse_hex32(a[1], fx.replicas[i].comm_r) != 0) {
            fprintf(stderr, "comm_r of sector %s is not 64 hex digits: %s\n", a[0], a[1]);
            return 2;
        }
        fx.replicas[i].cache_dir = a[2];
        fx.replicas[i].sealed_file = a[3];
    }
    if (read_comm_c(fx.replicas[0].cache_dir, fx.comm_c) != 0) {
        fprintf(stderr, "cannot read comm_c from %s/p_aux\n", fx.replicas[0].cache_dir);
        return 2;
    }
    uint8_t seed[32];
    for (int i = 0; i < 32; i++)
        seed[i] = (uint8_t)(7 * i + 1);
    fx.window = (dext_post_task){.miner_id = miner, .proof_type = argv[4], .replicas = fx.replicas,
                                 .replica_count = fx.count};
    fx.winning = fx.window;
    fx.winning.proof_type = argv[5];
    memcpy(fx.window.seed, seed, 32);
    memcpy(fx.winning.seed, seed, 32);

    const char *scenario = argv[1];
    if (strcmp(scenario, "prove") == 0)
        scenario_prove(&fx);
    else if (strcmp(scenario, "nomem") == 0)
        scenario_nomem(&fx, 0);
    else if (strcmp(scenario, "nomem-openssl") == 0)
        scenario_nomem(&fx, 1);
    else if (strcmp(scenario, "write-failure") == 0)
        scenario_write_failure(&fx);
    else if (strcmp(scenario, "short-read") == 0)
        scenario_short_read(&fx);
    else if (strcmp(scenario, "threads") == 0)
        scenario_threads(&fx);
    else if (strcmp(scenario, "cancel") == 0)
        scenario_cancel(&fx);
    else if (strcmp(scenario, "cancel-race") == 0)
        scenario_cancel_race(&fx);
    else {
        fprintf(stderr, "unknown scenario %s\n", scenario);
        return 2;
    }
    if (failures)
        return 1;
    printf("ok %s\n", scenario);
    return 0;
}
