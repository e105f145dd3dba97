/* The verifier: checks proof bytes against the public inputs only (no files are read). */
#include <stdio.h>
#include <string.h>
#include <stdlib.h>

#include "internal.h"

const char *verify_sector_entry(hasher *h, const proof_params *p, const uint8_t *entry,
                                uint64_t sector_id, const uint8_t comm_r[32],
                                const uint8_t randomness[32], uint64_t sector_index,
                                char *why, size_t why_len)
{
    if (get_u64(entry) != sector_id) {
        snprintf(why, why_len, "proves sector %llu, expected sector %llu",
                 (unsigned long long)get_u64(entry), (unsigned long long)sector_id);
        return why;
    }
    const uint8_t *comm_c = entry + 8, *comm_r_last = entry + 40;
    uint8_t cur[32];
    hash_node(h, comm_c, comm_r_last, cur);
    if (memcmp(cur, comm_r, 32) != 0) {
        snprintf(why, why_len, "sector %llu: H(comm_c, comm_r_last) is not comm_r",
                 (unsigned long long)sector_id);
        return why;
    }
    const uint8_t *e = entry + 72;
    for (uint32_t n = 0; n < p->challenges; n++) {
        uint64_t want = leaf_challenge(h, randomness, sector_id,
                                       challenge_index(p, sector_index, n), p->nodes);
        uint64_t c = get_u64(e);
        if (c != want) {
            snprintf(why, why_len, "sector %llu challenge %u: proves node %llu, challenged "
                     "node is %llu", (unsigned long long)sector_id, n, (unsigned long long)c,
                     (unsigned long long)want);
            return why;
        }
        memcpy(cur, e + 8, 32);
        const uint8_t *siblings = e + 8 + NODE_SIZE;
        for (unsigned level = 0; level < p->height; level++) {
            const uint8_t *sib = siblings + level * NODE_SIZE;
            if ((c >> level) & 1)
                hash_node(h, sib, cur, cur);
            else
                hash_node(h, cur, sib, cur);
        }
        if (memcmp(cur, comm_r_last, 32) != 0) {
            snprintf(why, why_len, "sector %llu challenge %u: inclusion path of node %llu "
                     "does not lead to comm_r_last", (unsigned long long)sector_id, n,
                     (unsigned long long)c);
            return why;
        }
        e += 8 + NODE_SIZE + (size_t)p->height * NODE_SIZE;
    }
    if (h->failed) {
        snprintf(why, why_len, "OpenSSL SHA-256 failed");
        return why;
    }
    return NULL;
}

static const char *check_header(const uint8_t *proof, const proof_params *p, uint32_t partition,
                                uint32_t sectors, const uint8_t randomness[32],
                                const uint8_t prover_id[32])
{
    uint8_t want[PROOF_HEADER_SIZE];
    write_proof_header(want, p, partition, sectors, randomness, prover_id);
    if (memcmp(proof, PROOF_MAGIC, 4) != 0)
        return "not a damocles-ext reference proof (bad magic)";
    if (proof[4] != PROOF_LAYOUT_VERSION)
        return "unknown proof layout version";
    if (memcmp(proof + 5, want + 5, 3) != 0)
        return "proof is for another proof type";
    if (memcmp(proof + 8, want + 8, 4) != 0)
        return "proof is for another partition";
    if (memcmp(proof + 12, want + 12, 12) != 0)
        return "sector count, challenge count or tree height differ from the proof type's";
    if (memcmp(proof + 24, want + 24, 32) != 0)
        return "proof was made for another seed";
    if (memcmp(proof + 56, want + 56, 32) != 0)
        return "proof was made for another miner (prover_id)";
    return NULL;
}

int32_t dext_verify(dext_handle *handle, const dext_post_task *task, const dext_bytes *proofs,
                    size_t proof_count)
{
    proof_params p;
    if (!handle || !task || (proof_count && !proofs)) {
        set_error("dext_verify: NULL argument");
        return DEXT_ERR_INVALID_ARGUMENT;
    }
    if (parse_proof_type(task->proof_type, &p) != 0) {
        set_error("unknown proof type '%s'", task->proof_type ? task->proof_type : "(null)");
        return DEXT_ERR_INVALID_ARGUMENT;
    }
    if (task->replica_count == 0 || !task->replicas) {
        set_error("the task has no replicas");
        return DEXT_ERR_INVALID_ARGUMENT;
    }
    size_t *order = NULL;
    int32_t status = p.kind == KIND_WINDOW ? sorted_replica_order(task, &order) : DEXT_OK;
    if (status != DEXT_OK)
        return status;

    status = DEXT_ERR_INVALID_PROOF;
    hasher h = {0};
    char why[512];
    uint8_t randomness[32], prover_id[32];
    if (hasher_init(&h, handle->md) != 0) {
        set_error("out of memory");
        status = DEXT_ERR_NOMEM;
        goto out;
    }
    masked_seed(task->seed, randomness);
    prover_id_from_miner(task->miner_id, prover_id);
    size_t n = task->replica_count, spp = p.sectors_per_partition;
    size_t entry_size = sector_entry_size(&p);
    size_t partitions = p.kind == KIND_WINDOW ? (n + spp - 1) / spp : 1;
    if (proof_count != partitions) {
        set_error("expected %zu proof%s (one per partition of %zu sectors), got %zu", partitions,
                  partitions == 1 ? "" : "s", spp, proof_count);
        goto out;
    }
    size_t proof_len = PROOF_HEADER_SIZE + spp * entry_size;
    for (size_t part = 0; part < partitions; part++) {
        const uint8_t *proof = proofs[part].ptr;
        if (proofs[part].len != proof_len || !proof) {
            set_error("proof %zu is %zu bytes, expected %zu", part, proofs[part].len, proof_len);
            goto out;
        }
        const char *bad = check_header(proof, &p, (uint32_t)part, (uint32_t)spp, randomness,
                                       prover_id);
        if (bad) {
            set_error("proof %zu: %s", part, bad);
            goto out;
        }
        for (size_t i = 0; i < spp; i++) {
            const uint8_t *entry = proof + PROOF_HEADER_SIZE + i * entry_size;
            size_t s = part * spp + i;
            if (s >= n) {
                /* Padding must repeat the partition's last real sector byte for byte. */
                const uint8_t *last = proof + PROOF_HEADER_SIZE + (n - 1 - part * spp) * entry_size;
                if (memcmp(entry, last, entry_size) != 0) {
                    set_error("proof %zu: padding slot %zu is not a copy of the last sector",
                              part, i);
                    goto out;
                }
                continue;
            }
            const dext_replica *rep;
            uint64_t sector_index;
            if (p.kind == KIND_WINDOW) {
                rep = &task->replicas[order[s]];
                sector_index = s;
            } else {
                uint64_t chosen = winning_sector_choice(&h, prover_id, randomness, i, n);
                rep = &task->replicas[chosen];
                sector_index = i;
            }
            bad = verify_sector_entry(&h, &p, entry, rep->sector_id, rep->comm_r, randomness,
                                      sector_index, why, sizeof(why));
            if (bad && h.failed) {
                /* Zeros from a failed hash prove nothing about the proof. */
                set_error("OpenSSL SHA-256 failed (out of memory?) verifying proof %zu", part);
                status = DEXT_ERR_INTERNAL;
                goto out;
            }
            if (bad) {
                set_error("proof %zu: %s", part, bad);
                goto out;
            }
        }
    }
    status = DEXT_OK;
out:
    free(order);
    hasher_free(&h);
    return status;
}
