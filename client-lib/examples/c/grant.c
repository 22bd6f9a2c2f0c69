/*
 * grant.c: a client that lends one of its buffers to an external engine. Connects to
 * memshadowd, mirrors an mmap'ed buffer (page i filled with the byte i % 251 + 1), grants
 * the mirror to an engine and prints the token on its first line:
 *
 *   token=<32 hex digits> pid=<pid> mirror=<mirror id> bytes=<length>
 *
 * then keeps the buffer mirrored until its standard input ends, answering one line per
 * command read there:
 *
 *   peek OFFSET        "peek OFFSET VALUE": the byte at OFFSET of the buffer (after an
 *                      engine's device write, say)
 *   discard PAGE       madvise(MADV_DONTNEED) of page PAGE: "discarded PAGE"; an engine
 *                      read that begins after this line never sees the old bytes
 *   write PAGE BYTE    fills page PAGE with BYTE and collects the written page
 *                      (memshadow_mirror_sync): "wrote PAGE: N page(s) collected"; an
 *                      engine read that begins after this line sees the new bytes. Without
 *                      dirty tracking in the daemon: "write PAGE: MEMSHADOW_ERR_UNSUPPORTED"
 *   quit               (or end of input) detach and exit
 *
 * With --churn MS it also discards and refills one page every MS milliseconds (page 0, 1,
 * 2, ... round the buffer, each refilled with a new byte), so an engine sees flushes.
 * Pair it with engine.c: run `./grant --churn 50` in one terminal, then
 * `./engine TOKEN` with the token it printed in another; end grant with Ctrl-D.
 *
 * Options: --socket PATH (default: MEMSHADOW_SOCKET, else the default path rules), --pages N
 * (default 256), --device-writes (connect with MEMSHADOW_CONNECT_DEVICE_WRITES: engines may
 * write the buffer), --churn MS. Exits 0 after a clean detach, 1 on an error, 2 on bad
 * usage.
 *
 * Build (as demo.c, from the workspace root, with memshadow.pc on PKG_CONFIG_PATH):
 *   cc -std=c99 -Wall -Wextra -pedantic -Werror -o grant client-lib/examples/c/grant.c $(pkg-config --cflags --libs memshadow)
 */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS and madvise under -std=c99 */

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <memshadow.h>

/* Runs a call that must succeed; on failure prints its code, message and errno, and
 * fails. */
#define CHECK(call)                                                                     \
    do {                                                                                \
        memshadow_status check_status_ = (call);                                        \
        if (check_status_ != MEMSHADOW_OK) {                                            \
            fprintf(stderr, "grant: %s failed: %s: %s (errno %d)\n", #call,             \
                    memshadow_status_name(check_status_), memshadow_last_error(),       \
                    memshadow_last_errno());                                            \
            goto out;                                                                   \
        }                                                                               \
    } while (0)

struct options {
    const char *socket; /* NULL: the default rules */
    size_t pages;
    uint32_t flags;
    int churn_ms; /* 0: no churn */
};

static int usage(const char *why)
{
    fprintf(stderr, "grant: %s\nusage: grant [--socket PATH] [--pages N] [--device-writes] "
                    "[--churn MS]\n", why);
    return 2;
}

/* A decimal number in 1..=max, or 0. */
static unsigned long long number(const char *s, unsigned long long max)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v > max || s[0] == '-')
        return 0;
    return v;
}

/* Parses the command line into `o`; returns 0, or the exit code of a usage error. */
static int parse(int argc, char **argv, struct options *o)
{
    o->socket = NULL;
    o->pages = 256;
    o->flags = 0;
    o->churn_ms = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--device-writes") == 0) {
            o->flags |= MEMSHADOW_CONNECT_DEVICE_WRITES;
            continue;
        }
        if (v == NULL)
            return usage(a[0] == '-' ? "an option needs a value" : "unknown argument");
        i++;
        if (strcmp(a, "--socket") == 0) {
            o->socket = v;
        } else if (strcmp(a, "--pages") == 0) {
            o->pages = (size_t)number(v, 1u << 20);
            if (o->pages == 0)
                return usage("--pages takes a number of pages, 1 to 1048576");
        } else if (strcmp(a, "--churn") == 0) {
            o->churn_ms = (int)number(v, 3600000);
            if (o->churn_ms == 0)
                return usage("--churn takes milliseconds, 1 to 3600000");
        } else {
            return usage("unknown option");
        }
    }
    return 0;
}

/* Fills page `n` with `byte` and collects it; 0, or -1 on an error. */
static int write_page(const memshadow_mirror *mirror, unsigned char *map, size_t page,
                      unsigned long long n, unsigned long long byte)
{
    memshadow_sync_report report;
    memset(map + n * page, (int)byte, page);
    memshadow_status s = memshadow_mirror_sync(mirror, &report);
    if (s == MEMSHADOW_ERR_UNSUPPORTED) {
        printf("write %llu: %s (%s)\n", n, memshadow_status_name(s), memshadow_last_error());
        return 0;
    }
    if (s != MEMSHADOW_OK) {
        fprintf(stderr, "grant: memshadow_mirror_sync failed: %s: %s\n",
                memshadow_status_name(s), memshadow_last_error());
        return -1;
    }
    printf("wrote %llu: %zu page(s) collected\n", n, report.pages_dirty);
    return 0;
}

/* Answers one command line; returns 1 to go on, 0 to quit, -1 on an error. */
static int command(char *line, const memshadow_mirror *mirror, unsigned char *map, size_t len,
                   size_t page)
{
    unsigned long long n = 0, v = 0;
    char word[16] = "";
    int got = sscanf(line, "%15s %llu %llu", word, &n, &v);
    if (got < 1 || strcmp(word, "quit") == 0)
        return 0;
    if (strcmp(word, "peek") == 0 && got == 2 && n < len) {
        printf("peek %llu %u\n", n, (unsigned)map[n]);
    } else if (strcmp(word, "discard") == 0 && got == 2 && n < len / page) {
        if (madvise(map + n * page, page, MADV_DONTNEED) != 0) {
            perror("grant: madvise");
            return -1;
        }
        printf("discarded %llu\n", n);
    } else if (strcmp(word, "write") == 0 && got == 3 && n < len / page && v < 256) {
        if (write_page(mirror, map, page, n, v) != 0)
            return -1;
    } else {
        fprintf(stderr, "grant: cannot do \"%s\" (peek OFFSET, discard PAGE, write PAGE BYTE, "
                        "quit)\n", line);
        return -1;
    }
    fflush(stdout);
    return 1;
}

/* Discards page `step % pages` and fills it again with a byte that changes each round. */
static int churn(unsigned char *map, size_t pages, size_t page, unsigned long step)
{
    size_t i = step % pages;
    if (madvise(map + i * page, page, MADV_DONTNEED) != 0) {
        perror("grant: madvise");
        return -1;
    }
    memset(map + i * page, (int)((i + step / pages + 1) % 251 + 1), page);
    return 0;
}

/* Reads commands on stdin until it ends (churning meanwhile); 0 on a clean end. */
static int serve(const memshadow_mirror *mirror, unsigned char *map, size_t len, size_t page,
                 int churn_ms)
{
    char buf[256];
    size_t have = 0;
    unsigned long step = 0;
    for (;;) {
        struct pollfd in = {.fd = 0, .events = POLLIN};
        int r = poll(&in, 1, churn_ms > 0 ? churn_ms : -1);
        if (r < 0 && errno != EINTR) {
            perror("grant: poll");
            return -1;
        }
        if (r == 0) {
            if (churn(map, len / page, page, step++) != 0)
                return -1;
            continue;
        }
        if (r < 0)
            continue;
        ssize_t n = read(0, buf + have, sizeof buf - 1 - have);
        if (n <= 0)
            return n == 0 ? 0 : -1;
        have += (size_t)n;
        buf[have] = '\0';
        char *nl;
        while ((nl = strchr(buf, '\n')) != NULL) {
            *nl = '\0';
            int go = command(buf, mirror, map, len, page);
            if (go <= 0)
                return go;
            have -= (size_t)(nl + 1 - buf);
            memmove(buf, nl + 1, have + 1);
        }
        if (have == sizeof buf - 1) {
            fprintf(stderr, "grant: command line too long\n");
            return -1;
        }
    }
}

int main(int argc, char **argv)
{
    int rc = 1;
    struct options o;
    memshadow_client *client = NULL;
    memshadow_mirror *mirror = NULL;
    unsigned char *map = MAP_FAILED;
    size_t page = 0, len = 0;
    memshadow_token token;
    char hex[MEMSHADOW_TOKEN_HEX_SIZE];

    int bad = parse(argc, argv, &o);
    if (bad != 0)
        return bad;
    CHECK(memshadow_connect_with(o.socket, o.flags, &client));
    page = memshadow_client_page_size(client);
    len = o.pages * page;
    map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) {
        perror("grant: mmap");
        goto out;
    }
    for (size_t i = 0; i < o.pages; i++)
        memset(map + i * page, (int)(i % 251 + 1), page);

    CHECK(memshadow_attach(client, map, len, &mirror));
    CHECK(memshadow_mirror_grant(mirror, &token));
    CHECK(memshadow_token_to_hex(&token, hex, sizeof hex));
    printf("token=%s pid=%ld mirror=%" PRIu64 " bytes=%zu\n", hex, (long)getpid(),
           memshadow_mirror_id(mirror), len);
    fflush(stdout);

    if (serve(mirror, map, len, page, o.churn_ms) != 0)
        goto out;
    /* Detaching revokes the grant and evicts the mirror's engines. */
    CHECK(memshadow_mirror_detach(mirror));
    printf("detached\n");
    rc = 0;
out:
    memshadow_mirror_free(mirror);
    memshadow_client_free(client);
    if (map != MAP_FAILED)
        munmap(map, len);
    return rc;
}
