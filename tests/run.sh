#!/bin/sh
# The README's test command: builds the workspace (the integration tests start its
# binaries), runs every test, then lists the tests, or parts of tests, that could not run
# here and why (they need root, or a system tool that is missing). Arguments replace
# `--workspace` of `cargo test` (e.g. `tests/run.sh -p memshadow-tests --test e2e`).
#
# With MEMSHADOW_TESTS_REQUIRE_ALL=1 (set by .ci/run) a test that cannot run fails instead.
set -u
cd "$(dirname "$0")/.."

skips="${CARGO_TARGET_DIR:-target}/memshadow-skips"
rm -rf "$skips" && mkdir -p "$skips" || exit 1
MEMSHADOW_SKIP_DIR=$(cd "$skips" && pwd) || exit 1
export MEMSHADOW_SKIP_DIR

cargo build --workspace || exit
if [ "$#" -eq 0 ]; then set -- --workspace; fi
cargo test "$@"
status=$?

n=$(cat "$skips"/*.skip 2>/dev/null | wc -l)
echo
if [ "$n" -eq 0 ]; then
  echo "tests/run.sh: nothing was skipped"
else
  echo "tests/run.sh: skipped here (counted as passed, they checked nothing): $n"
  sort "$skips"/*.skip | sed 's/^/  /'
  echo "tests/run.sh: to run them all, run this as root with the README's prerequisites installed"
fi
exit "$status"
