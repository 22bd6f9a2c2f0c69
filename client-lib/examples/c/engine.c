/*
 * engine.c: an external engine in C. Attaches to another process's mirror, either with the
 * token the client's memshadow_mirror_grant gave (32 hex digits, as grant.c prints it) or,
 * as root or the daemon's own user, by --pid PID --mirror ID, then checksums the mirror
 * over and over: each pass reads the whole mirror in chunks through the engine (from the
 * daemon's shadow, shared with it: no system call while the pages are there) and computes
 * its FNV-1a 64 checksum. Once a second it prints the throughput, the checksum of the last
 * pass and how many flushes the daemon asked of it so far:
 *
 *   1.0 s: 2345.6 MB/s, checksum 8c7f1f6d2a4e0b13, 12 flushes seen, 9001 passes
 *
 * after the first pass "first pass: checksum ..., N faults" (the pages it had to ask the
 * daemon for), and at the end a line with the totals ("done: passes=... checksum=...").
 *
 * What it relies on (the header's memshadow_engine): a read that begins after the client's
 * munmap/madvise returned never sees the old bytes (G1); the engine acknowledges flushes
 * only inside memshadow_engine_read and memshadow_engine_poll, between its accesses, so the
 * daemon never reuses a shadow page under a read (G2). Between passes it waits on the
 * engine's doorbell (memshadow_engine_fd) with poll(2) and acknowledges what rang, so an
 * idle engine (--interval) is not evicted.
 *
 * Usage: engine [--socket PATH] (TOKEN | --pid PID --mirror ID) [--seconds N]
 *               [--interval MS] [--chunk BYTES] [--passes N] [--until-flushes N]
 *               [--write OFFSET BYTE]
 *   --seconds N        run for N seconds (default 5)
 *   --interval MS      start a pass at most every MS ms, waiting on the doorbell between
 *                      passes (default 0: back to back)
 *   --chunk BYTES      bytes per read (default 1 MiB)
 *   --passes N         stop after N passes instead (failing if N seconds end first)
 *   --until-flushes N  stop once N flushes were seen (likewise; with --passes: both)
 *   --write OFFSET BYTE  first, a device write of BYTE at OFFSET into the client's memory
 *                      (the client must have connected with MEMSHADOW_CONNECT_DEVICE_WRITES)
 * The socket is PATH, else found as memshadow_connect finds it (MEMSHADOW_SOCKET, ...).
 * Exits 0 on success, 1 on an error (a refused token, eviction, its client gone, a time
 * limit reached first), 2 on bad usage.
 *
 * Build (as demo.c, from the workspace root, with memshadow.pc on PKG_CONFIG_PATH):
 *   cc -std=c99 -Wall -Wextra -pedantic -Werror -o engine client-lib/examples/c/engine.c $(pkg-config --cflags --libs memshadow)
 */
#define _DEFAULT_SOURCE /* clock_gettime and poll under -std=c99 */

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <memshadow.h>

struct options {
    const char *socket; /* NULL: the default rules */
    const char *token;  /* hex, or NULL with --pid */
    long pid;
    uint64_t mirror;
    int have_mirror;
    double seconds;
    int interval_ms;
    size_t chunk;
    unsigned long long passes;        /* 0: no target */
    unsigned long long until_flushes; /* 0: no target */
    int write;
    size_t write_offset;
    unsigned char write_byte;
};

/* What a run counted. */
struct run {
    unsigned long long passes;
    unsigned long long bytes;
    uint64_t checksum;
    memshadow_engine_counters counters;
};

static int usage(const char *why)
{
    fprintf(stderr,
            "engine: %s\n"
            "usage: engine [--socket PATH] (TOKEN | --pid PID --mirror ID) [--seconds N]\n"
            "              [--interval MS] [--chunk BYTES] [--passes N] [--until-flushes N]\n"
            "              [--write OFFSET BYTE]\n",
            why);
    return 2;
}

/* Says which call failed and why; returns the exit code 1. */
static int fail(const char *what, memshadow_status s)
{
    fprintf(stderr, "engine: %s failed: %s: %s (errno %d)\n", what, memshadow_status_name(s),
            memshadow_last_error(), memshadow_last_errno());
    if (s == MEMSHADOW_ERR_EVICTED)
        fprintf(stderr, "engine: evicted: a flush was not acknowledged in time, or the client "
                        "detached the mirror or exited; stopping\n");
    if (s == MEMSHADOW_ERR_NO_SUCH_GRANT)
        fprintf(stderr, "engine: the token is wrong, revoked, or another user's\n");
    return 1;
}

/* A decimal number in 0..=max into *v; 0 on success. */
static int number(const char *s, unsigned long long max, unsigned long long *v)
{
    char *end = NULL;
    errno = 0;
    *v = strtoull(s, &end, 10);
    return errno != 0 || end == s || *end != '\0' || *v > max || s[0] == '-' ? -1 : 0;
}

/* One option with a value; 0, or the exit code of a usage error. */
static int option(struct options *o, const char *a, const char *v, const char *v2)
{
    unsigned long long n = 0;
    if (strcmp(a, "--socket") == 0) {
        o->socket = v;
    } else if (strcmp(a, "--pid") == 0 && number(v, 0x7fffffff, &n) == 0 && n > 0) {
        o->pid = (long)n;
    } else if (strcmp(a, "--mirror") == 0 && number(v, UINT64_MAX, &n) == 0) {
        o->mirror = n;
        o->have_mirror = 1;
    } else if (strcmp(a, "--seconds") == 0 && number(v, 86400, &n) == 0 && n > 0) {
        o->seconds = (double)n;
    } else if (strcmp(a, "--interval") == 0 && number(v, 3600000, &n) == 0) {
        o->interval_ms = (int)n;
    } else if (strcmp(a, "--chunk") == 0 && number(v, 1u << 30, &n) == 0 && n > 0) {
        o->chunk = (size_t)n;
    } else if (strcmp(a, "--passes") == 0 && number(v, ULLONG_MAX, &n) == 0) {
        o->passes = n;
    } else if (strcmp(a, "--until-flushes") == 0 && number(v, ULLONG_MAX, &n) == 0) {
        o->until_flushes = n;
    } else if (strcmp(a, "--write") == 0 && v2 != NULL && number(v, SIZE_MAX, &n) == 0) {
        o->write_offset = (size_t)n;
        if (number(v2, 255, &n) != 0)
            return usage("--write takes an offset and a byte value, 0 to 255");
        o->write_byte = (unsigned char)n;
        o->write = 1;
    } else {
        return usage("bad option or value");
    }
    return 0;
}

/* Parses the command line into `o`; 0, or the exit code of a usage error. */
static int parse(int argc, char **argv, struct options *o)
{
    memset(o, 0, sizeof *o);
    o->seconds = 5;
    o->chunk = 1 << 20;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] != '-') {
            if (o->token != NULL)
                return usage("more than one token");
            o->token = a;
            continue;
        }
        if (i + 1 >= argc)
            return usage("an option needs a value");
        int bad = option(o, a, argv[i + 1], i + 2 < argc ? argv[i + 2] : NULL);
        if (bad != 0)
            return bad;
        i += strcmp(a, "--write") == 0 ? 2 : 1;
    }
    if ((o->token != NULL) == (o->pid != 0 || o->have_mirror))
        return usage("give either a TOKEN or --pid PID --mirror ID");
    if (o->token == NULL && (o->pid == 0 || !o->have_mirror))
        return usage("--pid and --mirror go together");
    return 0;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Attaches as the options say; 0, or the exit code. */
static int attach(const struct options *o, memshadow_engine **e)
{
    memshadow_status s;
    if (o->token != NULL) {
        memshadow_token token;
        s = memshadow_token_from_hex(o->token, &token);
        if (s != MEMSHADOW_OK)
            return fail("memshadow_token_from_hex", s);
        s = memshadow_engine_attach(o->socket, &token, e);
    } else {
        s = memshadow_engine_attach_pid(o->socket, (int32_t)o->pid, o->mirror, e);
    }
    if (s != MEMSHADOW_OK)
        return fail("memshadow_engine_attach", s);
    printf("engine %" PRIu64 " attached to mirror %" PRIu64 ": %zu bytes at 0x%" PRIx64
           " in its client, pages of %zu bytes\n",
           memshadow_engine_id(*e), memshadow_engine_mirror_id(*e), memshadow_engine_len(*e),
           memshadow_engine_addr(*e), memshadow_engine_page_size(*e));
    return 0;
}

/* One pass: reads the whole mirror in chunks into `buf`; the checksum goes in r. */
static memshadow_status pass(memshadow_engine *e, unsigned char *buf, size_t chunk,
                             struct run *r)
{
    size_t len = memshadow_engine_len(e);
    uint64_t h = 0xcbf29ce484222325u; /* FNV-1a 64 */
    for (size_t off = 0; off < len; off += chunk) {
        size_t n = len - off < chunk ? len - off : chunk;
        memshadow_status s = memshadow_engine_read(e, off, buf, n);
        if (s != MEMSHADOW_OK)
            return s;
        for (size_t i = 0; i < n; i++) {
            h ^= buf[i];
            h *= 0x100000001b3u;
        }
    }
    r->checksum = h;
    r->passes++;
    r->bytes += len;
    return memshadow_engine_stats(e, &r->counters);
}

/* Waits on the doorbell until `until` (at least one look), acknowledging what rang. */
static memshadow_status idle(memshadow_engine *e, double until)
{
    for (;;) {
        double left = until - now();
        struct pollfd bell = {.fd = memshadow_engine_fd(e), .events = POLLIN};
        int r = poll(&bell, 1, left > 0 ? (int)(left * 1000) + 1 : 0);
        if (r > 0) {
            memshadow_status s = memshadow_engine_poll(e);
            if (s != MEMSHADOW_OK)
                return s;
        }
        if (r < 0 && errno != EINTR) {
            perror("engine: poll");
            return MEMSHADOW_ERR_INTERNAL;
        }
        if (now() >= until)
            return MEMSHADOW_OK;
    }
}

/* Whether --passes or --until-flushes set a target. */
static int has_target(const struct options *o)
{
    return o->passes != 0 || o->until_flushes != 0;
}

/* Whether the targets of --passes and --until-flushes are met. */
static int target_met(const struct options *o, const struct run *r)
{
    return r->passes >= o->passes && r->counters.flushes_processed >= o->until_flushes;
}

/* Prints the line of the last second (or so): `bytes` read in `secs`. */
static void report(double since_start, double secs, unsigned long long bytes,
                   const struct run *r)
{
    printf("%.1f s: %.1f MB/s, checksum %016" PRIx64 ", %" PRIu64 " flushes seen, %llu passes\n",
           since_start, (double)bytes / 1e6 / secs, r->checksum, r->counters.flushes_processed,
           r->passes);
    fflush(stdout);
}

/* Checksums until the time is up or the targets are met; 0, or the exit code. */
static int run(const struct options *o, memshadow_engine *e, struct run *r)
{
    size_t len = memshadow_engine_len(e);
    size_t chunk = o->chunk < len ? o->chunk : len;
    unsigned char *buf = malloc(chunk);
    if (buf == NULL) {
        fprintf(stderr, "engine: cannot allocate %zu bytes\n", chunk);
        return 1;
    }
    double start = now(), end = start + o->seconds, last = start;
    unsigned long long reported = 0;
    int rc = 0;
    while (!(has_target(o) && target_met(o, r))) {
        double t = now();
        if (t >= end) {
            if (has_target(o)) {
                fprintf(stderr, "engine: %.0f s are up before the target: %llu passes, %" PRIu64
                        " flushes seen\n", o->seconds, r->passes,
                        r->counters.flushes_processed);
                rc = 1;
            }
            break;
        }
        memshadow_status s = pass(e, buf, chunk, r);
        if (s == MEMSHADOW_OK && r->passes == 1) {
            printf("first pass: checksum %016" PRIx64 ", %" PRIu64 " faults\n", r->checksum,
                   r->counters.faults);
            fflush(stdout);
        }
        if (s == MEMSHADOW_OK)
            s = idle(e, t + o->interval_ms / 1000.0);
        if (s != MEMSHADOW_OK) {
            rc = fail("a pass over the mirror", s);
            break;
        }
        t = now();
        if (t >= last + 1) {
            report(t - start, t - last, r->bytes - reported, r);
            reported = r->bytes;
            last = t;
        }
    }
    free(buf);
    return rc;
}

int main(int argc, char **argv)
{
    struct options o;
    struct run r;
    memshadow_engine *e = NULL;
    int rc = parse(argc, argv, &o);
    if (rc != 0)
        return rc;
    memset(&r, 0, sizeof r);
    rc = attach(&o, &e);
    if (rc == 0 && o.write) {
        size_t written = 0;
        memshadow_status s = memshadow_engine_write(e, o.write_offset, &o.write_byte, 1,
                                                    &written);
        if (s != MEMSHADOW_OK)
            rc = fail("memshadow_engine_write", s);
        else
            printf("wrote %zu byte(s) at offset %zu\n", written, o.write_offset);
    }
    if (rc == 0)
        rc = run(&o, e, &r);
    if (rc == 0)
        printf("done: passes=%llu bytes=%llu checksum=%016" PRIx64 " flushes=%" PRIu64
               " faults=%" PRIu64 " tlb_hits=%" PRIu64 " tlb_misses=%" PRIu64
               " retries=%" PRIu64 "\n",
               r.passes, r.bytes, r.checksum, r.counters.flushes_processed, r.counters.faults,
               r.counters.tlb_hits, r.counters.tlb_misses, r.counters.retries);
    memshadow_engine_free(e);
    return rc;
}
