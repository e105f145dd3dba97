/* Handle lifetime and options. */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

uint32_t dext_abi_version(void)
{
    return DEXT_PROVER_ABI_VERSION;
}

/* A deliberately small JSON reader: the options are one flat object of scalars, and pulling a
 * JSON library into the ABI's reference implementation would be a bigger liability. */
typedef struct json {
    const char *s;
    const char *err;
} json;

static void skip_ws(json *j)
{
    while (isspace((unsigned char)*j->s))
        j->s++;
}

static int parse_string(json *j, char *out, size_t len)
{
    size_t n = 0;
    if (*j->s != '"')
        return -1;
    j->s++;
    while (*j->s && *j->s != '"') {
        char c = *j->s++;
        if (c == '\\') {
            c = *j->s++;
            if (c != '"' && c != '\\' && c != '/')
                return -1; /* no option needs \n or \uXXXX */
        }
        if (n + 1 < len)
            out[n++] = c;
    }
    if (*j->s != '"')
        return -1;
    j->s++;
    out[n] = 0;
    return 0;
}

static int parse_uint(json *j, unsigned long long *out)
{
    if (!isdigit((unsigned char)*j->s))
        return -1;
    char *end;
    *out = strtoull(j->s, &end, 10);
    j->s = end;
    if (*end == '.' || *end == 'e' || *end == 'E')
        return -1;
    return 0;
}

dext_handle *dext_open(const char *options_json)
{
    unsigned long long rows = 2;
    if (options_json && *options_json) {
        json j = {options_json, NULL};
        char key[64];
        skip_ws(&j);
        if (*j.s++ != '{')
            goto syntax;
        skip_ws(&j);
        if (*j.s == '}')
            j.s++;
        else
            for (;;) {
                skip_ws(&j);
                if (parse_string(&j, key, sizeof(key)) != 0)
                    goto syntax;
                skip_ws(&j);
                if (*j.s++ != ':')
                    goto syntax;
                skip_ws(&j);
                if (strcmp(key, "rows_to_discard") == 0) {
                    if (parse_uint(&j, &rows) != 0 || rows > MAX_ROWS_TO_DISCARD) {
                        set_error("option rows_to_discard must be an integer from 0 to %d",
                                  MAX_ROWS_TO_DISCARD);
                        return NULL;
                    }
                } else {
                    set_error("unknown option '%s' (the reference prover knows "
                              "rows_to_discard)", key);
                    return NULL;
                }
                skip_ws(&j);
                if (*j.s == ',') {
                    j.s++;
                    continue;
                }
                if (*j.s++ != '}')
                    goto syntax;
                break;
            }
        skip_ws(&j);
        if (*j.s)
            goto syntax;
    }
    dext_handle *h = calloc(1, sizeof(*h));
    if (!h) {
        set_error("out of memory");
        return NULL;
    }
    h->rows_to_discard = (unsigned)rows;
    h->md = EVP_MD_fetch(NULL, "SHA256", NULL);
    if (!h->md) {
        free(h);
        set_error("OpenSSL has no SHA256 implementation available");
        return NULL;
    }
    return h;
syntax:
    set_error("options must be a flat JSON object such as {\"rows_to_discard\": 2}, got: %.200s",
              options_json);
    return NULL;
}

void dext_close(dext_handle *handle)
{
    if (!handle)
        return;
    EVP_MD_free(handle->md);
    free(handle);
}
