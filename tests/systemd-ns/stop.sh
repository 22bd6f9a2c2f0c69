#!/usr/bin/env bash
# Powers off a namespace booted by boot.sh and removes what it left on the host: its cgroup
# and its instance directory. Safe to run twice, and after a boot that failed half-way.
#
#   stop.sh INSTANCE_DIR
set -uo pipefail
ns=${1:?usage: stop.sh INSTANCE_DIR}
[ -d "$ns" ] || exit 0
cg=$(cat "$ns/cgroup" 2>/dev/null) || cg=""
pid=$(cat "$ns/pid" 2>/dev/null) || pid=""

# Processes left in the namespace's cgroup tree (none once PID 1 of the namespace is gone).
procs() { [ -n "$cg" ] && [ -d "$cg" ] && find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null; }

if [ -n "$pid" ] && [ -n "$(procs)" ]; then
  # A clean shutdown first (units stop, journald flushes), then force.
  nsenter --target "$pid" --mount --pid --uts --ipc --net --cgroup \
    systemctl poweroff --no-block >/dev/null 2>&1 || true
  for _ in $(seq 100); do
    [ -z "$(procs)" ] && break
    sleep 0.1
  done
fi
if [ -n "$(procs)" ]; then
  # SIGKILL to PID 1 of a pid namespace ends every process in it.
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
  for _ in $(seq 50); do
    [ -z "$(procs)" ] && break
    for p in $(procs); do kill -KILL "$p" 2>/dev/null; done
    sleep 0.1
  done
fi
status=0
if [ -n "$cg" ] && [ -d "$cg" ]; then
  # systemd's slices and scopes, deepest first, then the namespace's own cgroup.
  find "$cg" -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null
  rmdir "$cg" 2>/dev/null || { echo "stop.sh: cannot remove the cgroup $cg" >&2; status=1; }
fi
# Only the files boot.sh writes; rmdir refuses anything else (nothing is mounted here on the
# host side: the namespace's mounts never propagate out).
rm -f "$ns/pid" "$ns/cgroup" "$ns/boot.log"
rmdir "$ns/scratch" 2>/dev/null
rmdir "$ns" 2>/dev/null || { echo "stop.sh: $ns is not empty; left in place" >&2; status=1; }
exit "$status"
