#!/usr/bin/env bash
# Starts evcxr_jupyter for genlab (registered by `cargo xtask setup`).
#
# Each running kernel gets a build folder of its own under target/evcxr/slot-N that survives
# between sessions, so compiled dependencies (dfdx, plotters, genlab) are reused: the first
# free slot is taken with an exclusive lock held for the kernel's lifetime, so two open
# kernels never share one build folder.
# Usage: evcxr-kernel.sh PATH/TO/evcxr_jupyter CONNECTION_FILE
set -euo pipefail
evcxr="$1"
connection="$2"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base="$root/target/evcxr"
mkdir -p "$base"
export PATH="$(dirname "$evcxr"):$PATH"
export EVCXR_CONFIG_DIR="$base/config"
for slot in 0 1 2 3 4 5 6 7; do
  exec {lock}>"$base/slot-$slot.lock"
  if flock -n "$lock"; then
    export EVCXR_TMPDIR="$base/slot-$slot"
    mkdir -p "$EVCXR_TMPDIR"
    # The lock descriptor stays open in evcxr_jupyter until the kernel exits.
    exec "$evcxr" --control_file "$connection"
  fi
  exec {lock}>&-
done
echo "genlab: all 8 evcxr build folders under $base are in use by running kernels; shut one down" >&2
exit 1
