/*
 * dext_child.c: a prover child written from docs/PROTOCOL.md alone, in C with no msgpack library.
 * It serves one stage with the reference PoSt prover (native/src) and speaks dext/1 on
 * stdin/stdout; logs go to stderr.
 *
 *   cc -O2 -pthread -Inative/include examples/c-dext-prover/dext_child.c \
 *      native/src/{api,common,prove,tree,verify}.c -lcrypto -o dext-child
 *
 *   [[WinPost]]
 *   Bin = "/path/to/dext-child"
 *   Args = ["winning_post"]
 *
 * One request at a time (its Hello says capacity 1; keep Concurrent at its default, 1): the main
 * thread reads frames, a worker thread proves, so a Cancel reaches the prover while it runs.
 * Progress frames are sent whenever the prover reports progress; there is no separate heartbeat.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dext_prover.h"

#define MAX_FRAME (64u * 1024 * 1024) /* PROTOCOL.md section 2 */

/* ---- msgpack writer (PROTOCOL.md section 3) ------------------------------------------------ */

typedef struct {
    uint8_t *p;
    size_t len, cap;
} buf;

static void put(buf *b, const void *data, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) {
            fprintf(stderr, "dext-child: out of memory\n");
            exit(1);
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void put_be(buf *b, uint64_t v, int bytes)
{
    for (int i = bytes - 1; i >= 0; i--) {
        uint8_t x = (uint8_t)(v >> (8 * i));
        put(b, &x, 1);
    }
}

/* A header: a fix form (fix | n) below `fix_limit`, else tag8/16/32 with a 1/2/4-byte length. */
static void put_head(buf *b, uint64_t n, uint8_t fix, uint64_t fix_limit, int tag8, uint8_t tag16,
                     uint8_t tag32)
{
    if (n < fix_limit) {
        put_be(b, fix | n, 1);
    } else if (tag8 >= 0 && n <= 0xff) {
        put_be(b, (uint64_t)tag8, 1);
        put_be(b, n, 1);
    } else if (n <= 0xffff) {
        put_be(b, tag16, 1);
        put_be(b, n, 2);
    } else {
        put_be(b, tag32, 1);
        put_be(b, n, 4);
    }
}

static void mp_uint(buf *b, uint64_t v)
{
    if (v < 0x80) {
        put_be(b, v, 1);
    } else {
        int n = v <= 0xff ? 1 : v <= 0xffff ? 2 : v <= 0xffffffffu ? 4 : 8;
        put_be(b, 0xcc + (n == 1 ? 0 : n == 2 ? 1 : n == 4 ? 2 : 3), 1);
        put_be(b, v, n);
    }
}

static void mp_str(buf *b, const char *s)
{
    size_t n = strlen(s);
    put_head(b, n, 0xa0, 32, 0xd9, 0xda, 0xdb);
    put(b, s, n);
}

static void mp_bin(buf *b, const uint8_t *d, size_t n)
{
    put_head(b, n, 0, 0, 0xc4, 0xc5, 0xc6);
    put(b, d, n);
}

static void mp_array(buf *b, size_t n) { put_head(b, n, 0x90, 16, -1, 0xdc, 0xdd); }
static void mp_map(buf *b, size_t n) { put_head(b, n, 0x80, 16, -1, 0xde, 0xdf); }
static void mp_nil(buf *b) { put_be(b, 0xc0, 1); }

/* ---- frames out: one lock, so frames from the two threads never interleave ------------------- */

static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;

static buf frame_start(void)
{
    buf b = {0};
    put_be(&b, 0, 4); /* the length prefix, filled in by frame_send */
    return b;
}

static void frame_send(buf *b)
{
    uint64_t n = b->len - 4; /* the prefix counts the payload only */
    for (int i = 0; i < 4; i++)
        b->p[i] = (uint8_t)(n >> (8 * (3 - i)));
    pthread_mutex_lock(&write_lock);
    for (size_t off = 0; off < b->len;) {
        ssize_t w = write(1, b->p + off, b->len - off);
        if (w <= 0) {
            fprintf(stderr, "dext-child: cannot write to the supervisor; exiting\n");
            _exit(0);
        }
        off += (size_t)w;
    }
    pthread_mutex_unlock(&write_lock);
    free(b->p);
}

/* ---- msgpack reader: just what dext/1 needs, and skipping of anything else ------------------- */

typedef struct {
    const uint8_t *p, *end;
    int bad;
} rd;

static int need(rd *r, size_t n)
{
    if (r->bad || (size_t)(r->end - r->p) < n)
        r->bad = 1;
    return !r->bad;
}

static uint64_t take_be(rd *r, int n)
{
    uint64_t v = 0;
    if (!need(r, (size_t)n))
        return 0;
    while (n--)
        v = v << 8 | *r->p++;
    return v;
}

static int take_byte(rd *r) { return need(r, 1) ? *r->p++ : -1; }

static uint64_t read_uint(rd *r)
{
    int t = take_byte(r);
    if (t >= 0 && t < 0x80)
        return (uint64_t)t;
    if (t >= 0xcc && t <= 0xcf)
        return take_be(r, 1 << (t - 0xcc));
    if (t >= 0xd0 && t <= 0xd3 && need(r, 1) && !(*r->p & 0x80)) /* a signed int >= 0 */
        return take_be(r, 1 << (t - 0xd0));
    r->bad = 1;
    return 0;
}

/* str (is_bin 0) or bin (is_bin 1): the bytes stay in the frame. */
static const uint8_t *read_bytes(rd *r, int is_bin, size_t *n)
{
    int t = take_byte(r);
    *n = 0;
    if (!is_bin && t >= 0xa0 && t <= 0xbf)
        *n = (size_t)(t & 0x1f);
    else if (t >= (is_bin ? 0xc4 : 0xd9) && t <= (is_bin ? 0xc6 : 0xdb))
        *n = (size_t)take_be(r, 1 << (t - (is_bin ? 0xc4 : 0xd9)));
    else
        r->bad = 1;
    if (!need(r, *n))
        return NULL;
    const uint8_t *s = r->p;
    r->p += *n;
    return s;
}

/* array (is_map 0) or map (is_map 1) header: the number of elements or entries. */
static size_t read_count(rd *r, int is_map)
{
    int t = take_byte(r);
    int fix = is_map ? 0x80 : 0x90;
    if (t >= fix && t <= fix + 15)
        return (size_t)(t & 0x0f);
    if (t == (is_map ? 0xde : 0xdc) || t == (is_map ? 0xdf : 0xdd))
        return (size_t)take_be(r, (t & 1) ? 4 : 2);
    r->bad = 1;
    return 0;
}

static int str_is(const uint8_t *s, size_t n, const char *want)
{
    return s && n == strlen(want) && memcmp(s, want, n) == 0;
}

/* Skip one value of any type: unknown keys are skipped (PROTOCOL.md section 3). */
static void skip(rd *r, int depth)
{
    int t = take_byte(r);
    uint64_t n = 0;
    if (t < 0 || depth > 64) {
        r->bad = 1;
    } else if (t < 0x80 || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) {
        /* fixint, nil, false, true: nothing follows */
    } else if (t <= 0x9f) {
        n = (uint64_t)(t & 0x0f) * (t < 0x90 ? 2 : 1);
        while (n-- && !r->bad)
            skip(r, depth + 1);
        return;
    } else if (t <= 0xbf) {
        n = (uint64_t)(t & 0x1f);
    } else if (t >= 0xc4 && t <= 0xc9) { /* bin 8/16/32, ext 8/16/32 */
        n = take_be(r, 1 << ((t - 0xc4) % 3)) + (t >= 0xc7);
    } else if (t >= 0xca && t <= 0xd3) { /* float 32/64, uint 8..64, int 8..64 */
        n = t == 0xca ? 4 : t == 0xcb ? 8 : 1u << ((t - 0xcc) % 4);
    } else if (t >= 0xd4 && t <= 0xd8) { /* fixext 1..16 */
        n = 1 + (1u << (t - 0xd4));
    } else if (t >= 0xd9 && t <= 0xdb) {
        n = take_be(r, 1 << (t - 0xd9));
    } else if (t >= 0xdc && t <= 0xdf) {
        n = take_be(r, (t & 1) ? 4 : 2) * (t >= 0xde ? 2 : 1);
        while (n-- && !r->bad)
            skip(r, depth + 1);
        return;
    } else {
        r->bad = 1; /* 0xc1 is never used */
    }
    if (n && need(r, n)) /* the bytes of a str, bin, ext or number */
        r->p += n;
}

/* ---- the request being proved -------------------------------------------------------------- */

static const char *stage;
static dext_handle *prover;

typedef struct {
    uint64_t id;
    dext_post_task task;
    dext_replica *replicas;
    char *proof_type;
    volatile int32_t cancel;
} job;

static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;
static job *current; /* the request in flight, or NULL */
static pthread_t worker;
static int worker_started;

static char *dup_str(const uint8_t *s, size_t n)
{
    char *c = malloc(n + 1);
    if (!c)
        exit(1);
    memcpy(c, s, n);
    c[n] = 0;
    return c;
}

static void free_job(job *j)
{
    for (size_t i = 0; j->replicas && i < j->task.replica_count; i++) {
        free((char *)j->replicas[i].cache_dir);
        free((char *)j->replicas[i].sealed_file);
    }
    free(j->replicas);
    free(j->proof_type);
    free(j);
}

/* The task map (PROTOCOL.md section 5). Returns 0 if undecodable; *wrong_stage is set (and 1
 * returned) for a task of another stage, which is answered, not a protocol error. */
static int parse_task(rd *r, job *j, char *wrong_stage, size_t wrong_size)
{
    size_t entries = read_count(r, 1), n;
    int have = 0;
    for (size_t e = 0; e < entries && !r->bad; e++) {
        const uint8_t *key = read_bytes(r, 0, &n);
        size_t klen = n;
        if (str_is(key, klen, "stage")) {
            const uint8_t *s = read_bytes(r, 0, &n);
            if (s && !str_is(s, n, stage))
                snprintf(wrong_stage, wrong_size, "%.*s", (int)(n < 64 ? n : 64), s);
            have |= 1;
        } else if (str_is(key, klen, "miner_id")) {
            j->task.miner_id = read_uint(r);
            have |= 2;
        } else if (str_is(key, klen, "proof_type")) {
            const uint8_t *s = read_bytes(r, 0, &n);
            if (s)
                j->proof_type = dup_str(s, n);
            j->task.proof_type = j->proof_type;
            have |= 4;
        } else if (str_is(key, klen, "replicas")) {
            size_t count = read_count(r, 0);
            if (!need(r, count)) /* each replica takes at least a byte: no huge calloc */
                return 0;
            j->replicas = calloc(count ? count : 1, sizeof(dext_replica));
            j->task.replicas = j->replicas;
            for (size_t i = 0; i < count && !r->bad; i++) {
                size_t fields = read_count(r, 0);
                dext_replica *rep = &j->replicas[i];
                j->task.replica_count = i + 1;
                if (fields < 4)
                    r->bad = 1;
                rep->sector_id = read_uint(r);
                const uint8_t *comm_r = read_bytes(r, 1, &n);
                if (comm_r && n == 32)
                    memcpy(rep->comm_r, comm_r, 32);
                else
                    r->bad = 1;
                const uint8_t *s = read_bytes(r, 0, &n);
                rep->cache_dir = s ? dup_str(s, n) : NULL;
                s = read_bytes(r, 0, &n);
                rep->sealed_file = s ? dup_str(s, n) : NULL;
                for (size_t f = 4; f < fields && !r->bad; f++)
                    skip(r, 1); /* elements after the fourth are ignored */
            }
            have |= 8;
        } else if (str_is(key, klen, "seed")) {
            const uint8_t *seed = read_bytes(r, 1, &n);
            if (seed && n == 32)
                memcpy(j->task.seed, seed, 32);
            else
                r->bad = 1;
            have |= 16;
        } else {
            skip(r, 1);
        }
    }
    return !r->bad && (have == 31 || (wrong_stage[0] && (have & 1)));
}

static void send_response(uint64_t id, const dext_result *res, const char *error)
{
    buf b = frame_start();
    mp_map(&b, 4);
    mp_str(&b, "type");
    mp_str(&b, "response");
    mp_str(&b, "id");
    mp_uint(&b, id);
    mp_str(&b, "output");
    if (res) {
        int window = strcmp(stage, "window_post") == 0;
        mp_map(&b, window ? 3 : 2);
        mp_str(&b, "stage");
        mp_str(&b, stage);
        mp_str(&b, "proofs");
        mp_array(&b, res->proof_count);
        for (size_t i = 0; i < res->proof_count; i++)
            mp_bin(&b, res->proofs[i].ptr, res->proofs[i].len);
        if (window) {
            mp_str(&b, "faults");
            mp_array(&b, res->fault_count);
            for (size_t i = 0; i < res->fault_count; i++)
                mp_uint(&b, res->faults[i]);
        }
    } else {
        mp_nil(&b);
    }
    mp_str(&b, "error");
    if (error) {
        char text[512];
        size_t i = 0;
        for (; error[i] && i < sizeof(text) - 1; i++) /* str must be UTF-8: keep it ASCII */
            text[i] = (unsigned char)error[i] < 0x80 ? error[i] : '?';
        text[i] = 0;
        mp_str(&b, text);
    } else {
        mp_nil(&b);
    }
    frame_send(&b);
}

static void on_progress(void *ctx, const char *phase, uint64_t done, uint64_t total)
{
    buf b = frame_start();
    mp_map(&b, 5);
    mp_str(&b, "type");
    mp_str(&b, "progress");
    mp_str(&b, "id");
    mp_uint(&b, ((job *)ctx)->id);
    mp_str(&b, "phase");
    mp_str(&b, phase);
    mp_str(&b, "done");
    mp_uint(&b, done);
    mp_str(&b, "total");
    mp_uint(&b, total);
    frame_send(&b);
}

static void *prove(void *arg)
{
    job *j = arg;
    dext_result *res = NULL;
    int32_t rc = strcmp(stage, "window_post") == 0
                     ? dext_window_post(prover, &j->task, on_progress, j, &j->cancel, &res)
                     : dext_winning_post(prover, &j->task, on_progress, j, &j->cancel, &res);
    /* Leave "in flight" before the Response is out: a Cancel read after it finds no job. */
    pthread_mutex_lock(&job_lock);
    current = NULL;
    pthread_mutex_unlock(&job_lock);
    if (rc == DEXT_OK)
        send_response(j->id, res, NULL);
    else
        send_response(j->id, NULL, rc == DEXT_ERR_CANCELLED ? "cancelled" : dext_last_error(prover));
    dext_result_free(res);
    free_job(j);
    return NULL;
}

/* ---- the main loop ------------------------------------------------------------------------- */

/* 1: n bytes read; 0: end of input before the first byte; -1: end of input inside them. */
static int read_full(uint8_t *p, size_t n)
{
    for (size_t got = 0; got < n;) {
        ssize_t r = read(0, p + got, n - got);
        if (r <= 0)
            return got ? -1 : 0;
        got += (size_t)r;
    }
    return 1;
}

static void finish_worker(int cancel)
{
    pthread_mutex_lock(&job_lock);
    if (cancel && current)
        current->cancel = 1;
    pthread_mutex_unlock(&job_lock);
    if (worker_started)
        pthread_join(worker, NULL);
    worker_started = 0;
}

static int protocol_error(const char *what)
{
    fprintf(stderr, "dext-child: protocol error from the supervisor: %s\n", what);
    finish_worker(1);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 2 || (strcmp(argv[1], "window_post") && strcmp(argv[1], "winning_post"))) {
        fprintf(stderr, "usage: dext-child window_post|winning_post\n");
        return 2;
    }
    stage = argv[1];
    prover = dext_open(NULL);
    if (!prover) {
        fprintf(stderr, "dext-child: %s\n", dext_last_error(NULL));
        return 1;
    }

    buf hello = frame_start();
    mp_map(&hello, 7);
    mp_str(&hello, "type");
    mp_str(&hello, "hello");
    mp_str(&hello, "protocol");
    mp_str(&hello, "dext/1");
    mp_str(&hello, "stage");
    mp_str(&hello, stage);
    mp_str(&hello, "pid");
    mp_uint(&hello, (uint64_t)getpid());
    mp_str(&hello, "prover");
    mp_str(&hello, "c-dext-prover");
    mp_str(&hello, "version");
    mp_str(&hello, "1");
    mp_str(&hello, "capacity");
    mp_uint(&hello, 1);
    frame_send(&hello);

    for (;;) {
        uint8_t head[4];
        int got = read_full(head, 4);
        if (got == 0) { /* end of stdin: the supervisor is gone */
            finish_worker(1);
            return 0;
        }
        uint32_t len = (uint32_t)head[0] << 24 | head[1] << 16 | head[2] << 8 | head[3];
        if (got < 0 || len > MAX_FRAME)
            return protocol_error(got < 0 ? "input ended inside a frame" : "frame too long");
        uint8_t *payload = malloc(len ? len : 1);
        if (!payload || read_full(payload, len) != 1) {
            free(payload);
            return protocol_error("input ended inside a frame");
        }
        rd r = {payload, payload + len, 0};
        const uint8_t *type = NULL, *task_at = NULL;
        size_t type_len = 0, n;
        uint64_t id = 0;
        int have_id = 0;
        size_t entries = read_count(&r, 1);
        for (size_t e = 0; e < entries && !r.bad; e++) {
            const uint8_t *key = read_bytes(&r, 0, &n);
            if (str_is(key, n, "type")) {
                type = read_bytes(&r, 0, &type_len);
            } else if (str_is(key, n, "id")) {
                id = read_uint(&r);
                have_id = 1;
            } else {
                if (str_is(key, n, "task"))
                    task_at = r.p;
                skip(&r, 1);
            }
        }
        if (r.bad || r.p != r.end || !type) {
            free(payload);
            return protocol_error("undecodable frame");
        }
        if (str_is(type, type_len, "request") && have_id && task_at) {
            job *j = calloc(1, sizeof(job));
            char wrong_stage[80] = "";
            rd t = {task_at, payload + len, 0};
            j->id = id;
            if (!parse_task(&t, j, wrong_stage, sizeof(wrong_stage))) {
                free_job(j);
                free(payload);
                return protocol_error("undecodable task");
            }
            pthread_mutex_lock(&job_lock);
            int busy = current != NULL;
            pthread_mutex_unlock(&job_lock);
            if (wrong_stage[0] || busy) {
                char why[160];
                if (wrong_stage[0])
                    snprintf(why, sizeof(why), "this child serves %s, not %s", stage, wrong_stage);
                else
                    snprintf(why, sizeof(why), "this child proves one request at a time; set"
                                               " Concurrent = 1 for it");
                send_response(id, NULL, why);
                free_job(j);
            } else {
                finish_worker(0); /* the previous worker has answered: reap it */
                pthread_mutex_lock(&job_lock);
                current = j;
                pthread_mutex_unlock(&job_lock);
                worker_started = pthread_create(&worker, NULL, prove, j) == 0;
                if (!worker_started) {
                    current = NULL;
                    send_response(id, NULL, "cannot start a thread");
                    free_job(j);
                }
            }
        } else if (str_is(type, type_len, "cancel") && have_id) {
            pthread_mutex_lock(&job_lock);
            if (current && current->id == id) /* not in flight: already answered */
                current->cancel = 1;
            pthread_mutex_unlock(&job_lock);
        } else if (str_is(type, type_len, "shutdown")) {
            free(payload);
            finish_worker(0); /* answer what is in flight, then exit */
            dext_close(prover);
            return 0;
        } else if (!str_is(type, type_len, "hello") && !str_is(type, type_len, "response") &&
                   !str_is(type, type_len, "progress")) {
            free(payload);
            return protocol_error("unknown or incomplete message");
        }
        free(payload);
    }
}
