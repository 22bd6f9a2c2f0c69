/*
 * regcache.c: a registration cache, written the way the caches of libfabric, UCX and MPI
 * are, kept honest by memshadow monitors.
 *
 * A cache "registers" a buffer with a NIC once (here: it records what the buffer holds, as
 * a pinned registration would keep pointing at those pages) and hands out the registration
 * whenever a later operation uses an address range inside it. If the buffer was freed and
 * the address reused for another buffer, the cached registration is stale: the NIC would
 * read the old pages. Each entry holds a monitor of its range; a lookup checks it (no
 * system call) and drops the entry when it is invalid; the cache also drains the monitor
 * queue to drop entries early.
 *
 * The workload: THREADS threads, each keeping 4 live buffers of 64 KiB to 1 MiB (with
 * M_MMAP_THRESHOLD at 64 KiB, one arena and no padding, so every one is an mmap and every
 * free() an munmap, and addresses come back), for ROUNDS rounds: pick a buffer, one time
 * in four free it and malloc a new one stamped with a number never used before, look it up
 * in the shared cache (registering it on a miss), and check that the registration is of
 * this very buffer (its stamp). It prints one line:
 *
 *   lookups=N hits=N misses=N dropped_invalid=N dropped_by_event=N overflows=N stale=N
 *   not_mapped=N reused_in_flight=N
 *
 * stale: hits on the registration of an older buffer at the address whose free() had
 * returned before the lookup began (what monitors rule out). reused_in_flight: hits on the
 * registration of an older buffer whose free() was still running in another thread when
 * this thread's malloc got its address and looked it up: the kernel reports an unmap to
 * the userfaultfd only after the mapping is gone, so no monitor outside the kernel can
 * know yet (docs/monitors.md). not_mapped: buffers malloc served from a heap rather than a
 * mapping of their own; the cache is not asked about them, since free() leaves their pages
 * in place.
 *
 * and exits 0 if no lookup handed out a stale registration, 1 if one did (or on an error),
 * 2 on bad usage. With --no-monitor the cache trusts its entries blindly (a cache with no
 * monitor at all): stale registrations then show, which is the point of monitoring.
 *
 * Options: --socket PATH (default: MEMSHADOW_SOCKET, else the default path rules),
 * --threads N (default 4), --rounds N (default 20000), --no-monitor.
 *
 * Build (as demo.c, from the workspace root, with memshadow.pc on PKG_CONFIG_PATH):
 *   cc -std=c99 -Wall -Wextra -pedantic -Werror -pthread -o regcache client-lib/examples/c/regcache.c $(pkg-config --cflags --libs memshadow)
 */
#define _DEFAULT_SOURCE /* mallopt's M_MMAP_THRESHOLD, strtoull under -std=c99 */

#include <errno.h>
#include <inttypes.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <memshadow.h>

/* The most entries the cache keeps; the oldest goes first when it is full. */
#define CACHE_SIZE 1024
/* Events taken from the monitor queue at once. */
#define EVENT_BATCH 256

/* One registration: the range, what the "NIC" pinned (the buffer's stamp when it was
 * registered), and the monitor that says whether the range is still that buffer. */
struct entry {
    uintptr_t addr;
    size_t len;
    uint64_t pinned_stamp;
    memshadow_monitor *monitor; /* NULL with --no-monitor */
    uint32_t slot;
    uint64_t generation;
    int used;
};

struct cache {
    pthread_mutex_t lock;
    struct entry e[CACHE_SIZE];
    size_t next_victim;
    memshadow_client *client;
    int monitored;
    uint64_t lookups, hits, misses, dropped_invalid, dropped_by_event, overflows, stale;
    uint64_t not_mapped, reused_in_flight;
    /* Of the last hit: its buffer's free() had returned before the check began. */
    int hit_freed_before;
    /* Bit `stamp` set once the free() of the buffer with that stamp has returned. */
    uint8_t *returned;
    int failed;
};

struct options {
    const char *socket;
    unsigned threads;
    unsigned long rounds;
    int monitored;
};

static uint64_t next_stamp; /* under the cache lock */

/* Whether the free() of the buffer stamped `stamp` has returned (set by its thread right
 * after, with release; read with acquire before a check, so that a set bit means the free()
 * returned before the check began). */
static int has_returned(const struct cache *c, uint64_t stamp)
{
    return (__atomic_load_n(&c->returned[stamp / 8], __ATOMIC_ACQUIRE) >> (stamp % 8)) & 1;
}

static void drop(struct entry *e)
{
    memshadow_monitor_free(e->monitor); /* NULL is ignored */
    memset(e, 0, sizeof *e);
}

/* Drops the entries whose monitor the queue says went away (the cache lock held). */
static void drain_events(struct cache *c)
{
    memshadow_monitor_event ev[EVENT_BATCH];
    for (;;) {
        size_t n = 0;
        int overflowed = 0;
        memshadow_status s = memshadow_monitor_events(c->client, ev, EVENT_BATCH, &n,
                                                      &overflowed);
        if (s != MEMSHADOW_OK) {
            fprintf(stderr, "regcache: memshadow_monitor_events: %s: %s\n",
                    memshadow_status_name(s), memshadow_last_error());
            c->failed = 1;
            return;
        }
        if (overflowed) {
            /* Events were lost: every entry is checked at its next lookup anyway. */
            c->overflows++;
        }
        for (size_t i = 0; i < n; i++)
            for (size_t k = 0; k < CACHE_SIZE; k++)
                /* An older generation was about the slot's previous monitor. */
                if (c->e[k].used && c->e[k].monitor != NULL && c->e[k].slot == ev[i].slot &&
                    ev[i].generation > c->e[k].generation) {
                    drop(&c->e[k]);
                    c->dropped_by_event++;
                }
        if (n < EVENT_BATCH)
            return;
    }
}

/* The registration covering [addr, addr+len), registering it on a miss; NULL on an
 * error. `stamp` is what the buffer holds now (to register, as a NIC pins pages). The
 * cache lock is held. */
static struct entry *lookup(struct cache *c, uintptr_t addr, size_t len, uint64_t stamp)
{
    c->lookups++;
    if (c->monitored)
        drain_events(c);
    for (size_t k = 0; k < CACHE_SIZE; k++) {
        struct entry *e = &c->e[k];
        if (!e->used || addr < e->addr || addr + len > e->addr + e->len)
            continue;
        /* Before the check: was the registered buffer's free() over already? */
        c->hit_freed_before = e->monitor != NULL && has_returned(c, e->pinned_stamp);
        if (e->monitor != NULL && !memshadow_monitor_is_valid(e->monitor)) {
            drop(e);
            c->dropped_invalid++;
            continue;
        }
        c->hits++;
        return e;
    }
    c->misses++;
    struct entry *e = &c->e[c->next_victim];
    c->next_victim = (c->next_victim + 1) % CACHE_SIZE;
    if (e->used)
        drop(e);
    if (c->monitored) {
        memshadow_status s = memshadow_monitor_add(c->client, (const void *)addr, len,
                                                   &e->monitor);
        if (s != MEMSHADOW_OK) {
            fprintf(stderr, "regcache: memshadow_monitor_add: %s: %s\n",
                    memshadow_status_name(s), memshadow_last_error());
            return NULL;
        }
        e->slot = memshadow_monitor_slot(e->monitor);
        e->generation = memshadow_monitor_generation(e->monitor);
    }
    e->addr = addr;
    e->len = len;
    e->pinned_stamp = stamp;
    e->used = 1;
    return e;
}

struct worker {
    struct cache *cache;
    unsigned long rounds;
    uint64_t seed;
};

static uint64_t rng(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Live buffers a thread keeps (and looks up again: the hits a cache is for). */
#define LIVE 4

struct buffer {
    uint64_t *p; /* NULL: none yet */
    size_t len;
    uint64_t stamp;
};


/* Replaces `b` with a new buffer, stamped with a number never used before; 0, or -1. */
static int renew(struct cache *c, struct worker *w, struct buffer *b)
{
    if (b->p != NULL) {
        free(b->p);
        __atomic_fetch_or(&c->returned[b->stamp / 8], (uint8_t)(1u << (b->stamp % 8)),
                          __ATOMIC_RELEASE);
    }
    for (;;) {
        b->len = (size_t)(64 * 1024 + rng(&w->seed) % (960 * 1024));
        b->p = malloc(b->len);
        if (b->p == NULL) {
            fprintf(stderr, "regcache: malloc(%zu) failed\n", b->len);
            return -1;
        }
        if (((uintptr_t)b->p & 4095) == 2 * sizeof(size_t))
            break;
        /* Not a mapping of its own (served from a heap, where free() unmaps nothing):
         * the same pages stay at the address, and a registration of them stays right.
         * Only buffers that free() unmaps test the cache. */
        pthread_mutex_lock(&c->lock);
        c->not_mapped++;
        pthread_mutex_unlock(&c->lock);
        free(b->p);
    }
    pthread_mutex_lock(&c->lock);
    b->stamp = ++next_stamp;
    pthread_mutex_unlock(&c->lock);
    b->p[0] = b->stamp;
    return 0;
}

static void *work(void *arg)
{
    struct worker *w = arg;
    struct cache *c = w->cache;
    struct buffer live[LIVE] = { { NULL, 0, 0 } };
    int stop = 0;
    for (unsigned long r = 0; r < w->rounds && !stop; r++) {
        struct buffer *b = &live[rng(&w->seed) % LIVE];
        int renew_failed = (b->p == NULL || rng(&w->seed) % 4 == 0) && renew(c, w, b) != 0;
        pthread_mutex_lock(&c->lock);
        if (renew_failed)
            c->failed = 1;
        if (c->failed) {
            pthread_mutex_unlock(&c->lock);
            break;
        }
        struct entry *e = lookup(c, (uintptr_t)b->p, b->len, b->stamp);
        if (e == NULL) {
            c->failed = 1;
        } else if (e->pinned_stamp != b->stamp && (c->hit_freed_before || !c->monitored)) {
            /* The registration is of an older buffer at this address, whose free() had
             * returned before this lookup began: the NIC would read memory that is not
             * this buffer. */
            c->stale++;
        } else if (e->pinned_stamp != b->stamp) {
            /* The older buffer's free() is still running in another thread: the kernel
             * took the mapping away, and malloc gave the address to this buffer, but it
             * tells the userfaultfd only after (docs/monitors.md). */
            c->reused_in_flight++;
        }
        stop = c->failed;
        pthread_mutex_unlock(&c->lock);
    }
    for (int i = 0; i < LIVE; i++)
        free(live[i].p);
    return NULL;
}

static int usage(const char *why)
{
    fprintf(stderr, "regcache: %s\nusage: regcache [--socket PATH] [--threads N] "
                    "[--rounds N] [--no-monitor]\n", why);
    return 2;
}

static unsigned long long number(const char *s, unsigned long long max)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v > max || s[0] == '-')
        return 0;
    return v;
}

static int parse(int argc, char **argv, struct options *o)
{
    o->socket = NULL;
    o->threads = 4;
    o->rounds = 20000;
    o->monitored = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--no-monitor") == 0) {
            o->monitored = 0;
            continue;
        }
        if (v == NULL)
            return usage(a[0] == '-' ? "an option needs a value" : "unknown argument");
        i++;
        if (strcmp(a, "--socket") == 0) {
            o->socket = v;
        } else if (strcmp(a, "--threads") == 0) {
            o->threads = (unsigned)number(v, 64);
            if (o->threads == 0)
                return usage("--threads takes 1 to 64");
        } else if (strcmp(a, "--rounds") == 0) {
            o->rounds = (unsigned long)number(v, 1000000);
            if (o->rounds == 0)
                return usage("--rounds takes 1 to 1000000");
        } else {
            return usage("unknown option");
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct options o;
    int bad = parse(argc, argv, &o);
    if (bad != 0)
        return bad;
    /* Every buffer of 64 KiB or more is its own mapping, unmapped by free(): the case a
     * registration cache must not get wrong. */
    if (mallopt(M_MMAP_THRESHOLD, 64 * 1024) != 1 || mallopt(M_ARENA_MAX, 1) != 1 ||
        mallopt(M_TOP_PAD, 0) != 1 || mallopt(M_TRIM_THRESHOLD, 0) != 1) {
        fprintf(stderr, "regcache: mallopt failed\n");
        return 1;
    }
    static struct cache c;
    pthread_mutex_init(&c.lock, NULL);
    /* A stamp per renewal, at most one per round of each thread, plus the first ones. */
    c.returned = calloc(((size_t)o.threads * (o.rounds + 1)) / 8 + 2, 1);
    if (c.returned == NULL) {
        fprintf(stderr, "regcache: out of memory\n");
        return 1;
    }
    c.monitored = o.monitored;
    memshadow_status s = memshadow_connect_to(o.socket, &c.client);
    if (s != MEMSHADOW_OK) {
        fprintf(stderr, "regcache: memshadow_connect_to: %s: %s\n", memshadow_status_name(s),
                memshadow_last_error());
        return 1;
    }
    pthread_t t[64];
    struct worker w[64];
    for (unsigned i = 0; i < o.threads; i++) {
        w[i] = (struct worker){ .cache = &c, .rounds = o.rounds, .seed = 0x9e3779b97f4a7c15ULL * (i + 1) };
        if (pthread_create(&t[i], NULL, work, &w[i]) != 0) {
            fprintf(stderr, "regcache: pthread_create failed\n");
            return 1;
        }
    }
    for (unsigned i = 0; i < o.threads; i++)
        pthread_join(t[i], NULL);
    for (size_t k = 0; k < CACHE_SIZE; k++)
        if (c.e[k].used)
            drop(&c.e[k]);
    printf("lookups=%" PRIu64 " hits=%" PRIu64 " misses=%" PRIu64 " dropped_invalid=%" PRIu64
           " dropped_by_event=%" PRIu64 " overflows=%" PRIu64 " stale=%" PRIu64
           " not_mapped=%" PRIu64 " reused_in_flight=%" PRIu64 "\n",
           c.lookups, c.hits, c.misses, c.dropped_invalid, c.dropped_by_event, c.overflows,
           c.stale, c.not_mapped, c.reused_in_flight);
    free(c.returned);
    memshadow_client_free(c.client);
    return c.failed || c.stale > 0 ? 1 : 0;
}
