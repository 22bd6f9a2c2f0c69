#!/usr/bin/env bash
# Builds the Debian package memshadow_VERSION-1_ARCH.deb from this workspace with cargo-deb
# (its settings: [package.metadata.deb] in daemon/Cargo.toml):
#
#   packaging/deb/build.sh [--no-build] [--output DIR]
#
# 1. Stages the files with `systemd/install.sh --destdir`, so that the package and the
#    script install the same files made the same way (the service's ExecStart=, the
#    pkg-config file's paths, the SONAME links): prefix /usr, the library in the multiarch
#    directory (/usr/lib/x86_64-linux-gnu on amd64), units in /usr/lib/systemd/system, the
#    configuration in /etc/memshadow (a conffile). The script first runs its build, the
#    README's main-job build, so after the main job nothing is built again (--no-build:
#    package what the target directory has).
# 2. Strips debug info and leaves out the static library.
# 3. `cargo deb --no-build` packs the stage with the maintainer scripts next to this file.
#
# --output DIR    where the .deb goes (default: TARGET_DIR/debian); its path is printed last
#
# Needs cargo-deb (`cargo install cargo-deb --version 3.8.0 --locked`), dpkg-dev
# (dpkg-architecture, dpkg-shlibdeps) and binutils (strip, readelf).
set -euo pipefail

SRCDIR=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=1
OUTPUT=""
die() { echo "packaging/deb/build.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0; shift ;;
    --output) OUTPUT=${2:?--output needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

cd "$SRCDIR"
cargo deb --version >/dev/null 2>&1 \
  || die "cargo-deb is not installed: cargo install cargo-deb --version 3.8.0 --locked"
command -v dpkg-architecture >/dev/null || die "dpkg-architecture is missing (Debian package dpkg-dev)"
command -v strip >/dev/null || die "strip is missing (Debian package binutils)"

# Cargo's target directory (CARGO_TARGET_DIR, a config file, or ./target).
TARGET=$(cargo metadata --format-version 1 --no-deps \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$TARGET" ] || die "cargo metadata did not name the target directory"
OUTPUT=${OUTPUT:-$TARGET/debian}

# cargo-deb reads the stage through its `target/release/` asset prefix, so it lives there.
STAGE=$TARGET/release/deb-root
MULTIARCH=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
rm -rf "$STAGE"
build=()
[ "$BUILD" = 1 ] || build=(--no-build)
# Its build's progress goes to stderr; the list of what it staged to the log.
LIBDIR=/usr/lib/$MULTIARCH UNITDIR=/usr/lib/systemd/system \
  systemd/install.sh "${build[@]}" --no-group --from "$TARGET/release" --destdir "$STAGE" \
  --prefix /usr > "$TARGET/release/deb-root.log" \
  || { cat "$TARGET/release/deb-root.log" >&2; die "systemd/install.sh --destdir failed"; }

lib=$STAGE/usr/lib/$MULTIARCH
for f in "$STAGE/usr/bin/memshadowd" "$STAGE/usr/bin/memshadowctl" \
         "$STAGE/usr/lib/systemd/system/memshadowd.service" \
         "$STAGE/usr/lib/systemd/system/memshadowd.socket" \
         "$STAGE/etc/memshadow/memshadowd.toml" "$STAGE/usr/include/memshadow.h" \
         "$lib/pkgconfig/memshadow.pc" "$lib/libmemshadow.so"; do
  [ -e "$f" ] || die "the stage lacks ${f#"$STAGE"} (see $TARGET/release/deb-root.log)"
done
grep -qx 'ExecStart=/usr/bin/memshadowd' "$STAGE/usr/lib/systemd/system/memshadowd.service" \
  || die "the staged memshadowd.service does not run /usr/bin/memshadowd"
rm -f "$lib/libmemshadow.a"
# Symbols stay (a panic's backtrace names functions); DWARF goes.
strip --strip-debug "$STAGE/usr/bin/memshadowd" "$STAGE/usr/bin/memshadowctl" "$lib"/libmemshadow.so.*.*.*

mkdir -p "$OUTPUT"
cargo deb -p memshadow-daemon --no-build --output "$OUTPUT"
