/*
 * dext_prover.h: the C ABI of a damocles-ext native PoSt prover (ABI version 1).
 *
 * A vendor library (typically a GPU prover) implements the functions below and is loaded by the
 * `native` plugin with `PluginOptions = { library = "/path/libvendor.so" }`. The semantics
 * (ownership, threads, errors, cancellation) are described in native/README.md; the layout of
 * the proof bytes of the reference prover is in the same file.
 *
 * The part between the cdef markers is also read by native/build_ffi.py as the cffi cdef, so it
 * holds only declarations cffi understands: no #if, no macros other than integer #defines.
 *
 * Cancellation contract (the `cancel` argument of dext_window_post, dext_winning_post and
 * dext_build_tree):
 * - It points to an int32_t owned by the host, valid for the duration of the call only; it may
 *   be NULL (the call cannot be cancelled).
 * - Only the host writes it, and only from 0 to 1 (it never goes back to 0 during a call). It may
 *   already be 1 when the call starts. The host writes it from any thread, usually not the one
 *   running the call, with an atomic store of memory order release (or stronger).
 * - The library only reads it, with atomic loads (memory order relaxed suffices: the flag guards
 *   no other data), from the calling thread or any thread of its own, between units of work, and
 *   returns DEXT_ERR_CANCELLED promptly once it reads non-zero. It stops reading before the call
 *   returns. A plain or volatile read is a data race in C11 and C++11: use
 *   dext_cancel_requested() below, C11 atomic_load_explicit, C++20 std::atomic_ref<int32_t>
 *   (after a const_cast), or __atomic_load_n.
 * - The pointer type stays `const volatile int32_t *`, as in the first release of ABI version 1,
 *   so that existing libraries (C, C++ and CUDA alike) keep compiling and linking; a lock-free
 *   32-bit atomic has the same size, alignment and representation as int32_t on every platform
 *   damocles-ext supports.
 */
#ifndef DEXT_PROVER_H
#define DEXT_PROVER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */
#define DEXT_PROVER_ABI_VERSION 1

/* Status codes returned by every int32_t function. */
#define DEXT_OK 0
#define DEXT_ERR_INVALID_ARGUMENT 1 /* bad task or arguments: the caller's mistake */
#define DEXT_ERR_SECTOR 2           /* a sector cannot be used (winning_post, build_tree) */
#define DEXT_ERR_CANCELLED 3        /* *cancel became non-zero */
#define DEXT_ERR_IO 4               /* writing output files failed (build_tree) */
#define DEXT_ERR_NOMEM 5            /* an allocation failed: not the task's fault, retry later */
#define DEXT_ERR_INVALID_PROOF 6    /* dext_verify: the proof does not check out */
#define DEXT_ERR_INTERNAL 7

typedef struct dext_handle dext_handle; /* opaque, owned by the library */

typedef struct dext_replica {
    uint64_t sector_id;
    uint8_t comm_r[32];
    const char *cache_dir;   /* NUL-terminated path; holds p_aux and the tree-r-last file */
    const char *sealed_file; /* NUL-terminated path of the sealed replica */
} dext_replica;

typedef struct dext_post_task {
    uint64_t miner_id;          /* actor id of the miner (f0<miner_id>) */
    const char *proof_type;     /* e.g. "StackedDrgWindow32GiBV1_2", "StackedDrgWinning32GiBV1" */
    uint8_t seed[32];           /* randomness; the prover clears the top 2 bits of seed[31] */
    const dext_replica *replicas;
    size_t replica_count;
} dext_post_task;

typedef struct dext_bytes {
    uint8_t *ptr;
    size_t len;
} dext_bytes;

/* Allocated by the library, released only with dext_result_free of the same library. */
typedef struct dext_result {
    dext_bytes *proofs;  /* window_post: one per partition; winning_post: exactly one */
    size_t proof_count;
    uint64_t *faults;    /* faulty sector ids, ascending; non-empty => proof_count == 0 */
    size_t fault_count;  /* at most the task's replica count */
} dext_result;

/* Called on the proving thread; phase is a short static string ("window_post", "build_tree"). */
typedef void (*dext_progress_fn)(void *ctx, const char *phase, uint64_t done, uint64_t total);

uint32_t dext_abi_version(void);

/* options_json: a JSON object (NULL or "" for defaults). NULL on error: see dext_last_error(NULL). */
dext_handle *dext_open(const char *options_json);
void dext_close(dext_handle *handle);

/* The message of the last failed call made by this thread; never NULL, valid until this thread's
 * next call into the library. */
const char *dext_last_error(dext_handle *handle);

/* On DEXT_OK *result_out is set; on any other status it is set to NULL. progress may be NULL;
 * cancel may be NULL (its contract is at the top of this file). */
int32_t dext_window_post(dext_handle *handle, const dext_post_task *task,
                         dext_progress_fn progress, void *progress_ctx,
                         const volatile int32_t *cancel, dext_result **result_out);
int32_t dext_winning_post(dext_handle *handle, const dext_post_task *task,
                          dext_progress_fn progress, void *progress_ctx,
                          const volatile int32_t *cancel, dext_result **result_out);
void dext_result_free(dext_result *result);

/* DEXT_OK when the proofs are valid for the public inputs in task (proof type, miner, seed,
 * sector ids, comm_r; paths are ignored), DEXT_ERR_INVALID_PROOF with the reason otherwise. */
int32_t dext_verify(dext_handle *handle, const dext_post_task *task,
                    const dext_bytes *proofs, size_t proof_count);

/* Optional for vendors (used by fixtures): build the tree of sealed_file, write cache_dir/p_aux
 * (comm_c || comm_r_last) and cache_dir/sc-02-data-tree-r-last.dat, and return comm_r. */
int32_t dext_build_tree(dext_handle *handle, const char *proof_type, const char *sealed_file,
                        const char *cache_dir, const uint8_t *comm_c, uint8_t *comm_r_out,
                        dext_progress_fn progress, void *progress_ctx,
                        const volatile int32_t *cancel);
/* cdef-end */

/* Whether the host asked the call to stop: an atomic load of the cancel flag (see the contract
 * at the top). NULL means never. */
#if defined(__GNUC__) || defined(__clang__)
static inline int dext_cancel_requested(const volatile int32_t *cancel)
{
    return cancel != NULL && __atomic_load_n(cancel, __ATOMIC_RELAXED) != 0;
}
#elif !defined(__cplusplus) && defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && \
    !defined(__STDC_NO_ATOMICS__)
#include <stdatomic.h>
static inline int dext_cancel_requested(const volatile int32_t *cancel)
{
    const volatile _Atomic int32_t *flag = (const volatile _Atomic int32_t *)cancel;
    return flag != NULL && atomic_load_explicit(flag, memory_order_relaxed) != 0;
}
#endif

#ifdef __cplusplus
}
#endif

#endif /* DEXT_PROVER_H */
