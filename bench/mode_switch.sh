#!/usr/bin/env bash
# The live mode switch under a write load: `pgrelay demo --mode statement` with 2 followers,
# `pgbench -N` through pgrelay, and during the load a switch to row mode (the config file edited,
# then SIGHUP) and back to statement mode (the console's RELOAD). Reports how long transactions
# waited for each switch (pgrelay_mode_switch_pause_seconds and the NOTICE of RELOAD), pgbench's
# per-second throughput around the switches, and whether leader and followers hold the same
# pgbench rows afterwards.
#
# Usage: bench/mode_switch.sh            (about 2 minutes with the defaults on 2 cores)
# Knobs (environment):
#   SCALE=5              pgbench -i scale (through pgrelay)
#   DURATION=60          seconds of `pgbench -N`; the switches happen at 1/3 and 2/3 of it
#   CLIENTS=4 THREADS=2  pgbench -c / -j
#   BUILD=1              run `cargo build --release` even if target/release/pgrelay exists
#   RESULTS_DIR=bench/results-<date>-switch   raw output and summary.md
#   KEEP_WORKDIR=1       keep the demo directory after the run
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCALE="${SCALE:-5}"
DURATION="${DURATION:-60}"
CLIENTS="${CLIENTS:-4}"
THREADS="${THREADS:-2}"
PGRELAY="$ROOT/target/release/pgrelay"
if [ -z "${RESULTS_DIR:-}" ]; then
    RESULTS_DIR="$ROOT/bench/results-$(date +%F)-switch"
    [ ! -e "$RESULTS_DIR" ] || RESULTS_DIR="$RESULTS_DIR-$(date +%H%M%S)"
fi
PGBIN="${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)}"
export PATH="$PGBIN:$PATH" PGCONNECT_TIMEOUT=10

. "$ROOT/bench/lib.sh"
die() { log "error: $*"; exit 1; }

WORK=""
DEMO_PID=""
BENCH_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [ -z "$BENCH_PID" ] || kill "$BENCH_PID" 2>/dev/null
    if [ -n "$DEMO_PID" ] && kill -0 "$DEMO_PID" 2>/dev/null; then
        # Ctrl-C: the demo stops pgrelay and its servers.
        kill -INT "$DEMO_PID"
        for _ in $(seq 1 300); do kill -0 "$DEMO_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DEMO_PID" 2>/dev/null
    fi
    if [ -n "$WORK" ]; then
        cp -f "$WORK/demo.log" "$RESULTS_DIR/" 2>/dev/null
        if [ "${KEEP_WORKDIR:-0}" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ ! -x "$PGRELAY" ] || [ "${BUILD:-0}" = 1 ]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release)
fi
if [ -n "$(cd "$ROOT" && find src Cargo.toml Cargo.lock -newer "$PGRELAY" 2>/dev/null | head -1)" ]; then
    log "warning: $PGRELAY is older than the sources; BUILD=1 rebuilds it"
fi
mkdir -p "$RESULTS_DIR"
WORK="$(mktemp -d /tmp/pgrelay-switchbench.XXXXXX)"
chmod 755 "$WORK"
PORT="$(free_port)"
MPORT="$(free_port)"
CONFIG="$WORK/demo/pgrelay.toml"

log "starting pgrelay demo --mode statement (work directory $WORK)"
"$PGRELAY" demo --mode statement --dir "$WORK/demo" --listen "127.0.0.1:$PORT" \
    --metrics-listen "127.0.0.1:$MPORT" >"$WORK/demo.log" 2>&1 &
DEMO_PID=$!
for _ in $(seq 1 1800); do
    grep -q "press Ctrl-C" "$WORK/demo.log" 2>/dev/null && break
    kill -0 "$DEMO_PID" 2>/dev/null || die "the demo stopped: $(tail -5 "$WORK/demo.log")"
    sleep 0.1
done
grep -q "press Ctrl-C" "$WORK/demo.log" || die "the demo did not start in 180 s"

ADMIN_PASSWORD="$(awk '/name = "relay_admin"/ {f=1} f && /password =/ {gsub(/.*= "|"$/, ""); print; exit}' "$CONFIG")"
console() { PGPASSWORD="$ADMIN_PASSWORD" psql -X -At -h 127.0.0.1 -p "$PORT" -U relay_admin -d pgrelay -c "$1"; }
mode() { console "SHOW MODE" | awk -F'|' '$1 == "mode" {print $2}'; }
# Node ports from the config the demo wrote, leader first.
mapfile -t NODE_PORTS < <(awk '/^port = / {print $3}' "$CONFIG")
direct() { PGPASSWORD="$ADMIN_PASSWORD" psql -X -At -h 127.0.0.1 -p "$1" -U relay_admin -d app -c "$2"; }
metric() {
    curl -s "http://127.0.0.1:$MPORT/metrics" | awk -v m="$1" '$1 == m {print $2}'
}

export PGHOST=127.0.0.1 PGPORT="$PORT" PGUSER=app PGPASSWORD=app PGDATABASE=app
log "pgbench -i -s $SCALE through pgrelay"
pgbench -i -q -s "$SCALE" >"$RESULTS_DIR/pgbench-init.log" 2>&1

log "pgbench -N -c $CLIENTS -T $DURATION through pgrelay; switches at $((DURATION / 3)) s and $((2 * DURATION / 3)) s"
pgbench -n -N -c "$CLIENTS" -j "$THREADS" -T "$DURATION" -P 1 >"$RESULTS_DIR/pgbench.log" 2>&1 &
BENCH_PID=$!
START=$(date +%s)
sleep $((DURATION / 3))
sed -i 's/^mode = "statement"/mode = "row"/' "$CONFIG"
T1=$(($(date +%s) - START))
kill -HUP "$DEMO_PID"
for _ in $(seq 1 600); do [ "$(mode)" = row ] && break; sleep 0.1; done
[ "$(mode)" = row ] || die "the switch to row mode did not happen: $(grep -i switch "$WORK/demo.log" | tail -3)"
log "switched to row mode (SIGHUP at ${T1} s)"
sleep $((START + 2 * DURATION / 3 - $(date +%s)))
sed -i 's/^mode = "row"/mode = "statement"/' "$CONFIG"
T2=$(($(date +%s) - START))
RELOAD_NOTICE="$(console RELOAD 2>&1 >/dev/null | tr '\n' ' ')"
[ "$(mode)" = statement ] || die "the switch back to statement mode did not happen: $RELOAD_NOTICE"
log "switched back to statement mode (RELOAD at ${T2} s): $RELOAD_NOTICE"
wait "$BENCH_PID"
BENCH_PID=""

PAUSE_SUM="$(metric pgrelay_mode_switch_pause_seconds_sum)"
PAUSE_COUNT="$(metric pgrelay_mode_switch_pause_seconds_count)"
DONE="$(metric 'pgrelay_mode_switches_total{result="done"}')"

# The followers converge to the leader's pgbench rows (counts and sums), within 60 s.
CHECK="SELECT (SELECT count(*) FROM pgbench_history) || '/' || (SELECT coalesce(sum(delta), 0) FROM pgbench_history) || '/' || (SELECT sum(abalance) FROM pgbench_accounts) || '/' || (SELECT sum(bbalance) FROM pgbench_branches)"
LEADER_STATE="$(direct "${NODE_PORTS[0]}" "$CHECK")"
CONVERGED=yes
for p in "${NODE_PORTS[@]:1}"; do
    ok=no
    for _ in $(seq 1 600); do
        [ "$(direct "$p" "$CHECK")" = "$LEADER_STATE" ] && { ok=yes; break; }
        sleep 0.1
    done
    [ "$ok" = yes ] || CONVERGED="no (follower on port $p: $(direct "$p" "$CHECK"), leader: $LEADER_STATE)"
done

# pgbench's progress lines: "progress: 12.0 s, 345.6 tps, ...".
PROGRESS="$(awk '/^progress:/ {printf "%s:%s ", int($2), $4}' "$RESULTS_DIR/pgbench.log")"
TPS="$(awk '/^tps = / {print $3; exit}' "$RESULTS_DIR/pgbench.log")"
FAILED="$(awk '/number of failed transactions/ {print $5; exit}' "$RESULTS_DIR/pgbench.log")"
{
    echo "# Live mode switch under pgbench -N ($(date -Is))"
    echo
    echo "- machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- pgbench -N -c $CLIENTS -j $THREADS -T $DURATION, scale $SCALE, through pgrelay demo (statement mode, 2 followers)"
    echo "- statement -> row by SIGHUP at ${T1} s; row -> statement by RELOAD at ${T2} s"
    echo "- RELOAD said: $RELOAD_NOTICE"
    echo "- switches done: $DONE; transactions waited $PAUSE_SUM s in total over $PAUSE_COUNT switches"
    echo "- pgbench: $TPS tps overall, failed transactions: ${FAILED:-0}"
    echo "- followers equal to the leader afterwards (history rows/sum, account and branch balances): $CONVERGED"
    echo "- per-second tps (second:tps): $PROGRESS"
} | tee "$RESULTS_DIR/summary.md"
[ "$CONVERGED" = yes ] || exit 1
