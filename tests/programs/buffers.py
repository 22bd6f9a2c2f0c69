"""A workload of large buffers for memshadow-run's tests (tests/preload.rs), written as any
Python program is: it knows nothing of memshadow. It allocates, fills, slices, resizes and
frees bytearrays and anonymous mmaps, on threads, under a signal timer, across a fork and an
exec, and prints only what does not depend on addresses or timing (stdout), so two runs give
the same output. At each "QUIET n" it waits for a line on stdin: the test looks at its
memory then. Addresses go to stderr ("addr NAME HEX LEN"), and the forked child's pid ("forked PID"). It exits with status 3."""

import ctypes
import hashlib
import mmap
import os
import signal
import subprocess
import sys
import threading

MiB = 1 << 20
PATTERN = bytes(range(256))


def quiet(n):
    print(f"QUIET {n}", flush=True)
    sys.stdin.readline()


def addr(name, buf):
    c = (ctypes.c_char * 1).from_buffer(buf)
    a = ctypes.addressof(c)
    del c
    print(f"addr {name} {a:#x} {len(buf)}", file=sys.stderr, flush=True)


def digest(*bufs):
    h = hashlib.sha256()
    for b in bufs:
        h.update(b)
    return h.hexdigest()[:16]


def filled(n, salt):
    b = bytearray(PATTERN * (n // 256))
    b[::4096] = bytes([salt]) * len(range(0, n, 4096))
    return b


# 0: buffers of 1 to 8 MiB and a 16 MiB anonymous mapping, filled.
bufs = [filled((i + 1) * MiB, i) for i in range(8)]
m = mmap.mmap(-1, 16 * MiB, flags=mmap.MAP_PRIVATE)
m.write(PATTERN * (16 * MiB // 256))
shared = mmap.mmap(-1, 4 * MiB)  # MAP_SHARED
shared.write(PATTERN[::-1] * (4 * MiB // 256))
addr("mmap", m)
print("stage 0", digest(*bufs), digest(m), digest(shared))
quiet(0)

# 1: written in place, sliced, half freed and allocated again, part discarded, resized.
for i, b in enumerate(bufs):
    b[1::8192] = bytes([255 - i]) * len(range(1, len(b), 8192))
slices = [bytes(b[4096 : 4096 * 300]) for b in bufs]
del bufs[1::2]
bufs += [filled(3 * MiB, 100 + i) for i in range(4)]
bufs[0].extend(bufs[1])  # realloc: glibc moves the mapped block with mremap
m.madvise(mmap.MADV_DONTNEED, 0, 2 * MiB)
m.resize(32 * MiB)  # mremap: the mapping moves or grows
m[16 * MiB : 20 * MiB] = PATTERN * (4 * MiB // 256)
shared[MiB : 2 * MiB] = bytes(MiB)
addr("mmap", m)
print("stage 1", digest(*bufs), digest(*slices), digest(m), digest(shared))
quiet(1)

# 2: a scratch mapping; threads churn buffers of their own while a timer's handler
# allocates too.
scratch = mmap.mmap(-1, 8 * MiB, flags=mmap.MAP_PRIVATE)
scratch.write(PATTERN * (8 * MiB // 256))
ticks = [0]


def on_tick(_sig, _frame):
    ticks[0] += 1
    bytearray(2 * MiB)


signal.signal(signal.SIGALRM, on_tick)
signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
results = {}


def churn(k):
    out = []
    for r in range(40):
        b = filled((1 + (k + r) % 4) * MiB, k * 40 + r)
        b[::2] = b[1::2]
        out.append(digest(b))
        del b
    results[k] = digest(*(x.encode() for x in out))


threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
signal.setitimer(signal.ITIMER_REAL, 0, 0)
print("stage 2", [results[k] for k in range(4)], ticks[0] > 0, digest(scratch))
scratch.close()
quiet(2)

# 3: a forked child works on a copy; an exec'ed interpreter works on its own.
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    b = filled(6 * MiB, 7)
    b[::5] = bytes(len(b[::5]))
    cm = mmap.mmap(-1, 4 * MiB, flags=mmap.MAP_PRIVATE)
    cm.write(PATTERN * (4 * MiB // 256))
    # New memory over the head of the child's copy of m, where the parent has m too.
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    c = (ctypes.c_char * 1).from_buffer(m)
    at = ctypes.addressof(c)
    del c
    fixed = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10  # MAP_FIXED
    got = libc.mmap(at, 4 * MiB, mmap.PROT_READ | mmap.PROT_WRITE, fixed, -1, 0)
    assert got == at, (got, at)
    os.write(w, digest(b, bufs[0], cm, m).encode())
    os._exit(7)
os.close(w)
print(f"forked {pid}", file=sys.stderr, flush=True)
from_child = os.read(r, 64).decode()
os.close(r)
_, status = os.waitpid(pid, 0)
code = "import sys; b = bytearray(b'z' * (12 << 20)); b[::7] = b'q' * len(b[::7]); print(len(b), b.count(b'q'))"
out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
print("stage 3", from_child, os.waitstatus_to_exitcode(status), out.stdout.strip())
quiet(3)

del bufs[:2]
m.close()
shared.close()
print("done", digest(*bufs))
sys.exit(3)
