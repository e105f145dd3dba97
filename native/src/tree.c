/* The replica's Merkle tree: building it (fixtures) and proving challenges against it.
 *
 * Levels: 0 is the replica itself (nodes = sector size / 32), level `height` is the root. The
 * tree file keeps levels rows_to_discard+1 .. height, lowest first, each level's nodes in order;
 * level 0 is never stored (it is the sealed file) and the rows 1..rows_to_discard are recomputed
 * from the sealed file when proving, as rust-fil-proofs does with its LevelCacheStore.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/* Leaves hashed per step while building: bounds memory for large sectors. */
#define BUILD_CHUNK_NODES ((uint64_t)1 << 15)
/* Tree files up to this size are read whole instead of node by node. */
#define SMALL_TREE_FILE (1u << 20)
/* Opens an input file for reading. With O_NONBLOCK: a FIFO where a file should be (no writer)
 * would block open() for ever, where no cancel flag is read; opened at once, it is then refused
 * as not a regular file or as one of the wrong size. A regular file's descriptor loses the flag
 * (a FUSE daemon sees it on every read, and may answer EAGAIN), and one that a lease holds
 * (Samba's oplocks, an NFS delegation: EWOULDBLOCK at once) is opened again, waiting for the
 * lease to break, as a plain open() does. */
static int open_input(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    struct stat st;
    if (fd < 0) {
        int e = errno;
        if (e == EWOULDBLOCK && stat(path, &st) == 0 && S_ISREG(st.st_mode))
            return open(path, O_RDONLY | O_CLOEXEC);
        errno = e;
        return -1;
    }
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        int flags = fcntl(fd, F_GETFL);
        if (flags >= 0)
            (void)fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    }
    return fd;
}

/* Offset, in nodes, of `level` inside a tree file that starts at level rows+1. */
static uint64_t level_offset(uint64_t nodes, unsigned rows, unsigned level)
{
    return (nodes >> rows) - (nodes >> (level - 1));
}

static uint64_t tree_file_nodes(uint64_t nodes, unsigned rows)
{
    return (nodes >> rows) - 1;
}

static int read_full(int fd, void *buf, size_t len, off_t offset)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = pread(fd, p, len, offset);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0)
            errno = ENODATA; /* the file ended early (it shrank since its fstat): no errno is
                              * set, and the caller's message would give a stale one */
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
        offset += n;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t len, off_t offset)
{
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = pwrite(fd, p, len, offset);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0)
            errno = EIO; /* no progress and no errno: do not report a stale one */
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
        offset += n;
    }
    return 0;
}

/* 0, or -1 when the path does not fit. */
static int join_path(char *out, size_t len, const char *dir, const char *name)
{
    int n = snprintf(out, len, "%s/%s", dir, name);
    return n < 0 || (size_t)n >= len ? -1 : 0;
}

/* Hash `count` nodes pairwise in place: buf[i] = H(buf[2i], buf[2i+1]). */
static void reduce_level(hasher *h, uint8_t *buf, uint64_t count)
{
    for (uint64_t i = 0; i < count / 2; i++)
        hash_node(h, buf + 2 * i * NODE_SIZE, buf + (2 * i + 1) * NODE_SIZE, buf + i * NODE_SIZE);
}

/* 0, or -1 with errno saying why; on failure neither a descriptor nor the temporary file is
 * left behind, and errno is the failed step's (not the clean-up's), for the caller's message. */
static int write_file_atomically(const char *path, const uint8_t *data, size_t len)
{
    char tmp[4200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    int rc = write_full(fd, data, len, 0);
    int saved = errno;
    /* Linux releases the descriptor even when close fails, so it is closed exactly once. */
    if (close(fd) != 0 && rc == 0) {
        rc = -1;
        saved = errno;
    }
    if (rc == 0 && rename(tmp, path) != 0) {
        rc = -1;
        saved = errno;
    }
    if (rc != 0) {
        unlink(tmp);
        errno = saved;
    }
    return rc;
}

int32_t dext_build_tree(dext_handle *handle, const char *proof_type, const char *sealed_file,
                        const char *cache_dir, const uint8_t *comm_c, uint8_t *comm_r_out,
                        dext_progress_fn progress, void *progress_ctx,
                        const volatile int32_t *cancel)
{
    proof_params p;
    if (!handle || !sealed_file || !cache_dir || !comm_c || !comm_r_out) {
        set_error("dext_build_tree: NULL argument");
        return DEXT_ERR_INVALID_ARGUMENT;
    }
    if (parse_proof_type(proof_type, &p) != 0) {
        set_error("unknown proof type '%s'", proof_type ? proof_type : "(null)");
        return DEXT_ERR_INVALID_ARGUMENT;
    }
    unsigned rows = handle->rows_to_discard;
    if (rows >= p.height) {
        set_error("rows_to_discard %u leaves no tree for %s (its tree has %u rows above the "
                  "data); use at most %u", rows, proof_type, p.height, p.height - 1);
        return DEXT_ERR_INVALID_ARGUMENT;
    }

    int32_t status = DEXT_ERR_INTERNAL;
    int sealed = -1, tree = -1;
    uint8_t *chunk = NULL, *tops = NULL;
    hasher h = {0};
    char tree_path[4096], tmp_path[4200], paux_path[4096];
    if (join_path(tree_path, sizeof(tree_path), cache_dir, TREE_FILE_NAME) != 0 ||
        join_path(paux_path, sizeof(paux_path), cache_dir, P_AUX_NAME) != 0) {
        set_error("cache dir path is too long: %.200s...", cache_dir);
        return DEXT_ERR_INVALID_ARGUMENT;
    }
    snprintf(tmp_path, sizeof(tmp_path), "%s.tmp", tree_path);

    sealed = open_input(sealed_file);
    struct stat st;
    if (sealed < 0 || fstat(sealed, &st) != 0) {
        set_error("cannot open sealed file %s: %s", sealed_file, strerror(errno));
        status = DEXT_ERR_SECTOR;
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        set_error("sealed file %s is not a regular file", sealed_file);
        status = DEXT_ERR_SECTOR;
        goto out;
    }
    if ((uint64_t)st.st_size != p.nodes * NODE_SIZE) {
        set_error("sealed file %s is %lld bytes; %s needs exactly %llu", sealed_file,
                  (long long)st.st_size, proof_type,
                  (unsigned long long)(p.nodes * NODE_SIZE));
        status = DEXT_ERR_SECTOR;
        goto out;
    }
    if (mkdir(cache_dir, 0755) != 0 && errno != EEXIST) {
        set_error("cannot create cache dir %s: %s", cache_dir, strerror(errno));
        status = DEXT_ERR_IO;
        goto out;
    }
    tree = open(tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (tree < 0) {
        set_error("cannot write %s: %s", tmp_path, strerror(errno));
        status = DEXT_ERR_IO;
        goto out;
    }

    uint64_t chunk_nodes = p.nodes < BUILD_CHUNK_NODES ? p.nodes : BUILD_CHUNK_NODES;
    unsigned chunk_height = 0;
    while (((uint64_t)1 << chunk_height) < chunk_nodes)
        chunk_height++;
    uint64_t chunks = p.nodes / chunk_nodes;
    chunk = malloc(chunk_nodes * NODE_SIZE);
    tops = malloc(chunks * NODE_SIZE);
    if (!chunk || !tops || hasher_init(&h, handle->md) != 0) {
        set_error("out of memory building the tree of %s", sealed_file);
        status = DEXT_ERR_NOMEM;
        goto out;
    }

    progress_state prog;
    progress_begin(&prog, progress, progress_ctx, "build_tree", p.nodes);
    /* Each chunk is a complete subtree; its levels above `rows` go straight to their place in
     * the file, and its root joins the top part computed at the end. */
    for (uint64_t k = 0; k < chunks; k++) {
        if (is_cancelled(cancel)) {
            set_error("cancelled");
            status = DEXT_ERR_CANCELLED;
            goto out;
        }
        if (read_full(sealed, chunk, chunk_nodes * NODE_SIZE, (off_t)(k * chunk_nodes * NODE_SIZE))) {
            set_error("cannot read sealed file %s: %s", sealed_file, strerror(errno));
            status = DEXT_ERR_SECTOR;
            goto out;
        }
        uint64_t count = chunk_nodes;
        for (unsigned level = 1; level <= chunk_height; level++) {
            reduce_level(&h, chunk, count);
            count /= 2;
            if (level > rows) {
                off_t off = (off_t)((level_offset(p.nodes, rows, level) + k * count) * NODE_SIZE);
                if (write_full(tree, chunk, count * NODE_SIZE, off)) {
                    set_error("cannot write %s: %s", tmp_path, strerror(errno));
                    status = DEXT_ERR_IO;
                    goto out;
                }
            }
        }
        memcpy(tops + k * NODE_SIZE, chunk, NODE_SIZE);
        progress_report(&prog, (k + 1) * chunk_nodes);
    }
    uint64_t count = chunks;
    for (unsigned level = chunk_height + 1; level <= p.height; level++) {
        reduce_level(&h, tops, count);
        count /= 2;
        if (level > rows) {
            off_t off = (off_t)(level_offset(p.nodes, rows, level) * NODE_SIZE);
            if (write_full(tree, tops, count * NODE_SIZE, off)) {
                set_error("cannot write %s: %s", tmp_path, strerror(errno));
                status = DEXT_ERR_IO;
                goto out;
            }
        }
    }
    if (h.failed) {
        set_error("OpenSSL SHA-256 failed while building the tree of %s", sealed_file);
        status = DEXT_ERR_INTERNAL;
        goto out;
    }
    int rc = close(tree);
    tree = -1;
    if (rc != 0 || rename(tmp_path, tree_path) != 0) {
        set_error("cannot write %s: %s", tree_path, strerror(errno));
        unlink(tmp_path); /* closed above, so the clean-up at `out` no longer removes it */
        status = DEXT_ERR_IO;
        goto out;
    }
    uint8_t paux[64];
    memcpy(paux, comm_c, 32);
    memcpy(paux + 32, tops, 32); /* comm_r_last: the root */
    if (write_file_atomically(paux_path, paux, sizeof(paux)) != 0) {
        set_error("cannot write %s: %s", paux_path, strerror(errno));
        status = DEXT_ERR_IO;
        goto out;
    }
    hash_node(&h, comm_c, tops, comm_r_out);
    status = h.failed ? DEXT_ERR_INTERNAL : DEXT_OK;
    if (h.failed)
        set_error("OpenSSL SHA-256 failed");
out:
    if (tree >= 0) {
        close(tree);
        unlink(tmp_path);
    }
    if (sealed >= 0)
        close(sealed);
    free(chunk);
    free(tops);
    hasher_free(&h);
    return status;
}

/* ---- proving ---------------------------------------------------------------------------- */

typedef struct tree_reader {
    int fd;
    uint8_t *whole; /* the whole file when small, else NULL */
    uint64_t nodes;
    unsigned rows;
} tree_reader;

static int tree_node(const tree_reader *t, unsigned level, uint64_t index, uint8_t *out)
{
    uint64_t at = level_offset(t->nodes, t->rows, level) + index;
    if (t->whole) {
        memcpy(out, t->whole + at * NODE_SIZE, NODE_SIZE);
        return 0;
    }
    return read_full(t->fd, out, NODE_SIZE, (off_t)(at * NODE_SIZE));
}

static int read_small_file(const char *path, uint8_t *buf, size_t want, size_t *got)
{
    int fd = open_input(path);
    if (fd < 0)
        return -1;
    size_t n = 0;
    /* Read one byte more than wanted so a long file is noticed. */
    while (n < want + 1) {
        ssize_t r = read(fd, buf + n, want + 1 - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    *got = n;
    return 0;
}

/* A failed hash is no evidence against the sector (its outputs are zeros, so nothing checks
 * out): reporting a fault then would have a good sector declared faulty. */
#define FAULT(...)                                                                  \
    do {                                                                            \
        if (h->failed) {                                                            \
            snprintf(why, why_len, "OpenSSL SHA-256 failed (out of memory?)");      \
            result = -2;                                                            \
        } else {                                                                    \
            snprintf(why, why_len, __VA_ARGS__);                                    \
            result = 1;                                                             \
        }                                                                           \
        goto out;                                                                   \
    } while (0)

int prove_sector(hasher *h, const proof_params *p, const dext_replica *replica,
                 const uint8_t randomness[32], uint64_t sector_index, uint8_t *entry,
                 char *why, size_t why_len)
{
    int result = 0;
    int sealed = -1;
    tree_reader tree = {.fd = -1, .whole = NULL, .nodes = p->nodes};
    uint8_t *block = NULL;
    char path[4096];
    uint8_t paux[65];
    size_t got = 0;
    struct stat st;
    const uint8_t *comm_c = paux, *comm_r_last = paux + 32;

    sealed = open_input(replica->sealed_file);
    if (sealed < 0)
        FAULT("cannot open sealed file %s: %s", replica->sealed_file, strerror(errno));
    if (fstat(sealed, &st) != 0 || !S_ISREG(st.st_mode))
        FAULT("sealed file %s is not a regular file", replica->sealed_file);
    if ((uint64_t)st.st_size != p->nodes * NODE_SIZE)
        FAULT("sealed file %s is %lld bytes, expected %llu", replica->sealed_file,
              (long long)st.st_size, (unsigned long long)(p->nodes * NODE_SIZE));

    if (join_path(path, sizeof(path), replica->cache_dir, P_AUX_NAME) != 0)
        FAULT("cache dir path is too long: %.200s...", replica->cache_dir);
    if (read_small_file(path, paux, 64, &got) != 0)
        FAULT("cannot read %s: %s", path, strerror(errno));
    if (got != 64)
        FAULT("%s is %s64 bytes", path, got < 64 ? "shorter than " : "longer than ");
    uint8_t comm_r[32];
    hash_node(h, comm_c, comm_r_last, comm_r);
    if (memcmp(comm_r, replica->comm_r, 32) != 0)
        FAULT("comm_r of sector %llu does not match H(comm_c, comm_r_last) from %s",
              (unsigned long long)replica->sector_id, path);

    if (join_path(path, sizeof(path), replica->cache_dir, TREE_FILE_NAME) != 0)
        FAULT("cache dir path is too long: %.200s...", replica->cache_dir);
    tree.fd = open_input(path);
    if (tree.fd < 0 || fstat(tree.fd, &st) != 0)
        FAULT("cannot open tree file %s: %s", path, strerror(errno));
    /* The file size says how many rows were discarded when it was written. */
    int rows = -1;
    for (unsigned r = 0; r < p->height && r <= MAX_ROWS_TO_DISCARD; r++)
        if ((uint64_t)st.st_size == tree_file_nodes(p->nodes, r) * NODE_SIZE)
            rows = (int)r;
    if (rows < 0)
        FAULT("tree file %s has %lld bytes: not a tree of %llu nodes with at most %d rows "
              "discarded", path, (long long)st.st_size, (unsigned long long)p->nodes,
              MAX_ROWS_TO_DISCARD);
    tree.rows = (unsigned)rows;
    if ((uint64_t)st.st_size <= SMALL_TREE_FILE) {
        tree.whole = malloc((size_t)st.st_size);
        if (!tree.whole)
            goto oom;
        if (read_full(tree.fd, tree.whole, (size_t)st.st_size, 0) != 0)
            FAULT("cannot read tree file %s: %s", path, strerror(errno));
    }
    uint8_t root[32];
    if (tree_node(&tree, p->height, 0, root) != 0)
        FAULT("cannot read tree file %s: %s", path, strerror(errno));
    if (memcmp(root, comm_r_last, 32) != 0)
        FAULT("root of tree file %s does not match comm_r_last in p_aux", path);

    uint64_t block_nodes = (uint64_t)1 << (tree.rows + 1);
    block = malloc(block_nodes * NODE_SIZE);
    if (!block)
        goto oom;

    uint8_t *e = entry;
    put_u64(e, replica->sector_id);
    memcpy(e + 8, comm_c, 32);
    memcpy(e + 40, comm_r_last, 32);
    e += 72;
    for (uint32_t n = 0; n < p->challenges; n++) {
        uint64_t c = leaf_challenge(h, randomness, replica->sector_id,
                                    challenge_index(p, sector_index, n), p->nodes);
        uint64_t start = c & ~(block_nodes - 1);
        if (read_full(sealed, block, block_nodes * NODE_SIZE, (off_t)(start * NODE_SIZE)) != 0)
            FAULT("cannot read sealed file %s at node %llu: %s", replica->sealed_file,
                  (unsigned long long)start, strerror(errno));
        put_u64(e, c);
        memcpy(e + 8, block + (c - start) * NODE_SIZE, NODE_SIZE);
        uint8_t *siblings = e + 8 + NODE_SIZE;
        /* The discarded rows: recompute them from the replica, taking each level's sibling. */
        uint64_t count = block_nodes;
        for (unsigned level = 0; level <= tree.rows; level++) {
            uint64_t sib = ((c >> level) ^ 1) - (start >> level);
            memcpy(siblings + level * NODE_SIZE, block + sib * NODE_SIZE, NODE_SIZE);
            reduce_level(h, block, count);
            count /= 2;
        }
        uint8_t cur[32];
        memcpy(cur, block, 32);
        for (unsigned level = tree.rows + 1; level < p->height; level++) {
            uint8_t *sib = siblings + level * NODE_SIZE;
            if (tree_node(&tree, level, (c >> level) ^ 1, sib) != 0)
                FAULT("cannot read tree file %s: %s", path, strerror(errno));
            if ((c >> level) & 1)
                hash_node(h, sib, cur, cur);
            else
                hash_node(h, cur, sib, cur);
        }
        if (memcmp(cur, comm_r_last, 32) != 0)
            FAULT("challenged node %llu of sector %llu does not hash up to comm_r_last",
                  (unsigned long long)c, (unsigned long long)replica->sector_id);
        e += 8 + NODE_SIZE + (size_t)p->height * NODE_SIZE;
    }
    if (h->failed)
        FAULT("OpenSSL SHA-256 failed");
out:
    if (sealed >= 0)
        close(sealed);
    if (tree.fd >= 0)
        close(tree.fd);
    free(tree.whole);
    free(block);
    return result;
oom:
    result = -1;
    goto out;
}
