#!/usr/bin/env bash
# Boots a real systemd as PID 1 of private namespaces (pid, mount, uts, ipc, net, cgroup), so
# memshadow's units can be tried under the real thing on a machine whose own PID 1 is
# something else (a container, a CI runner, a VM with another init). tests/real_systemd.rs
# uses it; by hand, as root:
#
#   ns=$(tests/systemd-ns/boot.sh --bind "$PWD")    # prints the instance directory
#   tests/systemd-ns/run.sh "$ns" systemctl status
#   tests/systemd-ns/stop.sh "$ns"                   # powers off, removes the cgroup
#
# What the namespace sees (init.sh builds it): its own tmpfs on /run, /tmp and /dev/shm;
# /etc, /usr and /var are overlays whose writes go to a tmpfs that dies with the namespace
# (installing a package or adding a user inside changes nothing on the host); /proc/sys and
# /sys read-only; a cgroup2 tree of its own (a new child cgroup of the host's cgroup2
# hierarchy); an empty /etc/fstab. Units that would act on the machine (tmpfiles, udev,
# sysctl, modules, binfmt, getty, logind, timers, ...) are masked; journald runs.
#
# --bind PATH (repeatable) keeps the host's PATH at PATH inside, read-write, even where the
# namespace covers it (e.g. a checkout under /tmp): the checkout and cargo's target directory.
#
# Exit status: 0 when systemd reports `running` (the instance directory is on stdout);
# 77 when this machine cannot do it at all (the reason on stderr: not root, no systemd, no
# cgroup2, namespaces or overlayfs refused); 1 otherwise (the boot log on stderr).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
binds=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bind) binds+=("$(cd "${2:?--bind needs a path}" && pwd)"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "boot.sh: unknown argument $1" >&2; exit 1 ;;
  esac
done

unavailable() { echo "boot.sh: cannot boot systemd here: $*" >&2; exit 77; }

[ "$(id -u)" -eq 0 ] || unavailable "needs root"
for tool in unshare nsenter mount systemctl; do
  command -v "$tool" >/dev/null 2>&1 || unavailable "no $tool on PATH"
done
systemd=""
for p in /usr/lib/systemd/systemd /lib/systemd/systemd; do
  if [ -x "$p" ]; then systemd=$p; break; fi
done
[ -n "$systemd" ] || unavailable "no systemd binary (/usr/lib/systemd/systemd; Debian package systemd)"

# The host's cgroup2 hierarchy: unified (/sys/fs/cgroup) or hybrid (/sys/fs/cgroup/unified).
cgroot=""
for p in /sys/fs/cgroup /sys/fs/cgroup/unified; do
  if [ "$(stat -fc %T "$p" 2>/dev/null)" = cgroup2fs ]; then cgroot=$p; break; fi
done
[ -n "$cgroot" ] || unavailable "no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified"

ns=$(mktemp -d "${TMPDIR:-/tmp}/memshadow-systemd-ns.XXXXXX")
# From here on, stop.sh cleans up whatever exists.
fail() {
  echo "boot.sh: $*" >&2
  [ -f "$ns/boot.log" ] && sed 's/^/  boot.log: /' "$ns/boot.log" >&2
  "$here/stop.sh" "$ns" >&2 || true
  exit 1
}

# Can this machine make the namespaces and every kind of mount init.sh makes (a tmpfs, an
# overlay, read-only bind remounts, cgroup2)? A container, or a user namespace, may refuse.
mkdir "$ns/probe"
# shellcheck disable=SC2016 # expanded by the probe's shell
probe='p=$1
mount -t tmpfs probe "$p" && mkdir "$p/l" "$p/u" "$p/w" "$p/m" "$p/cg" &&
mount -t overlay probe -o "lowerdir=$p/l,upperdir=$p/u,workdir=$p/w" "$p/m" &&
mount --bind /sys /sys && mount -o remount,bind,ro /sys &&
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys &&
mount -t cgroup2 cgroup2 "$p/cg"'
if ! why=$(unshare --pid --fork --mount --propagation private --uts --ipc --net --cgroup \
    sh -c "$probe" sh "$ns/probe" 2>&1); then
  rmdir "$ns/probe" "$ns"
  unavailable "namespaces or mounts refused: ${why:-unshare failed}"
fi
rmdir "$ns/probe"

cg=$cgroot/$(basename "$ns")
mkdir "$cg" || { rmdir "$ns"; unavailable "cannot create a cgroup in $cgroot"; }
echo "$cg" > "$ns/cgroup"

# The launcher moves itself into the new cgroup first, so that `unshare --cgroup` makes that
# cgroup the root of the namespace's tree; unshare's child (PID 1 inside) runs init.sh, which
# execs systemd. --kill-child: killing unshare takes the namespace down with it.
# shellcheck disable=SC2016 # expanded by the launcher's shell
setsid bash -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' launcher "$cg" \
  unshare --pid --kill-child --mount --propagation private --uts --ipc --net --cgroup \
  --mount-proc "$here/init.sh" "$ns" "$systemd" "${binds[@]}" \
  < /dev/null > "$ns/boot.log" 2>&1 &
launcher=$!

# PID 1 of the namespace, as the host numbers it: unshare's only child.
pid=""
for _ in $(seq 50); do
  pid=$(cat "/proc/$launcher/task/$launcher/children" 2>/dev/null | tr -d ' ') || true
  [ -n "$pid" ] && break
  kill -0 "$launcher" 2>/dev/null || fail "unshare exited before starting init.sh"
  sleep 0.1
done
[ -n "$pid" ] || fail "unshare started no child"
echo "$pid" > "$ns/pid"

# Wait for systemd to finish booting (basic.target): `running`, or say what went wrong.
state=""
for _ in $(seq 150); do
  state=$(nsenter --target "$pid" --mount --pid --uts --ipc --net --cgroup \
    systemctl is-system-running 2>/dev/null) || true
  case "$state" in
    running) echo "$ns"; exit 0 ;;
    degraded)
      failed=$(nsenter --target "$pid" --mount --pid --uts --ipc --net --cgroup \
        systemctl --failed --no-legend --plain 2>&1) || true
      fail "systemd booted degraded; failed units: $failed" ;;
  esac
  kill -0 "$pid" 2>/dev/null || fail "systemd (pid $pid) exited during boot"
  sleep 0.1
done
fail "systemd did not reach running in 15 s (state: ${state:-none})"
