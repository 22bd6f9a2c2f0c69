"""The workload of the preload benchmark (tests/benches/preload.rs): a Python program that
knows nothing of memshadow and churns large buffers, the kind of memory memshadow-run
attaches. Each round allocates bytearrays of 1 to 16 MiB filled with a pattern, modifies
them in place, slices them (copies), extends them (realloc, which glibc does with mremap
for mapped blocks) and frees them, and writes, resizes (mremap) and closes private
anonymous mmaps; hashlib digests samples of all of them. Deterministic: stdout is one line
of the rounds and a digest, the same in every run. `--rounds N` (default 12) sets the work;
`--timing` writes the time of each phase to stderr (never stdout)."""

import hashlib
import mmap
import sys
import time

MiB = 1 << 20
PATTERN = bytes(range(256))


def arg(name, default):
    a = sys.argv[1:]
    return int(a[a.index(name) + 1]) if name in a else default


ROUNDS = arg("--rounds", 12)
TIMING = "--timing" in sys.argv
spent = {"bytearray": 0.0, "mmap": 0.0, "hash": 0.0}


def timed(phase, t):
    now = time.perf_counter()
    spent[phase] += now - t
    return now


def filled(n, salt):
    b = bytearray(PATTERN * (n // 256))
    b[salt % 4096 :: 4096] = bytes([salt & 0xFF]) * len(range(salt % 4096, n, 4096))
    return b


def sample(h, buf):
    """Hashes 256 KiB of every 2 MiB of `buf` (all of it would be mostly hashing)."""
    with memoryview(buf) as v:
        for at in range(0, len(v), 2 * MiB):
            h.update(v[at : at + 256 * 1024])


total = hashlib.sha256()
for r in range(ROUNDS):
    t = time.perf_counter()
    # Bytearrays of 1..16 MiB: filled, written in place, sliced, extended, half freed.
    sizes = [(1 + (r * 5 + k * 3) % 16) * MiB for k in range(6)]
    bufs = [filled(n, r * 16 + k) for k, n in enumerate(sizes)]
    for k, b in enumerate(bufs):
        b[1::8192] = bytes([(r + k) & 0xFF]) * len(range(1, len(b), 8192))
        b[len(b) // 2 : len(b) // 2 + 4096] = b[:4096]
    slices = [bytes(b[4096 * k : 4096 * k + (len(b) >> 1)]) for k, b in enumerate(bufs)]
    bufs[0].extend(bufs[1])
    bufs[2] += slices[3]
    del bufs[1::2]
    bufs.append(filled(8 * MiB, r))
    t = timed("bytearray", t)
    for b in bufs + slices:
        sample(total, b)
    del bufs, slices
    t = timed("hash", t)

    # Private anonymous maps: written, resized (mremap), written again, closed.
    maps = []
    for k in range(3):
        n = (2 + (r + k) % 8) * MiB
        m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE)
        m.write(PATTERN * (n // 256))
        m[k * 4096 : k * 4096 + 4096] = bytes([r & 0xFF]) * 4096
        m.resize(2 * n)
        m[n : n + n // 2] = PATTERN[::-1] * (n // 512)
        maps.append(m)
    t = timed("mmap", t)
    for m in maps:
        sample(total, m)
    t = timed("hash", t)
    for m in maps:
        m.close()
    timed("mmap", t)

print(f"rounds {ROUNDS} digest {total.hexdigest()[:32]}")
if TIMING:
    print(" ".join(f"{k}={v:.3f}s" for k, v in spent.items()), file=sys.stderr)
