#!/usr/bin/env bash
# Installs memshadow: the binaries, the systemd units, the example configuration, the C
# header and pkg-config file and libraries (when built), memshadow-run's preload library
# (in PKGLIBDIR, where memshadow-run looks: ../lib/memshadow beside BINDIR's bin), and
# creates the `memshadow` group
# whose members may connect to the daemon's socket. The shared library is installed as
# libmemshadow.so.X.Y.Z with the links libmemshadow.so.X (its SONAME, what programs load)
# and libmemshadow.so (what -lmemshadow finds); `ldconfig` runs when installing to /.
#
#   systemd/install.sh [--prefix DIR] [--destdir DIR] [--from DIR] [--no-build] [--no-group]
#
# --prefix DIR    installation prefix (default /usr/local): DIR/bin, DIR/lib, DIR/include,
#                 units in DIR/lib/systemd/system
# --destdir DIR   stage everything under DIR (packaging, tests); nothing outside it is touched
#                 (the group goes into DIR/etc/group if that file exists, else it is skipped)
# --from DIR      where the built binaries are (default: release/ of $CARGO_TARGET_DIR, else
#                 of target/ in the source tree)
# --srcdir DIR    the source tree (default: the tree this script is in)
# --no-build      do not run the build first (BUILD below, the README's main-job build)
# --no-group      do not create the memshadow group
# Environment overrides: BINDIR, LIBDIR, PKGLIBDIR (default PREFIX/lib/memshadow),
# INCLUDEDIR, SYSCONFDIR (default /etc), UNITDIR.
#
# Then, on a machine run by systemd:
#   systemctl enable --now memshadowd.socket
#   usermod -aG memshadow USER     # users whose programs use memshadow
set -euo pipefail

SRCDIR=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/usr/local
DESTDIR=${DESTDIR:-}
FROM=""
BUILD=1
GROUP=1

die() { echo "install.sh: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --destdir) DESTDIR=${2:?--destdir needs a directory}; shift 2 ;;
    --from) FROM=${2:?--from needs a directory}; shift 2 ;;
    --srcdir) SRCDIR=${2:?--srcdir needs a directory}; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --no-group) GROUP=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

case "$PREFIX" in /*) ;; *) die "--prefix must be absolute: $PREFIX" ;; esac
if [ -n "$DESTDIR" ]; then
  mkdir -p "$DESTDIR"
  DESTDIR=$(cd "$DESTDIR" && pwd)
fi
BINDIR=${BINDIR:-$PREFIX/bin}
LIBDIR=${LIBDIR:-$PREFIX/lib}
PKGLIBDIR=${PKGLIBDIR:-$PREFIX/lib/memshadow}
INCLUDEDIR=${INCLUDEDIR:-$PREFIX/include}
SYSCONFDIR=${SYSCONFDIR:-/etc}
UNITDIR=${UNITDIR:-$PREFIX/lib/systemd/system}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$SRCDIR/Cargo.toml" | head -n1)

# The build of the README's main job, word for word (tests/readme.rs checks it), so that after
# it nothing is built again. Another selection of targets builds other artifacts: building
# examples brings in the dev-dependencies, and with resolver 2 their features (bitflags' std,
# regex-syntax's unicode tables, syn's full parser, ...) then apply to the crates shared with
# the binaries, so nix, memshadow-proto, the proc macros, tracing-subscriber and every crate
# of the workspace above them are built a second time; and the C library's files
# (libmemshadow.so and .a, whose names carry no hash) are rebuilt by each build in turn.
BUILD_CMD="cargo build --release --workspace --lib --bins --examples"
if [ "$BUILD" = 1 ]; then
  echo "building: $BUILD_CMD"
  (cd "$SRCDIR" && $BUILD_CMD)
fi
# Where cargo put it: $CARGO_TARGET_DIR (relative to the source tree, where cargo ran), else
# target/ of the source tree.
case "${CARGO_TARGET_DIR:-}" in
  "") TARGET=$SRCDIR/target ;;
  /*) TARGET=$CARGO_TARGET_DIR ;;
  *) TARGET=$SRCDIR/$CARGO_TARGET_DIR ;;
esac
FROM=${FROM:-$TARGET/release}

put() { # put MODE SOURCE TARGET: install one file under DESTDIR
  install -D -m "$1" "$2" "$DESTDIR$3"
  echo "installed $DESTDIR$3"
}
link() { # link NAME TARGET: TARGET (under DESTDIR) becomes a symbolic link to NAME
  ln -sfn "$1" "$DESTDIR$2"
  echo "linked $DESTDIR$2 -> $1"
}
skip() { echo "skipped $1: $2"; }

# Binaries.
[ -x "$FROM/memshadowd" ] || die "$FROM/memshadowd is not built (run $BUILD_CMD, or pass --from)"
put 755 "$FROM/memshadowd" "$BINDIR/memshadowd"
if [ -x "$FROM/memshadowctl" ]; then
  put 755 "$FROM/memshadowctl" "$BINDIR/memshadowctl"
else
  skip memshadowctl "not built in $FROM"
fi
# memshadow-run and its preload library (not a library to link against: no SONAME links).
if [ -x "$FROM/memshadow-run" ] && [ -f "$FROM/libmemshadow_preload.so" ]; then
  put 755 "$FROM/memshadow-run" "$BINDIR/memshadow-run"
  put 644 "$FROM/libmemshadow_preload.so" "$PKGLIBDIR/libmemshadow_preload.so"
else
  skip memshadow-run "memshadow-run or libmemshadow_preload.so not built in $FROM"
fi

# C library, header and pkg-config file. Cargo builds libmemshadow.so; its SONAME is
# libmemshadow.so.MAJOR (client-lib/capi/build.rs).
MAJOR=${VERSION%%.*}
SHARED=0
if [ -f "$FROM/libmemshadow.so" ]; then
  soname=$(readelf -d "$FROM/libmemshadow.so" 2>/dev/null \
    | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p') || soname=""
  if [ -n "$soname" ] && [ "$soname" != "libmemshadow.so.$MAJOR" ]; then
    die "$FROM/libmemshadow.so has the SONAME $soname, not libmemshadow.so.$MAJOR of version $VERSION"
  fi
  put 644 "$FROM/libmemshadow.so" "$LIBDIR/libmemshadow.so.$VERSION"
  link "libmemshadow.so.$VERSION" "$LIBDIR/libmemshadow.so.$MAJOR"
  link "libmemshadow.so.$MAJOR" "$LIBDIR/libmemshadow.so"
  SHARED=1
else
  skip libmemshadow.so "not built in $FROM"
fi
if [ -f "$FROM/libmemshadow.a" ]; then
  put 644 "$FROM/libmemshadow.a" "$LIBDIR/libmemshadow.a"
else
  skip libmemshadow.a "not built in $FROM"
fi
if [ -f "$SRCDIR/client-lib/include/memshadow.h" ]; then
  put 644 "$SRCDIR/client-lib/include/memshadow.h" "$INCLUDEDIR/memshadow.h"
else
  skip memshadow.h "no client-lib/include/memshadow.h in $SRCDIR"
fi
if [ -f "$SRCDIR/client-lib/memshadow.pc.in" ]; then
  pc=$(mktemp)
  sed -e "s#@PREFIX@#$PREFIX#g" -e "s#@LIBDIR@#$LIBDIR#g" \
      -e "s#@INCLUDEDIR@#$INCLUDEDIR#g" -e "s#@VERSION@#$VERSION#g" \
      "$SRCDIR/client-lib/memshadow.pc.in" > "$pc"
  put 644 "$pc" "$LIBDIR/pkgconfig/memshadow.pc"
  rm -f "$pc"
else
  skip memshadow.pc "no client-lib/memshadow.pc.in in $SRCDIR"
fi

# systemd units, with ExecStart pointing at the installed daemon.
grep -q '^ExecStart=/usr/local/bin/memshadowd$' "$SRCDIR/systemd/memshadowd.service" \
  || die "systemd/memshadowd.service: no ExecStart=/usr/local/bin/memshadowd line to rewrite"
unit=$(mktemp)
sed "s#^ExecStart=/usr/local/bin/memshadowd\$#ExecStart=$BINDIR/memshadowd#" \
  "$SRCDIR/systemd/memshadowd.service" > "$unit"
put 644 "$unit" "$UNITDIR/memshadowd.service"
rm -f "$unit"
put 644 "$SRCDIR/systemd/memshadowd.socket" "$UNITDIR/memshadowd.socket"

# Example configuration: never overwrite the administrator's file.
conf="$SYSCONFDIR/memshadow/memshadowd.toml"
if [ -e "$DESTDIR$conf" ]; then
  put 644 "$SRCDIR/systemd/memshadowd.toml" "$conf.example"
  echo "kept $DESTDIR$conf (the shipped example is $DESTDIR$conf.example)"
else
  put 644 "$SRCDIR/systemd/memshadowd.toml" "$conf"
fi

# The group whose members may connect (memshadowd.socket: SocketGroup=memshadow).
if [ "$GROUP" = 0 ]; then
  skip "group memshadow" "--no-group"
elif ! command -v groupadd >/dev/null 2>&1; then
  skip "group memshadow" "no groupadd here; create a system group named memshadow"
elif [ -n "$DESTDIR" ]; then
  if [ ! -f "$DESTDIR/etc/group" ]; then
    skip "group memshadow" "$DESTDIR/etc/group does not exist"
  elif grep -q '^memshadow:' "$DESTDIR/etc/group"; then
    echo "group memshadow exists in $DESTDIR/etc/group"
  else
    groupadd --prefix "$DESTDIR" --system memshadow
    echo "created group memshadow in $DESTDIR/etc/group"
  fi
elif getent group memshadow >/dev/null; then
  echo "group memshadow exists"
else
  groupadd --system memshadow
  echo "created group memshadow"
fi

# The dynamic linker's cache, so programs find libmemshadow.so.MAJOR in LIBDIR at once.
if [ "$SHARED" = 0 ]; then
  :
elif [ -n "$DESTDIR" ]; then
  echo "next (on the target machine): ldconfig"
elif command -v ldconfig >/dev/null 2>&1; then
  ldconfig
  echo "ran ldconfig"
else
  skip ldconfig "not found; run it as root so programs find libmemshadow.so.$MAJOR"
fi

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "next: systemctl enable --now memshadowd.socket; usermod -aG memshadow USER"
else
  echo "next (on the target machine): systemctl daemon-reload; systemctl enable --now memshadowd.socket; usermod -aG memshadow USER"
fi
