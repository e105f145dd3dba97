/* Proof types, hashing, challenge derivation, byte order and error helpers. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "internal.h"

static const char *const SIZE_NAMES[] = {"2KiB", "8MiB", "512MiB", "32GiB", "64GiB"};
static const unsigned SIZE_HEIGHTS[] = {6, 18, 24, 30, 31}; /* log2(sector size / 32) */
static const uint32_t SECTORS_PER_PARTITION[] = {2, 2, 2, 2349, 2300};

int parse_proof_type(const char *name, proof_params *out)
{
    static const char WINDOW[] = "StackedDrgWindow";
    static const char WINNING[] = "StackedDrgWinning";
    const char *rest;
    if (name == NULL)
        return -1;
    memset(out, 0, sizeof(*out));
    if (strncmp(name, WINDOW, sizeof(WINDOW) - 1) == 0) {
        out->kind = KIND_WINDOW;
        rest = name + sizeof(WINDOW) - 1;
    } else if (strncmp(name, WINNING, sizeof(WINNING) - 1) == 0) {
        out->kind = KIND_WINNING;
        rest = name + sizeof(WINNING) - 1;
    } else {
        return -1;
    }
    for (int i = 0; i < 5; i++) {
        size_t n = strlen(SIZE_NAMES[i]);
        if (strncmp(rest, SIZE_NAMES[i], n) != 0)
            continue;
        const char *version = rest + n;
        if (strcmp(version, "V1") == 0)
            out->api_version = API_V1;
        else if (out->kind == KIND_WINDOW && strcmp(version, "V1_2") == 0)
            out->api_version = API_V1_2;
        else
            return -1;
        out->size_code = i;
        out->height = SIZE_HEIGHTS[i];
        out->nodes = (uint64_t)1 << out->height;
        if (out->kind == KIND_WINDOW) {
            out->sectors_per_partition = SECTORS_PER_PARTITION[i];
            out->challenges = WINDOW_CHALLENGES;
        } else {
            out->sectors_per_partition = WINNING_SECTORS;
            out->challenges = WINNING_CHALLENGES;
        }
        return 0;
    }
    return -1;
}

size_t sector_entry_size(const proof_params *p)
{
    return 8 + 2 * NODE_SIZE + (size_t)p->challenges * (8 + NODE_SIZE + NODE_SIZE * p->height);
}

int hasher_init(hasher *h, const EVP_MD *md)
{
    h->md = md;
    h->failed = 0;
    h->ctx = EVP_MD_CTX_new();
    return h->ctx ? 0 : -1;
}

void hasher_free(hasher *h)
{
    EVP_MD_CTX_free(h->ctx);
    h->ctx = NULL;
}

void sha256(hasher *h, const void *data, size_t len, uint8_t out[32])
{
    /* A reused context with a pre-fetched EVP_MD avoids OpenSSL 3's per-call fetch, which
     * costs more than the two compressions of a 64-byte message. */
    if (!EVP_DigestInit_ex2(h->ctx, h->md, NULL) || !EVP_DigestUpdate(h->ctx, data, len) ||
        !EVP_DigestFinal_ex(h->ctx, out, NULL)) {
        h->failed = 1;
        memset(out, 0, 32);
    }
}

void hash_node(hasher *h, const uint8_t *a, const uint8_t *b, uint8_t *out)
{
    uint8_t buf[64];
    memcpy(buf, a, 32);
    memcpy(buf + 32, b, 32);
    sha256(h, buf, 64, out);
    out[31] &= 0x3f;
}

void prover_id_from_miner(uint64_t miner_id, uint8_t out[32])
{
    memset(out, 0, 32);
    int i = 0;
    do {
        uint8_t byte = miner_id & 0x7f;
        miner_id >>= 7;
        if (miner_id)
            byte |= 0x80;
        out[i++] = byte;
    } while (miner_id && i < 32);
}

void masked_seed(const uint8_t seed[32], uint8_t out[32])
{
    memcpy(out, seed, 32);
    out[31] &= 0x3f;
}

uint64_t challenge_index(const proof_params *p, uint64_t sector_index, uint32_t n)
{
    if (p->api_version == API_V1_2)
        return n;
    return sector_index * p->challenges + n;
}

uint64_t leaf_challenge(hasher *h, const uint8_t randomness[32], uint64_t sector_id,
                        uint64_t challenge_index, uint64_t nodes)
{
    uint8_t buf[48], digest[32];
    memcpy(buf, randomness, 32);
    put_u64(buf + 32, sector_id);
    put_u64(buf + 40, challenge_index);
    sha256(h, buf, sizeof(buf), digest);
    return get_u64(digest) % nodes;
}

uint64_t winning_sector_choice(hasher *h, const uint8_t prover_id[32],
                               const uint8_t randomness[32], uint64_t n, uint64_t eligible)
{
    uint8_t buf[72], digest[32];
    memcpy(buf, prover_id, 32);
    memcpy(buf + 32, randomness, 32);
    put_u64(buf + 64, n);
    sha256(h, buf, sizeof(buf), digest);
    return get_u64(digest) % eligible;
}

void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

uint32_t get_u32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

void write_proof_header(uint8_t *out, const proof_params *p, uint32_t partition,
                        uint32_t sectors, const uint8_t randomness[32],
                        const uint8_t prover_id[32])
{
    memset(out, 0, PROOF_HEADER_SIZE);
    memcpy(out, PROOF_MAGIC, 4);
    out[4] = PROOF_LAYOUT_VERSION;
    out[5] = (uint8_t)p->kind;
    out[6] = (uint8_t)p->size_code;
    out[7] = (uint8_t)p->api_version;
    put_u32(out + 8, partition);
    put_u32(out + 12, sectors);
    put_u32(out + 16, p->challenges);
    out[20] = (uint8_t)p->height;
    memcpy(out + 24, randomness, 32);
    memcpy(out + 56, prover_id, 32);
}

static _Thread_local char last_error[1024];

void set_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, ap);
    va_end(ap);
}

const char *dext_last_error(dext_handle *handle)
{
    (void)handle;
    return last_error;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void progress_begin(progress_state *s, dext_progress_fn fn, void *ctx, const char *phase,
                    uint64_t total)
{
    s->fn = fn;
    s->ctx = ctx;
    s->phase = phase;
    s->total = total;
    s->last_ns = now_ns();
    if (fn)
        fn(ctx, phase, 0, total);
}

void progress_report(progress_state *s, uint64_t done)
{
    if (!s->fn)
        return;
    uint64_t t = now_ns();
    if (done >= s->total || t - s->last_ns >= 20000000u) {
        s->last_ns = t;
        s->fn(s->ctx, s->phase, done, s->total);
    }
}
