#!/usr/bin/env bash
# keycap fleet ingest benchmark: one control-plane replica on PostgreSQL and
# N simulated proxies sending ReportSpend batches over gRPC, driven by
# tests/src/bin/ingest_bench.rs. Prints events per second and CPU per event
# for the replica and for PostgreSQL. BENCHMARKS.md ("Fleet ingest") reads
# the output.
#
# Usage: bench/ingest.sh [ingest-bench flags, e.g. --proxies 32 --batch 500 --seconds 10]
#        bench/ingest.sh --smoke   a second on the debug build: proves the
#                                  bench still runs (the test command does
#                                  this); numbers mean nothing
# PostgreSQL: DATABASE_URL when set (its user must be allowed to CREATE
# DATABASE), else a throwaway cluster from the installed server binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
for arg in "$@"; do [ "$arg" = --smoke ] && profile=debug; done
if [ "$profile" = release ]; then
  cargo build --release -q -p keycap-control -p keycap-tests --bins
else
  cargo build -q -p keycap-control -p keycap-tests --bins
fi
exec "${CARGO_TARGET_DIR:-target}/$profile/ingest-bench" "$@"
