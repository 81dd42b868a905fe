#!/usr/bin/env bash
# keycap fleet benchmark: one PostgreSQL database, two control-plane
# replicas, three proxies and the mock vendor on this machine, driven by
# tests/src/bin/fleet_bench.rs. Prints throughput on one key (capped vs
# priced $0), overspend near the cap, what a 10 s outage of every replica
# refuses, and revocation latency. BENCHMARKS.md ("Fleet") reads the output.
#
# Usage: bench/fleet.sh [fleet-bench flags, e.g. --seconds 10 --connections 64]
#        bench/fleet.sh --smoke   every step for a second or two on the debug
#                                 build: proves the bench still runs (the
#                                 test command does this); numbers mean nothing
# PostgreSQL: DATABASE_URL when set (its user must be allowed to CREATE
# DATABASE), else a throwaway cluster from the installed server binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
for arg in "$@"; do [ "$arg" = --smoke ] && profile=debug; done
# One invocation, so the planes and the bench share one feature set and
# the harness finds the binaries next to the bench.
if [ "$profile" = release ]; then
  cargo build --release -q -p keycap-control -p keycap-proxy -p keycap-tests --bins
else
  cargo build -q -p keycap-control -p keycap-proxy -p keycap-tests --bins
fi
exec "${CARGO_TARGET_DIR:-target}/$profile/fleet-bench" "$@"
