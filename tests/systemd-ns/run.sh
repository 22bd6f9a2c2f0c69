#!/usr/bin/env bash
# Runs a command as root inside a namespace booted by boot.sh, from /, with no environment
# but PATH (what a login there would find, not what the caller has exported):
#
#   run.sh INSTANCE_DIR COMMAND [ARG]...
#
# The exit status is the command's.
set -euo pipefail
ns=${1:?usage: run.sh INSTANCE_DIR COMMAND [ARG]...}
shift
[ $# -gt 0 ] || { echo "run.sh: no command" >&2; exit 2; }
pid=$(cat "$ns/pid")
# Not exec: nsenter stays this script's child. Killing this script (as a test does to a
# client it is done with) then leaves nsenter to wait for the command inside; killing nsenter
# itself would hand the command to the host's init, and its zombie, invisible to the
# namespace's systemd, would hold up the namespace's poweroff.
nsenter --target "$pid" --mount --pid --uts --ipc --net --cgroup -- \
  /bin/sh -c 'cd / && exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"' \
  run.sh "$@"
