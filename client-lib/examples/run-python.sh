#!/usr/bin/env bash
# Runs a Python program that knows nothing of memshadow under memshadow-run, and watches it
# with memshadowctl: the mirrors of its buffers, a device read of one after a sync (the
# bytes it wrote), and the trace of its unmaps. Starts a memshadowd of its own on a
# temporary socket and stops it at the end.
#
#   client-lib/examples/run-python.sh      binaries from target/release (or $MEMSHADOW_BIN)
set -euo pipefail
bin=${MEMSHADOW_BIN:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}
dir=$(mktemp -d)
daemon=""
cleanup() {
  if [ -n "$daemon" ]; then kill "$daemon" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
export MEMSHADOW_SOCKET=$dir/memshadowd.sock PATH="$bin:$PATH"

memshadowd --no-config --socket "$MEMSHADOW_SOCKET" 2>"$dir/memshadowd.log" &
daemon=$!
until memshadowctl status >/dev/null 2>&1; do
  kill -0 "$daemon" 2>/dev/null || { cat "$dir/memshadowd.log" >&2; exit 1; }
  sleep 0.05
done
# The trace, once it listens (so it sees the program's first unmap).
memshadowctl trace --event unmap --count 2 >"$dir/trace" &
until memshadowctl stats | grep -q '^trace.streams  *[1-9]'; do sleep 0.05; done

echo "== python3 under memshadow-run"
memshadow-run -- python3 - <<'PY'
import ctypes, os
pid = os.getpid()
buf = bytearray(b"memshadow" * (4 << 20))  # 36 MiB: a mapping of its own
buf[:12] = b"hello device"
c = (ctypes.c_char * 1).from_buffer(buf)
addr = ctypes.addressof(c)
del c
print(f"pid {pid}: a buffer of {len(buf) >> 20} MiB at {addr:#x}", flush=True)
os.system(f"memshadowctl mirrors --pid {pid}")
os.system(f"memshadowctl sync --pid {pid} >/dev/null && memshadowctl peek --pid {pid} {addr:#x} 32")
del buf  # free(): glibc unmaps it, the daemon retires its mirror
big = bytearray(64 << 20)
del big
print("freed", flush=True)
PY
wait %2 2>/dev/null || true
echo "== memshadowctl trace --event unmap"
cat "$dir/trace"
