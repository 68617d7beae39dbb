#!/usr/bin/env bash
# Read-your-writes cost: a write-then-read pgbench script through pgrelay with
# `consistency = "session"` (reads go to a follower that has the write) versus "leader";
# the share of reads followers served; and pgbench -S with "eventual" versus "leader" routing.
#
# Usage: bench/ryw.sh
# Knobs: DURATION=15 ROUNDS=3 SCALE=10 CLIENTS=8 NO_BUILD=1 RESULTS_DIR=...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION="${DURATION:-15}"
ROUNDS="${ROUNDS:-3}"
SCALE="${SCALE:-10}"
CLIENTS="${CLIENTS:-8}"
RESULTS_DIR="${RESULTS_DIR:-$ROOT/bench/results/ryw-$(date +%Y%m%d-%H%M%S)}"
PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"
PGRELAY="$ROOT/target/release/pgrelay"
export PATH="$PGBIN:$PATH"
export PGPASSWORD=app PGUSER=app PGDATABASE=app PGHOST=127.0.0.1 PGCONNECT_TIMEOUT=10

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK="$(mktemp -d /tmp/pgrelay-ryw.XXXXXX)"
chmod 755 "$WORK"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ -n "${NO_BUILD:-}" ] || (cd "$ROOT" && cargo build --release -q)
mkdir -p "$RESULTS_DIR"

PORT_SESSION="$(free_port)"; PORT_LEADER="$(free_port)"; PORT_EVENTUAL="$(free_port)"; PORT_METRICS="$(free_port)"
"$PGRELAY" demo --dir "$WORK/demo" --listen "127.0.0.1:$PORT_SESSION" --metrics-listen "127.0.0.1:$PORT_METRICS" >"$WORK/demo.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 360); do grep -q "press Ctrl-C" "$WORK/demo.log" && break; sleep 0.5; done
grep -q "press Ctrl-C" "$WORK/demo.log" || die "demo did not start: $(tail -5 "$WORK/demo.log")"
CONF="$WORK/demo/pgrelay.toml"
LEADER_PORT="$(awk '/^\[\[nodes\]\]/{role=""} /^role *=/{gsub(/"/,"",$3); role=$3} /^port *=/{if(role=="leader"){print $3; exit}}' "$CONF")"
for level in leader eventual; do
    port=$PORT_LEADER; [ "$level" = eventual ] && port=$PORT_EVENTUAL
    sed -e "/^\[proxy\]/,/^\[/ s|^listen = .*|listen = \"127.0.0.1:$port\"|" \
        -e '/^\[metrics\]/,/^\[/ s|^listen = .*|listen = ""|' \
        -e "s|^consistency = .*|consistency = \"$level\"|" "$CONF" >"$WORK/$level.toml"
    RUST_LOG=warn "$PGRELAY" run --config "$WORK/$level.toml" >"$WORK/$level.log" 2>&1 &
    PIDS+=($!)
done
for port in $PORT_LEADER $PORT_EVENTUAL; do
    for _ in $(seq 1 100); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.1; done
done
log "initialising pgbench tables (scale $SCALE) on the leader"
pgbench -p "$LEADER_PORT" -i -q -s "$SCALE" >/dev/null 2>&1
cat >"$WORK/ryw.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL

reads_by_node() {  # "follower_reads total_reads" from the demo proxy's metrics
    curl -s "http://127.0.0.1:$PORT_METRICS/metrics" | awk '
        /^pgrelay_reads_total\{/ { total += $2; if ($1 ~ /node="follower/) f += $2 }
        END { printf "%d %d\n", f, total }'
}

CSV="$RESULTS_DIR/ryw.csv"
echo "round,workload,target,tps,avg_latency_ms,update_ms,select_ms,follower_read_share" >"$CSV"
for round in $(seq 1 "$ROUNDS"); do
    for target in session leader; do
        port=$PORT_SESSION; [ "$target" = leader ] && port=$PORT_LEADER
        before="$(reads_by_node)"
        out="$(pgbench -p "$port" -n -r -M prepared -f "$WORK/ryw.sql" -c "$CLIENTS" -j 2 -T "$DURATION" 2>&1)"
        after="$(reads_by_node)"
        tps="$(grep -m1 '^tps' <<<"$out" | awk '{print $3}')"
        lat="$(grep -m1 '^latency average' <<<"$out" | awk '{print $4}')"
        upd="$(grep -m1 'UPDATE pgbench_accounts' <<<"$out" | awk '{print $1}')"
        sel="$(grep -m1 'SELECT abalance' <<<"$out" | awk '{print $1}')"
        share="-"
        if [ "$target" = session ]; then
            share="$(awk -v b="$before" -v a="$after" 'BEGIN { split(b, x, " "); split(a, y, " "); d = y[2] - x[2]; if (d > 0) printf "%.3f", (y[1] - x[1]) / d; else print "-" }')"
        fi
        echo "$round,write-then-read,$target,$tps,$lat,$upd,$sel,$share" >>"$CSV"
        log "round $round write-then-read $target: $tps tps, update $upd ms, select $sel ms, follower share $share"
    done
    for target in eventual leader; do
        port=$PORT_EVENTUAL; [ "$target" = leader ] && port=$PORT_LEADER
        out="$(pgbench -p "$port" -n -S -M simple -c 16 -j 2 -T "$DURATION" 2>&1)"
        tps="$(grep -m1 '^tps' <<<"$out" | awk '{print $3}')"
        lat="$(grep -m1 '^latency average' <<<"$out" | awk '{print $4}')"
        echo "$round,select-only,$target,$tps,$lat,,," >>"$CSV"
        log "round $round select-only $target: $tps tps"
    done
done
log "results in $CSV"
python3 - "$CSV" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
groups = {}
for r in rows:
    groups.setdefault((r["workload"], r["target"]), []).append(r)
print("| workload | target | TPS | avg latency ms | UPDATE ms | SELECT ms | reads on followers |")
print("|---|---|---:|---:|---:|---:|---:|")
for (w, t), rs in groups.items():
    med = lambda k: statistics.median(float(r[k]) for r in rs) if all(r[k] not in ("", "-") for r in rs) else None
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)
    print(f"| {w} | {t} | {fmt(med('tps'), '{:.0f}')} | {fmt(med('avg_latency_ms'))} | {fmt(med('update_ms'))} | {fmt(med('select_ms'))} | {fmt(med('follower_read_share'), '{:.0%}')} |")
PY
