/* WindowPoSt and WinningPoSt: sector order, partitions, faults and the result object. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static dext_result *result_new(size_t proofs, size_t faults)
{
    dext_result *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->proofs = calloc(proofs ? proofs : 1, sizeof(dext_bytes));
    r->faults = calloc(faults ? faults : 1, sizeof(uint64_t));
    if (!r->proofs || !r->faults) {
        dext_result_free(r);
        return NULL;
    }
    return r;
}

void dext_result_free(dext_result *result)
{
    if (!result)
        return;
    if (result->proofs)
        for (size_t i = 0; i < result->proof_count; i++)
            free(result->proofs[i].ptr);
    free(result->proofs);
    free(result->faults);
    free(result);
}

static int check_task(const dext_post_task *task, int kind, proof_params *p, const char *what)
{
    if (!task) {
        set_error("%s: task is NULL", what);
        return -1;
    }
    if (parse_proof_type(task->proof_type, p) != 0 || p->kind != kind) {
        set_error("%s: unknown proof type '%s' (expected StackedDrg%s<size>V1%s)", what,
                  task->proof_type ? task->proof_type : "(null)",
                  kind == KIND_WINDOW ? "Window" : "Winning", kind == KIND_WINDOW ? "[_2]" : "");
        return -1;
    }
    if (task->replica_count == 0 || !task->replicas) {
        set_error("%s: the task has no replicas", what);
        return -1;
    }
    for (size_t i = 0; i < task->replica_count; i++)
        if (!task->replicas[i].cache_dir || !task->replicas[i].sealed_file) {
            set_error("%s: replica %zu (sector %llu) has a NULL path", what, i,
                      (unsigned long long)task->replicas[i].sector_id);
            return -1;
        }
    return 0;
}

/* rust-fil-proofs keys the replicas by sector id (a BTreeMap), so the sector index behind the
 * V1 challenge index and the partition split follow ascending sector ids, not the task's order. */
int32_t sorted_replica_order(const dext_post_task *task, size_t **order_out)
{
    size_t n = task->replica_count;
    *order_out = NULL;
    /* A duplicate is the caller's mistake; running out of memory is not, and a caller that
     * hears "invalid argument" for it would reject a good task instead of retrying it. */
    if (n > SIZE_MAX / sizeof(uint64_t)) {
        set_error("out of memory sorting %zu replicas", n);
        return DEXT_ERR_NOMEM;
    }
    size_t *order = malloc(n * sizeof(size_t));
    if (!order) {
        set_error("out of memory sorting %zu replicas", n);
        return DEXT_ERR_NOMEM;
    }
    for (size_t i = 0; i < n; i++)
        order[i] = i;
    /* A bottom-up merge sort of the permutation: qsort has no context argument and a global
     * would not be thread-safe. */
    uint64_t *ids = malloc(n * sizeof(uint64_t));
    if (!ids) {
        free(order);
        set_error("out of memory sorting %zu replicas", n);
        return DEXT_ERR_NOMEM;
    }
    for (size_t i = 0; i < n; i++)
        ids[i] = task->replicas[i].sector_id;
    size_t *tmp = malloc(n * sizeof(size_t));
    if (!tmp) {
        free(order);
        free(ids);
        set_error("out of memory sorting %zu replicas", n);
        return DEXT_ERR_NOMEM;
    }
    for (size_t width = 1; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            size_t mid = lo + width < n ? lo + width : n;
            size_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi)
                tmp[k++] = ids[order[i]] <= ids[order[j]] ? order[i++] : order[j++];
            while (i < mid)
                tmp[k++] = order[i++];
            while (j < hi)
                tmp[k++] = order[j++];
        }
        size_t *swap = order;
        order = tmp;
        tmp = swap;
    }
    free(tmp);
    for (size_t i = 1; i < n; i++)
        if (ids[order[i]] == ids[order[i - 1]]) {
            set_error("sector %llu appears twice in the task (replicas %zu and %zu)",
                      (unsigned long long)ids[order[i]], order[i - 1], order[i]);
            free(order);
            free(ids);
            return DEXT_ERR_INVALID_ARGUMENT;
        }
    free(ids);
    *order_out = order;
    return DEXT_OK;
}

/* A WindowPoSt's faulty sectors whose reasons are written on stderr, one line each (the result
 * holds the sector ids only): a lost mount makes thousands of faults for one reason, and the
 * host's log of a child's stderr is capped, so the rest are one line with their count. */
#define FAULT_REASONS_WRITTEN 20

/* One line on stderr, written by one call (a line of its own between other threads' lines). */
static void say_fault(uint64_t sector_id, const char *why)
{
    fprintf(stderr, "dext reference prover: window_post: sector %llu is faulty: %s\n",
            (unsigned long long)sector_id, why);
}

int32_t dext_window_post(dext_handle *handle, const dext_post_task *task,
                         dext_progress_fn progress, void *progress_ctx,
                         const volatile int32_t *cancel, dext_result **result_out)
{
    proof_params p;
    if (result_out)
        *result_out = NULL;
    if (!handle || !result_out) {
        set_error("dext_window_post: NULL handle or result pointer");
        return DEXT_ERR_INVALID_ARGUMENT;
    }
    if (check_task(task, KIND_WINDOW, &p, "window_post") != 0)
        return DEXT_ERR_INVALID_ARGUMENT;
    size_t *order = NULL;
    int32_t status = sorted_replica_order(task, &order);
    if (status != DEXT_OK)
        return status;

    status = DEXT_ERR_NOMEM;
    size_t n = task->replica_count;
    size_t entry_size = sector_entry_size(&p);
    uint8_t *entries = n <= SIZE_MAX / entry_size ? malloc(n * entry_size) : NULL;
    uint64_t *faults = malloc(n * sizeof(uint64_t));
    size_t fault_count = 0;
    dext_result *result = NULL;
    hasher h = {0};
    uint8_t randomness[32], prover_id[32];
    char why[1024];
    if (!entries || !faults || hasher_init(&h, handle->md) != 0) {
        set_error("out of memory for the proofs of %zu sectors", n);
        goto out;
    }
    masked_seed(task->seed, randomness);
    prover_id_from_miner(task->miner_id, prover_id);

    progress_state prog;
    progress_begin(&prog, progress, progress_ctx, "window_post", n);
    for (size_t i = 0; i < n; i++) {
        if (is_cancelled(cancel)) {
            set_error("cancelled after %zu of %zu sectors", i, n);
            status = DEXT_ERR_CANCELLED;
            goto out;
        }
        const dext_replica *rep = &task->replicas[order[i]];
        int rc = prove_sector(&h, &p, rep, randomness, i, entries + i * entry_size, why,
                              sizeof(why));
        if (rc == -2) {
            set_error("sector %llu: %s", (unsigned long long)rep->sector_id, why);
            status = DEXT_ERR_INTERNAL;
            goto out;
        }
        if (rc < 0) {
            set_error("out of memory proving sector %llu", (unsigned long long)rep->sector_id);
            goto out;
        }
        if (rc > 0) {
            faults[fault_count++] = rep->sector_id; /* ascending: we walk in sector id order */
            if (fault_count <= FAULT_REASONS_WRITTEN)
                say_fault(rep->sector_id, why);
        }
        progress_report(&prog, i + 1);
    }
    if (fault_count > FAULT_REASONS_WRITTEN)
        fprintf(stderr,
                "dext reference prover: window_post: %zu more faulty sectors, the first of them "
                "%llu and the last %llu (their reasons are not written: a task's first %d only "
                "are)\n",
                fault_count - FAULT_REASONS_WRITTEN,
                (unsigned long long)faults[FAULT_REASONS_WRITTEN],
                (unsigned long long)faults[fault_count - 1], FAULT_REASONS_WRITTEN);

    size_t spp = p.sectors_per_partition;
    size_t partitions = fault_count ? 0 : (n + spp - 1) / spp;
    result = result_new(partitions, fault_count);
    if (!result) {
        set_error("out of memory");
        goto out;
    }
    memcpy(result->faults, faults, fault_count * sizeof(uint64_t));
    result->fault_count = fault_count;
    size_t proof_len = PROOF_HEADER_SIZE + spp * entry_size;
    for (size_t part = 0; part < partitions; part++) {
        uint8_t *proof = malloc(proof_len);
        if (!proof) {
            set_error("out of memory");
            goto out;
        }
        result->proofs[part].ptr = proof;
        result->proofs[part].len = proof_len;
        result->proof_count = part + 1;
        write_proof_header(proof, &p, (uint32_t)part, (uint32_t)spp, randomness, prover_id);
        for (size_t i = 0; i < spp; i++) {
            /* A short last partition repeats its last sector, as rust-fil-proofs pads it for the
             * circuit. */
            size_t s = part * spp + i < n ? part * spp + i : n - 1;
            memcpy(proof + PROOF_HEADER_SIZE + i * entry_size, entries + s * entry_size,
                   entry_size);
        }
    }
    *result_out = result;
    result = NULL;
    status = DEXT_OK;
out:
    dext_result_free(result);
    free(order);
    free(entries);
    free(faults);
    hasher_free(&h);
    return status;
}

int32_t dext_winning_post(dext_handle *handle, const dext_post_task *task,
                          dext_progress_fn progress, void *progress_ctx,
                          const volatile int32_t *cancel, dext_result **result_out)
{
    proof_params p;
    if (result_out)
        *result_out = NULL;
    if (!handle || !result_out) {
        set_error("dext_winning_post: NULL handle or result pointer");
        return DEXT_ERR_INVALID_ARGUMENT;
    }
    if (check_task(task, KIND_WINNING, &p, "winning_post") != 0)
        return DEXT_ERR_INVALID_ARGUMENT;

    int32_t status = DEXT_ERR_NOMEM;
    size_t entry_size = sector_entry_size(&p);
    size_t proof_len = PROOF_HEADER_SIZE + WINNING_SECTORS * entry_size;
    uint8_t *proof = malloc(proof_len);
    dext_result *result = NULL;
    hasher h = {0};
    uint8_t randomness[32], prover_id[32];
    char why[1024];
    if (!proof || hasher_init(&h, handle->md) != 0) {
        set_error("out of memory");
        goto out;
    }
    masked_seed(task->seed, randomness);
    prover_id_from_miner(task->miner_id, prover_id);
    write_proof_header(proof, &p, 0, WINNING_SECTORS, randomness, prover_id);

    progress_state prog;
    progress_begin(&prog, progress, progress_ctx, "winning_post", WINNING_SECTORS);
    /* The replicas are the eligible set (damocles-manager sends the one already chosen). */
    for (uint32_t k = 0; k < WINNING_SECTORS; k++) {
        if (is_cancelled(cancel)) {
            set_error("cancelled");
            status = DEXT_ERR_CANCELLED;
            goto out;
        }
        uint64_t chosen = winning_sector_choice(&h, prover_id, randomness, k, task->replica_count);
        const dext_replica *rep = &task->replicas[chosen];
        int rc = prove_sector(&h, &p, rep, randomness, k,
                              proof + PROOF_HEADER_SIZE + k * entry_size, why, sizeof(why));
        if (rc == -2) {
            set_error("sector %llu: %s", (unsigned long long)rep->sector_id, why);
            status = DEXT_ERR_INTERNAL;
            goto out;
        }
        if (rc < 0) {
            set_error("out of memory proving sector %llu", (unsigned long long)rep->sector_id);
            goto out;
        }
        if (rc > 0) {
            set_error("sector %llu (chosen from %zu eligible) is faulty: %s",
                      (unsigned long long)rep->sector_id, task->replica_count, why);
            status = DEXT_ERR_SECTOR;
            goto out;
        }
        progress_report(&prog, k + 1);
    }
    result = result_new(1, 0);
    if (!result) {
        set_error("out of memory");
        goto out;
    }
    result->proofs[0].ptr = proof;
    result->proofs[0].len = proof_len;
    result->proof_count = 1;
    proof = NULL;
    *result_out = result;
    status = DEXT_OK;
out:
    free(proof);
    hasher_free(&h);
    return status;
}
