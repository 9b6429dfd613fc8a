#!/usr/bin/env bash
# The standard benchmark suite on this machine: builds the release
# binaries, then `synod bench suite` starts fresh 3-replica clusters on
# loopback (data on disk, default settings and durability: every
# acknowledged write is on a majority's disks), runs each row `--repeat`
# times (3 unless given) and prints a markdown table of medians, after a
# line describing the machine. Arguments go to `synod bench suite`
# (`--repeat`, `--duration-secs`, `--warmup-secs`, `--clients-max`,
# `--json`, ...). Run it on a quiet machine: it takes about 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet -p synod-server -p synod-shell
model=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
memory=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo 2>/dev/null || true)
echo "machine: $(nproc) cores (${model:-unknown CPU}), ${memory:-unknown memory}, $(uname -sr), data in ${TMPDIR:-/tmp}" >&2
exec target/release/synod bench suite "$@"
