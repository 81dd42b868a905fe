#!/usr/bin/env bash
# keycap proxy benchmark: the same load three ways on loopback.
#
#   direct  - straight at a fast upstream (nginx returning a fixed
#             Stripe-like JSON body)
#   nginx   - through nginx proxy_pass with an Authorization header swap:
#             a mature proxy with no policy at all
#   floor   - through a bare hyper proxy (data-plane/examples/bare_proxy.rs):
#             keycap's serving stack with an Authorization swap and nothing
#             else, the most any proxy on this stack reaches here
#   keycap  - through keycap-proxy's full path: vault-key auth, allowlist,
#             Stripe-priced reservation against a daily cap, forward with the
#             real key injected, settle, audit event to the control plane
#
# Each target gets a closed-loop run (max throughput: requests/s, p50, p99)
# and an open-loop run at a fixed rate (default 5000 requests/s) to compare
# added latency. Prints a table and the ratios to direct.
#
# Then, unless BENCH_TRACING=0, keycap's closed-loop run again with its
# traces off (no OTEL_* variables), sampled at 1% and at 100%
# (parentbased_traceidratio), exported over OTLP/gRPC to a local collector
# that counts spans (keycap-otlp-sink, from tests/src/otlp.rs), and at 100%
# to a collector that is down (a port nothing listens on), each mode run
# BENCH_TRACING_ROUNDS times (default 3) in turn, the proxy restarted for
# each run.
#
# Usage: bench/run.sh [seconds per run, default 10] [connections, default 64]
# Env:   BENCH_RATE (fixed-rate run, default 5000), BENCH_PORT_BASE (19000)
#        BENCH_SMOKE=1: one second per run, four connections, the debug
#        build: proves the bench still starts and every target answers (the
#        test command does this); the numbers mean nothing. Without oha it
#        sends a few requests to each target with curl instead of a load.
#
# Installs what it needs: nginx (Debian package) and oha (crates.io; not
# in smoke mode).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=${BENCH_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  DURATION=1; CONNS=4; RATE=${BENCH_RATE:-200}; BASE=${BENCH_PORT_BASE:-$((20000 + RANDOM % 20000))}
else
  DURATION=${1:-10}; CONNS=${2:-64}; RATE=${BENCH_RATE:-5000}; BASE=${BENCH_PORT_BASE:-19000}
fi
TRACING=${BENCH_TRACING:-$([ "$SMOKE" = 1 ] && echo 0 || echo 1)}
ROUNDS=${BENCH_TRACING_ROUNDS:-3}
UPSTREAM=$((BASE + 1)); NGINX_PROXY=$((BASE + 2)); KC_PROXY=$((BASE + 3)); KC_CONTROL=$((BASE + 4))
FLOOR=$((BASE + 5)); OTLP=$((BASE + 6)); KC_METRICS=$((BASE + 9))

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
LOAD=oha
if ! command -v oha >/dev/null 2>&1; then
  if [ "$SMOKE" = 1 ]; then LOAD=curl; else cargo install --locked oha; fi
fi

if [ "$SMOKE" = 1 ]; then
  cargo build -q -p keycap-control -p keycap-proxy -p keycap --bins --example bare_proxy
  BIN=${CARGO_TARGET_DIR:-target}/debug
else
  cargo build --release -q -p keycap-control -p keycap-proxy -p keycap --bins --example bare_proxy
  BIN=${CARGO_TARGET_DIR:-target}/release
fi
if [ "$TRACING" = 1 ]; then
  # The collector only counts: a debug build does, and stays off the
  # release build's critical path.
  cargo build -q -p keycap-tests --bin keycap-otlp-sink
  SINK=${CARGO_TARGET_DIR:-target}/debug/keycap-otlp-sink
fi

WORK=$(mktemp -d /tmp/keycap-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

BODY='{"id":"pi_bench","object":"payment_intent","amount":100,"currency":"usd","status":"requires_payment_method","livemode":false}'
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/body;
  proxy_temp_path $WORK/proxy;
  fastcgi_temp_path $WORK/fcgi;
  uwsgi_temp_path $WORK/uwsgi;
  scgi_temp_path $WORK/scgi;
  keepalive_requests 1000000;
  upstream vendor { server 127.0.0.1:$UPSTREAM; keepalive 256; }
  # The fast upstream: a fixed Stripe-like answer.
  server {
    listen 127.0.0.1:$UPSTREAM;
    location / { default_type application/json; return 200 '$BODY'; }
  }
  # The bar: a plain reverse proxy that swaps the Authorization header.
  server {
    listen 127.0.0.1:$NGINX_PROXY;
    location /stripe/ {
      proxy_pass http://vendor/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer sk_test_bench";
    }
  }
}
CONF
"$NGINX" -c "$WORK/nginx.conf" -p "$WORK"

# keycap's secrets carry a checksum: the CLI makes a well-formed one.
ADMIN=$("$BIN/keycap" admin-token generate --env bench)
FLEET=kcfleet_bench_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
MASTER=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
KEYCAP_LOG=warn "$BIN/keycap-control" --listen 127.0.0.1:$KC_CONTROL --allow-private-upstreams \
  --database-url "sqlite:$WORK/keycap.db" --master-key "$MASTER" \
  --admin-token "$ADMIN" --fleet-token "$FLEET" > "$WORK/control.log" 2>&1 &
PIDS+=($!)
start_proxy() { # env assignments for the proxy...
  env "$@" KEYCAP_LOG=warn "$BIN/keycap-proxy" --listen 127.0.0.1:$KC_PROXY \
    --control-url http://127.0.0.1:$KC_CONTROL --fleet-token "$FLEET" --node-id bench --metrics-listen 127.0.0.1:$KC_METRICS >> "$WORK/proxy.log" 2>&1 &
  PROXY_PID=$!
  PIDS+=($PROXY_PID)
}
start_proxy
"$BIN/examples/bare_proxy" 127.0.0.1:$FLOOR http://127.0.0.1:$UPSTREAM > "$WORK/floor.log" 2>&1 &
PIDS+=($!)

wait_ok() { for _ in $(seq 1 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not ready: $1" >&2; exit 1; }
wait_ok http://127.0.0.1:$KC_CONTROL/healthz
wait_ok http://127.0.0.1:$KC_PROXY/healthz
wait_ok http://127.0.0.1:$FLOOR/stripe/healthz

auth=(-H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json')
curl -fs -X PUT "http://127.0.0.1:$KC_CONTROL/vault/vendors/stripe" "${auth[@]}" \
  -d "{\"profile\":\"stripe\",\"base_url\":\"http://127.0.0.1:$UPSTREAM\",\"credential\":\"sk_test_bench\"}" >/dev/null
KEY=$(curl -fs -X POST "http://127.0.0.1:$KC_CONTROL/vault/keys" "${auth[@]}" \
  -d '{"vendor":"stripe","daily_usd_cap":100000000,"allowed_endpoints":["POST /v1/payment_intents"],"expires_in":"2h","agent_run_label":"bench"}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
# The key works on its first call: its creation waited for the proxy.
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$KC_PROXY/stripe/v1/payment_intents" \
  -H "Authorization: Bearer $KEY" -d amount=100 -d currency=usd -d confirm=true)
[ "$code" = 200 ] || { echo "keycap proxy refused the bench key's first call ($code)" >&2; exit 1; }

run() { # name url extra-oha-args...
  local name=$1 url=$2; shift 2
  oha --no-tui --output-format json -z "${DURATION}s" -m POST \
    -H "Authorization: Bearer $KEY" -H 'Content-Type: application/x-www-form-urlencoded' \
    -d 'amount=100&currency=usd&confirm=true' "$@" "$url" > "$WORK/$name.json"
}

targets=(
  "direct http://127.0.0.1:$UPSTREAM/v1/payment_intents"
  "nginx http://127.0.0.1:$NGINX_PROXY/stripe/v1/payment_intents"
  "floor http://127.0.0.1:$FLOOR/stripe/v1/payment_intents"
  "keycap http://127.0.0.1:$KC_PROXY/stripe/v1/payment_intents"
)
if [ "$LOAD" = curl ]; then
  # Smoke run without a load generator: every target answers the bench's
  # request with 200, which is what the load runs measure.
  for t in "${targets[@]}"; do
    set -- $t
    for _ in 1 2 3 4 5; do
      code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$2" -H "Authorization: Bearer $KEY" \
        -H 'Content-Type: application/x-www-form-urlencoded' -d 'amount=100&currency=usd&confirm=true')
      [ "$code" = 200 ] || { echo "bench smoke: $1 answered $code" >&2; exit 1; }
    done
  done
  echo "bench smoke (oha not installed, no load): direct, nginx, floor and keycap each answered 5 of 5"
  exit 0
fi
for t in "${targets[@]}"; do
  set -- $t
  run "$1-max" "$2" -c "$CONNS"
  run "$1-rate" "$2" -c "$CONNS" -q "$RATE"
done

TRACE_MODES=()
if [ "$TRACING" = 1 ]; then
  "$SINK" 127.0.0.1:$OTLP > "$WORK/otlp.log" 2>&1 &
  PIDS+=($!)
  # A slow collector: accepts every export and answers each after 5 s.
  "$SINK" 127.0.0.1:$((BASE + 8)) --delay-ms 5000 > "$WORK/otlp-slow.log" 2>&1 &
  PIDS+=($!)
  sleep 0.5
  traced() { # mode: the proxy's OTEL_* environment for it
    case $1 in
      off) ;;
      1pct) echo OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$OTLP OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01 ;;
      100pct) echo OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$OTLP OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=1.0 ;;
      # Every span for a collector that is not there: nothing listens on
      # the port, so each export fails and its spans are dropped.
      dead) echo OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$((BASE + 7)) OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=1.0 ;;
      # Every span for a collector that answers each export after 5 s: the
      # export queue fills and the overflow is dropped and counted.
      slow) echo OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$((BASE + 8)) OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=1.0 ;;
    esac
  }
  for round in $(seq 1 "$ROUNDS"); do
    for mode in off 1pct 100pct dead slow; do
      kill "$PROXY_PID"; wait "$PROXY_PID" 2>/dev/null || true
      # shellcheck disable=SC2046
      start_proxy $(traced $mode)
      wait_ok http://127.0.0.1:$KC_PROXY/healthz
      # Warm: the first call draws the lease, as in the runs above.
      curl -s -o /dev/null "http://127.0.0.1:$KC_PROXY/stripe/v1/payment_intents" \
        -H "Authorization: Bearer $KEY" -d amount=100 -d currency=usd -d confirm=true
      sink_log=$WORK/otlp.log; [ "$mode" = slow ] && sink_log=$WORK/otlp-slow.log
      before=$(sed -n 's/^spans //p' "$sink_log" | tail -1); before=${before:-0}
      run "trace-$mode-$round" "http://127.0.0.1:$KC_PROXY/stripe/v1/payment_intents" -c "$CONNS"
      sleep 2  # the last batch of spans leaves within a second
      after=$(sed -n 's/^spans //p' "$sink_log" | tail -1); after=${after:-0}
      echo $((after - before)) > "$WORK/trace-$mode-$round.spans"
      # Spans the proxy dropped (queue full or export failed), from its own metric.
      curl -fs "http://127.0.0.1:$KC_METRICS/metrics" \
        | sed -n 's/^keycap_proxy_trace_spans_dropped_total //p' > "$WORK/trace-$mode-$round.dropped"
    done
  done
  TRACE_MODES=(off 1pct 100pct dead slow)
fi

python3 - "$WORK" "$DURATION" "$CONNS" "$RATE" "$ROUNDS" ${TRACE_MODES[@]+"${TRACE_MODES[@]}"} <<'PY'
import json, sys, os
work, duration, conns, rate, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
trace_modes = sys.argv[6:]
def load(n):
    d = json.load(open(os.path.join(work, n + ".json")))
    s = d["summary"]; p = d["latencyPercentiles"]
    codes = d.get("statusCodeDistribution", {})
    ok = codes.get("200", 0); total = sum(codes.values())
    return {"rps": s["requestsPerSec"], "p50": p["p50"] * 1e3, "p99": p["p99"] * 1e3, "ok": ok, "total": total}
rows = {n: (load(n + "-max"), load(n + "-rate")) for n in ("direct", "nginx", "floor", "keycap")}
for n, (m, r) in rows.items():
    if m["ok"] == 0 or r["ok"] == 0:
        sys.exit(f"bench: {n} answered no request with 200")
print(f"keycap bench: {duration}s per run, {conns} connections, fixed-rate runs at {rate} req/s, nproc={os.cpu_count()}")
print(f"{'target':8} {'max req/s':>10} {'ratio':>6} {'p50 ms':>8} {'p99 ms':>8} | {'@rate req/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'+p99 ms':>8} | non-200")
d_max, d_rate = rows["direct"]
for n, (m, r) in rows.items():
    bad = (m["total"] - m["ok"]) + (r["total"] - r["ok"])
    print(f"{n:8} {m['rps']:10.0f} {m['rps']/d_max['rps']:6.2f} {m['p50']:8.3f} {m['p99']:8.3f} | "
          f"{r['rps']:11.0f} {r['p50']:8.3f} {r['p99']:8.3f} {r['p99']-d_rate['p99']:8.3f} | {bad}")
n_ratio = rows["nginx"][0]["rps"] / d_max["rps"]
k_ratio = rows["keycap"][0]["rps"] / d_max["rps"]
f_ratio = rows["floor"][0]["rps"] / d_max["rps"]
print(f"keycap throughput ratio / nginx throughput ratio = {k_ratio / n_ratio:.2f} (goal >= 1.2)")
print(f"bare hyper floor ratio / nginx throughput ratio  = {f_ratio / n_ratio:.2f}; keycap reaches {k_ratio / f_ratio:.2f} of the floor")
print(f"added p99 at {rate} req/s: nginx {rows['nginx'][1]['p99'] - d_rate['p99']:.3f} ms, keycap {rows['keycap'][1]['p99'] - d_rate['p99']:.3f} ms (goal: keycap <= nginx)")
if trace_modes:
    print(f"keycap with tracing, closed loop, {conns} connections, {duration}s per run, {rounds} rounds (off, 1%, 100%, 100% to a dead collector, 100% to a collector answering after 5 s, in turn):")
    print(f"{'tracing':8} {'req/s per run':>30} {'mean':>8} {'vs off':>7} {'p99 ms':>8} {'spans/call':>10} {'dropped/call':>12} {'non-200':>8}")
    means = {}
    for mode in trace_modes:
        runs = [load(f"trace-{mode}-{r}") for r in range(1, rounds + 1)]
        spans = [int(open(os.path.join(work, f"trace-{mode}-{r}.spans")).read() or 0) for r in range(1, rounds + 1)]
        dropped = [float(open(os.path.join(work, f"trace-{mode}-{r}.dropped")).read().strip() or 0) for r in range(1, rounds + 1)]
        for r in runs:
            if r["ok"] == 0:
                sys.exit(f"bench: keycap with tracing {mode} answered no request with 200")
        mean = sum(r["rps"] for r in runs) / len(runs)
        means[mode] = mean
        calls = sum(r["total"] for r in runs)
        per_call = sum(spans) / calls if calls else 0
        p99 = sum(r["p99"] for r in runs) / len(runs)
        bad = sum(r["total"] - r["ok"] for r in runs)
        dropped_per_call = sum(dropped) / calls if calls else 0
        print(f"{mode:8} {' '.join('%.0f' % r['rps'] for r in runs):>30} {mean:8.0f} "
              f"{mean / means['off'] - 1:+7.1%} {p99:8.3f} {per_call:10.3f} {dropped_per_call:12.3f} {bad:8}")
    spread = [load(f"trace-off-{r}")["rps"] for r in range(1, rounds + 1)]
    print(f"tracing off: spread of its runs {(max(spread) - min(spread)) / means['off']:.1%} of their mean; "
          f"1%: {means['1pct'] / means['off'] - 1:+.1%} (goal >= -3%); 100%: {means['100pct'] / means['off'] - 1:+.1%}; "
          f"100% to a dead collector: {means['dead'] / means['off'] - 1:+.1%}; "
          f"100% to a slow collector: {means['slow'] / means['off'] - 1:+.1%}")
PY
