/* Internals shared by the reference prover's source files (not part of the ABI). */
#ifndef DEXT_INTERNAL_H
#define DEXT_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

#include "dext_prover.h"

/* Only the ABI functions are exported from the shared library. */
#pragma GCC visibility push(hidden)

#define NODE_SIZE 32
#define P_AUX_NAME "p_aux"
#define TREE_FILE_NAME "sc-02-data-tree-r-last.dat"

/* Proving reads 2^(rows_to_discard+1) nodes per challenge; beyond this the "tree" on disk would
 * be a root with almost nothing under it, and a challenge would read megabytes. */
#define MAX_ROWS_TO_DISCARD 20

/* Proof layout (see native/README.md and damocles_ext/post/layout.py). */
#define PROOF_MAGIC "DXPP"
#define PROOF_LAYOUT_VERSION 1
#define PROOF_HEADER_SIZE 88

#define KIND_WINDOW 1
#define KIND_WINNING 2
#define API_V1 0
#define API_V1_2 2

#define WINDOW_CHALLENGES 10
#define WINNING_CHALLENGES 66
#define WINNING_SECTORS 1

struct dext_handle {
    EVP_MD *md;
    unsigned rows_to_discard; /* used when building trees; proving reads it from the file size */
};

typedef struct proof_params {
    int kind;              /* KIND_WINDOW or KIND_WINNING */
    int size_code;         /* index into 2KiB, 8MiB, 512MiB, 32GiB, 64GiB */
    int api_version;       /* API_V1 or API_V1_2 */
    uint64_t nodes;        /* sector size / 32, a power of two */
    unsigned height;       /* log2(nodes): siblings per inclusion path */
    uint32_t sectors_per_partition;
    uint32_t challenges;   /* per sector */
} proof_params;

/* 0 and *out filled, or -1 for an unknown proof type string. */
int parse_proof_type(const char *name, proof_params *out);
size_t sector_entry_size(const proof_params *p);

/* One EVP context per proving call: contexts are not thread-safe, the fetched EVP_MD is. */
typedef struct hasher {
    EVP_MD_CTX *ctx;
    const EVP_MD *md;
    int failed;
} hasher;

int hasher_init(hasher *h, const EVP_MD *md);
void hasher_free(hasher *h);
void sha256(hasher *h, const void *data, size_t len, uint8_t out[32]);
/* The tree hash: SHA256(a || b) with the result trimmed to 254 bits (out[31] &= 0x3f). */
void hash_node(hasher *h, const uint8_t *a, const uint8_t *b, uint8_t *out);

void prover_id_from_miner(uint64_t miner_id, uint8_t out[32]);
void masked_seed(const uint8_t seed[32], uint8_t out[32]);
uint64_t challenge_index(const proof_params *p, uint64_t sector_index, uint32_t n);
uint64_t leaf_challenge(hasher *h, const uint8_t randomness[32], uint64_t sector_id,
                        uint64_t challenge_index, uint64_t nodes);
uint64_t winning_sector_choice(hasher *h, const uint8_t prover_id[32],
                               const uint8_t randomness[32], uint64_t n, uint64_t eligible);

void put_u32(uint8_t *p, uint32_t v);
void put_u64(uint8_t *p, uint64_t v);
uint32_t get_u32(const uint8_t *p);
uint64_t get_u64(const uint8_t *p);

/* Writes the 88-byte proof header. */
void write_proof_header(uint8_t *out, const proof_params *p, uint32_t partition,
                        uint32_t sectors, const uint8_t randomness[32],
                        const uint8_t prover_id[32]);

/* Thread-local last error. */
void set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Calls the progress callback at the start, the end and at most every 20 ms in between, so a
 * Python callback (which also bridges cancellation) costs nothing measurable. */
typedef struct progress_state {
    dext_progress_fn fn;
    void *ctx;
    const char *phase;
    uint64_t total;
    uint64_t last_ns;
} progress_state;

void progress_begin(progress_state *s, dext_progress_fn fn, void *ctx, const char *phase,
                    uint64_t total);
void progress_report(progress_state *s, uint64_t done);

static inline int is_cancelled(const volatile int32_t *cancel)
{
    return dext_cancel_requested(cancel);
}

/* Prove one sector: fill entry (sector_entry_size bytes). 0 = proven, 1 = fault (reason in why),
 * -1 = out of memory, -2 = SHA-256 failed in OpenSSL (reason in why; not the sector's fault). */
int prove_sector(hasher *h, const proof_params *p, const dext_replica *replica,
                 const uint8_t randomness[32], uint64_t sector_index, uint8_t *entry,
                 char *why, size_t why_len);

/* Replica indices in ascending sector id order: DEXT_OK and *order_out malloc'ed, or with the
 * error set DEXT_ERR_INVALID_ARGUMENT (a sector id twice) or DEXT_ERR_NOMEM, and *order_out NULL. */
int32_t sorted_replica_order(const dext_post_task *task, size_t **order_out);

/* NULL when the entry checks out for this sector, else a static/thread-local reason. */
const char *verify_sector_entry(hasher *h, const proof_params *p, const uint8_t *entry,
                                uint64_t sector_id, const uint8_t comm_r[32],
                                const uint8_t randomness[32], uint64_t sector_index,
                                char *why, size_t why_len);

#pragma GCC visibility pop

#endif
