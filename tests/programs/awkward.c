/* Programs that do awkward things memshadow-run's preload library must not disturb
 * (tests/preload.rs). Each prints what it did; run alone and under memshadow-run, the
 * output and the files must be the same.
 *
 *   awkward cancel          a thread cancelled before it calls malloc(4 MiB): the cancel
 *                           lands at its next cancellation point, after malloc
 *   awkward stdio DIR       closes every descriptor, opens three files of DIR (they get
 *                           0, 1 and 2), maps 4 MiB; nothing but its own bytes in them
 *   awkward forkfd DIR      closes descriptors 3 and up, opens DIR/log (it gets 3), maps
 *                           4 MiB, forks; the child writes to the log
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static atomic_int go;

static void cleanup(void *arg) {
    (void)arg;
    if (write(1, "cleanup ran\n", 12) < 0) _exit(9);
}

static void *cancelled(void *arg) {
    (void)arg;
    pthread_cleanup_push(cleanup, 0);
    while (!atomic_load(&go)) {
    } /* no cancellation point */
    void *p = malloc(4 << 20); /* not a cancellation point */
    memset(p, 1, 4 << 20);
    pthread_testcancel();
    free(p);
    pthread_cleanup_pop(0);
    return 0;
}

static int cancel(void) {
    pthread_t t;
    pthread_create(&t, 0, cancelled, 0);
    pthread_cancel(t);
    atomic_store(&go, 1);
    void *r;
    pthread_join(t, &r);
    printf("joined: %s\n", r == PTHREAD_CANCELED ? "cancelled" : "returned");
    return 0;
}

static int open_in(const char *dir, const char *name, int flags) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return open(path, flags | O_CREAT | O_TRUNC, 0600);
}

static void *map4(void) {
    char *p = mmap(0, 4 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) p[0] = 1;
    return p;
}

static int stdio_files(const char *dir) {
    for (int fd = 0; fd < 64; fd++) close(fd);
    int in = open_in(dir, "in", O_RDWR), out = open_in(dir, "out", O_RDWR),
        err = open_in(dir, "err", O_RDWR);
    if (in != 0 || out != 1 || err != 2) return 3;
    map4();
    map4();
    if (write(2, "the program's own line\n", 23) != 23) return 4;
    return 0;
}

static int fork_log(const char *dir) {
    for (int fd = 3; fd < 64; fd++) close(fd);
    int log = open_in(dir, "log", O_WRONLY | O_APPEND);
    printf("log fd %d\n", log);
    map4();
    fflush(stdout);
    pid_t c = fork();
    if (c == 0) _exit(write(log, "child\n", 6) == 6 ? 0 : 5);
    int status = 0;
    waitpid(c, &status, 0);
    if (write(log, "parent\n", 7) != 7) return 6;
    printf("child exited %d\n", WEXITSTATUS(status));
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "cancel") == 0) return cancel();
    if (argc >= 3 && strcmp(argv[1], "stdio") == 0) return stdio_files(argv[2]);
    if (argc >= 3 && strcmp(argv[1], "forkfd") == 0) return fork_log(argv[2]);
    fprintf(stderr, "usage: awkward cancel | stdio DIR | forkfd DIR\n");
    return 2;
}
