/*
 * demo.c: libmemshadow's C API in one run. Connects to memshadowd, mirrors an mmap'ed
 * buffer, reads it back through the device, discards one page with MADV_DONTNEED and
 * unmaps the tail (and shows what the device then returns), prints counters, detaches.
 * Exits 0 only if every check passed (tests/capi.rs runs it against a real daemon).
 *
 * Build (from the workspace root, after `cargo build --workspace`, with memshadow.pc on
 * PKG_CONFIG_PATH; README "Using the C library" has the lines that make it):
 *   cc -std=c99 -Wall -Wextra -pedantic -Werror -o demo client-lib/examples/c/demo.c $(pkg-config --cflags --libs memshadow)
 * Run it against a running daemon (the socket path follows MEMSHADOW_SOCKET, else the
 * default path rules), with a library directory that has libmemshadow.so.0:
 *   LD_LIBRARY_PATH=$LIBDIR MEMSHADOW_SOCKET=/path/to/memshadowd.sock ./demo
 */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS and madvise under -std=c99 */

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <memshadow.h>

/* Runs a call that must succeed; on failure prints its code, message and errno, and
 * fails. */
#define CHECK(call)                                                                     \
    do {                                                                                \
        memshadow_status check_status_ = (call);                                        \
        if (check_status_ != MEMSHADOW_OK) {                                            \
            fprintf(stderr, "demo: %s failed: %s: %s (errno %d)\n", #call,              \
                    memshadow_status_name(check_status_), memshadow_last_error(),       \
                    memshadow_last_errno());                                            \
            goto out;                                                                   \
        }                                                                               \
    } while (0)

/* Fails with a message unless `cond` holds. */
#define EXPECT(cond, ...)                                                               \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            fprintf(stderr, "demo: check failed: " __VA_ARGS__);                        \
            fputc('\n', stderr);                                                        \
            goto out;                                                                   \
        }                                                                               \
    } while (0)

enum { PAGES = 64, TAIL_PAGES = 16 };

static int all_bytes(const unsigned char *p, size_t len, unsigned char b)
{
    for (size_t i = 0; i < len; i++)
        if (p[i] != b)
            return 0;
    return 1;
}

int main(void)
{
    int rc = 1;
    memshadow_client *client = NULL;
    memshadow_mirror *mirror = NULL;
    memshadow_stats *stats = NULL;
    unsigned char *map = MAP_FAILED;
    unsigned char *buf = NULL;
    size_t page = 0, len = 0, mapped = 0;
    memshadow_status s;
    size_t pages = 0;
    uint64_t value = 0;

    /* The header this was built with, and the library it runs with: the same major version
     * (the SONAME, libmemshadow.so.0), maybe a later minor or patch. */
    printf("libmemshadow %s, built against %d.%d.%d\n", memshadow_version(),
           MEMSHADOW_VERSION_MAJOR, MEMSHADOW_VERSION_MINOR, MEMSHADOW_VERSION_PATCH);

    CHECK(memshadow_connect(&client));
    page = memshadow_client_page_size(client);
    printf("connected: memshadowd %s, protocol %u, page size %zu\n",
           memshadow_client_daemon_version(client),
           (unsigned)memshadow_client_protocol_version(client), page);

    len = mapped = PAGES * page;
    map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    EXPECT(map != MAP_FAILED, "mmap of %zu bytes failed", len);
    for (size_t i = 0; i < PAGES; i++)
        memset(map + i * page, (int)(i % 251 + 1), page); /* never 0 */
    buf = malloc(len);
    EXPECT(buf != NULL, "malloc failed");

    CHECK(memshadow_attach(client, map, len, &mirror));
    printf("attached %zu bytes as mirror %" PRIu64 "\n", len, memshadow_mirror_id(mirror));

    CHECK(memshadow_mirror_read(mirror, 0, buf, len));
    EXPECT(memcmp(buf, map, len) == 0, "the device read differs from memory");
    printf("device read: all %zu bytes match memory\n", len);

    CHECK(memshadow_mirror_populate(mirror, 0, len, &pages));
    printf("populated: %zu pages in the shadow\n", pages);

    /* Write after mirroring: the shadow still has the old bytes until the daemon collects
     * the written pages (dirty tracking); after a sync a device read sees the new ones. */
    memset(map + 2 * page, 0xAB, page);
    {
        memshadow_sync_report report;
        s = memshadow_mirror_sync(mirror, &report);
        if (s == MEMSHADOW_OK) {
            CHECK(memshadow_mirror_read(mirror, 2 * page, buf, page));
            EXPECT(all_bytes(buf, page, 0xAB), "page 2 is stale after a sync");
            printf("after a write and a sync: %zu page(s) found written, the device "
                   "reads the new bytes\n", report.pages_dirty);
        } else {
            EXPECT(s == MEMSHADOW_ERR_UNSUPPORTED, "sync gave %s: %s", memshadow_status_name(s),
                   memshadow_last_error());
            printf("after a write and a sync: %s (%s)\n", memshadow_status_name(s),
                   memshadow_last_error());
        }
    }

    /* Outside the mirror: an error code and a message, nothing else happens. */
    s = memshadow_mirror_read(mirror, len, buf, 1);
    EXPECT(s == MEMSHADOW_ERR_BAD_RANGE, "read past the end gave %s",
           memshadow_status_name(s));
    printf("read past the end: %s (%s)\n", memshadow_status_name(s), memshadow_last_error());

    /* Discard page 1: a read issued after madvise returned never sees the old bytes. */
    EXPECT(madvise(map + page, page, MADV_DONTNEED) == 0, "madvise failed");
    s = memshadow_mirror_read(mirror, page, buf, page);
    if (s == MEMSHADOW_OK) {
        EXPECT(all_bytes(buf, page, 0), "page 1 still has old bytes after MADV_DONTNEED");
        printf("after MADV_DONTNEED: no old bytes, page 1 reads as zeros\n");
    } else {
        EXPECT(s == MEMSHADOW_ERR_NOT_MIRRORED, "read after MADV_DONTNEED gave %s: %s",
               memshadow_status_name(s), memshadow_last_error());
        printf("after MADV_DONTNEED: no old bytes, %s\n", memshadow_status_name(s));
    }

    /* Unmap the tail: reading it through the device now fails. */
    EXPECT(munmap(map + (PAGES - TAIL_PAGES) * page, TAIL_PAGES * page) == 0, "munmap failed");
    mapped = (PAGES - TAIL_PAGES) * page;
    s = memshadow_mirror_read(mirror, mapped + page, buf, 16);
    EXPECT(s == MEMSHADOW_ERR_NOT_MIRRORED, "read of the unmapped tail gave %s: %s",
           memshadow_status_name(s), memshadow_last_error());
    printf("after munmap: read of the tail fails with %s (%s)\n", memshadow_status_name(s),
           memshadow_last_error());

    CHECK(memshadow_mirror_read(mirror, 0, buf, page));
    EXPECT(all_bytes(buf, page, 1), "page 0 changed");
    printf("page 0 still reads back\n");

    CHECK(memshadow_client_stats(client, &stats));
    printf("client counters:\n");
    for (size_t i = 0; i < memshadow_stats_count(stats); i++) {
        const char *name = NULL;
        CHECK(memshadow_stats_entry(stats, i, &name, &value));
        printf("  %s = %" PRIu64 "\n", name, value);
    }
    CHECK(memshadow_stats_get(stats, "client.reads", &value));
    EXPECT(value > 0, "client.reads is 0 after reads");
    memshadow_stats_free(stats);
    stats = NULL;

    CHECK(memshadow_mirror_detach(mirror));
    s = memshadow_mirror_read(mirror, 0, buf, 1);
    EXPECT(s != MEMSHADOW_OK, "a read after detach succeeded");
    printf("detached: a read now fails with %s\n", memshadow_status_name(s));
    memshadow_mirror_free(mirror);
    mirror = NULL;

    printf("demo ok\n");
    rc = 0;
out:
    memshadow_stats_free(stats);
    memshadow_mirror_free(mirror);
    memshadow_client_free(client);
    if (map != MAP_FAILED)
        munmap(map, mapped);
    free(buf);
    return rc;
}
