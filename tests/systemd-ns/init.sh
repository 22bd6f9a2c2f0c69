#!/usr/bin/env bash
# PID 1 of the namespaces boot.sh creates, until it execs systemd: builds the namespace's view
# of the machine (see boot.sh), masks the units that must not run, then becomes systemd.
#
#   init.sh INSTANCE_DIR SYSTEMD [BIND_PATH]...
#
# Every mount made here is private (unshare --propagation private): none reaches the host.
set -euo pipefail

ns=$1 systemd=$2
shift 2

# A scratch tmpfs holds the overlays' upper layers and, for a moment, the bind paths. It is
# mounted in the instance directory, moved under the new /run, and detached at the end: the
# overlays keep it alive, nothing shows it, and it dies with the namespace.
scratch=$ns/scratch
mkdir -p "$scratch"
mount -t tmpfs -o mode=0700 memshadow-ns-scratch "$scratch"
i=0
for p in "$@"; do
  mkdir "$scratch/hold-$i"
  mount --rbind "$p" "$scratch/hold-$i"
  i=$((i + 1))
done

# Fresh /run (systemd's runtime state; no host socket or pid file shows through), then the
# scratch under it, then a fresh /tmp (PrivateTmp= directories land here, not on the host).
mount -t tmpfs -o mode=0755,nosuid,nodev memshadow-ns-run /run
mkdir /run/memshadow-ns-scratch
mount --move "$scratch" /run/memshadow-ns-scratch
scratch=/run/memshadow-ns-scratch
mount -t tmpfs -o mode=1777,nosuid,nodev memshadow-ns-tmp /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev memshadow-ns-shm /dev/shm

# /etc, /usr and /var: the host's files, written to in the scratch only.
for d in etc usr var; do
  mkdir -p "$scratch/$d/upper" "$scratch/$d/work"
  mount -t overlay "memshadow-ns-$d" \
    -o "lowerdir=/$d,upperdir=$scratch/$d/upper,workdir=$scratch/$d/work" "/$d"
done

# Kernel settings stay the host's: /proc/sys and /sys read-only. The non-recursive bind
# leaves out the host's mounts under /sys (its cgroup trees among them); the namespace's
# own cgroup2 tree (rooted at the cgroup boot.sh made) is mounted read-write on top.
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount --bind /sys /sys
mount -o remount,bind,ro /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup

# The bind paths, back where they were (they may now be under /tmp or an overlay).
i=0
for p in "$@"; do
  mkdir -p "$p"
  mount --rbind "$scratch/hold-$i" "$p"
  umount -R "$scratch/hold-$i"
  rmdir "$scratch/hold-$i"
  i=$((i + 1))
done
umount -l "$scratch"
rmdir "$scratch"

# The machine's identity and boot-time mounts are not the namespace's business.
echo memshadow-ns > /etc/hostname
printf '# memshadow test namespace: no mounts\n' > /etc/fstab
# A container image's "start no services from maintainer scripts" policy (Docker's
# policy-rc.d exits 101) does not hold here: this systemd runs services.
rm -f /usr/sbin/policy-rc.d
# The journal: in /run only, without the host kernel's log (/dev/kmsg is the host's).
mkdir -p /etc/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\nReadKMsg=no\n' > /etc/systemd/journald.conf.d/memshadow-ns.conf

# Masks: everything the early-boot targets pull in except journald, plus what a container
# must not run. Never let systemd-tmpfiles-setup run: its rules (Debian's tmp.conf, ...)
# act on whatever the namespace shares with the host.
mkdir -p /etc/systemd/system
mask() { ln -sfn /dev/null "/etc/systemd/system/$1"; }
for dir in /usr/lib/systemd/system /lib/systemd/system /etc/systemd/system; do
  for target in sysinit sockets timers paths basic local-fs remote-fs multi-user; do
    [ -d "$dir/$target.target.wants" ] || continue
    for unit in "$dir/$target.target.wants"/*; do
      [ -e "$unit" ] || [ -L "$unit" ] || continue
      name=$(basename "$unit")
      case "$name" in
        systemd-journald.service | systemd-journald.socket | systemd-journald-dev-log.socket) ;;
        *) mask "$name" ;;
      esac
    done
  done
done
for name in systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service \
  systemd-tmpfiles-clean.service systemd-tmpfiles-clean.timer systemd-remount-fs.service \
  systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service \
  systemd-journal-flush.service systemd-journald-audit.socket systemd-logind.service \
  systemd-firstboot.service systemd-sysusers.service systemd-networkd.service \
  dbus.service dbus.socket getty.target console-getty.service; do
  mask "$name"
done

# A container to systemd: it skips what only a machine does (hardware, the kernel log).
export container=memshadow-ns
exec "$systemd" --system --unit=basic.target --show-status=no --log-target=journal
