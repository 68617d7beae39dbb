#!/usr/bin/env bash
# End-to-end pgbench comparison: a direct connection to the leader, PgBouncer (transaction
# pooling), pgrelay with `consistency = "leader"` and pgrelay with its default routing.
#
# Usage: bench/pgbench.sh            (from anywhere; needs root or sudo-less apt for pgbouncer)
# Knobs (environment):
#   DURATION=15      seconds per pgbench run (-T)
#   ROUNDS=3         interleaved rounds; every round runs every target once, in rotated order
#   SCALE=10         pgbench -i scale
#   WORKLOADS="S-simple S-prepared N-simple N-prepared"   subset/order of workloads
#   TARGETS="direct pgbouncer pgrelay-leader pgrelay-session"  subset/order of targets
#   POOL_SIZE=20     pgbouncer default_pool_size
#   RESULTS_DIR=bench/results/<timestamp>   where raw CSV, logs and the summary go
#   NO_BUILD=1       skip `cargo build --release`
#   KEEP_WORKDIR=1   keep the temporary cluster/config directory after the run
#
# Proxy CPU per transaction is utime+stime of the proxy process (from /proc/PID/stat) over the
# run, divided by the transactions pgbench reports. Postgres' and pgbench's own CPU is not in it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION="${DURATION:-15}"
ROUNDS="${ROUNDS:-3}"
SCALE="${SCALE:-10}"
WORKLOADS="${WORKLOADS:-S-simple S-prepared N-simple N-prepared}"
TARGETS="${TARGETS:-direct pgbouncer pgrelay-leader pgrelay-session}"
POOL_SIZE="${POOL_SIZE:-20}"
RESULTS_DIR="${RESULTS_DIR:-$ROOT/bench/results/$(date +%Y%m%d-%H%M%S)}"
PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"
STARTUP_DEADLINE="${STARTUP_DEADLINE:-180}"
CLK_TCK="$(getconf CLK_TCK)"
PGRELAY="$ROOT/target/release/pgrelay"
PG_OS_USER="${PGRELAY_OS_USER:-postgres}"

export PATH="$PGBIN:$PATH"
export PGPASSWORD=app PGUSER=app PGDATABASE=app PGHOST=127.0.0.1 PGCONNECT_TIMEOUT=10

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

WORK=""
DEMO_PID=""
RELAY2_PID=""
BOUNCER_PID=""

# Sends SIGINT/SIGTERM to a pid and waits up to $2 seconds, then SIGKILL.
stop_pid() {
    local pid="$1" grace="$2" sig="${3:-TERM}"
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -"$sig" "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid did not stop in ${grace}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    log "cleaning up"
    stop_pid "$BOUNCER_PID" 10 INT
    stop_pid "$RELAY2_PID" 15 INT
    # The demo stops its Postgres servers itself on SIGINT.
    stop_pid "$DEMO_PID" 60 INT
    if [ -n "$WORK" ] && [ -d "$WORK/demo" ]; then
        # If the demo could not stop them (killed, crashed), stop left-over servers ourselves.
        local d
        for d in "$WORK"/demo/leader "$WORK"/demo/follower*; do
            [ -f "$d/postmaster.pid" ] || continue
            log "stopping left-over server in $d"
            runuser -u "$PG_OS_USER" -- "$PGBIN/pg_ctl" stop -D "$d" -m immediate -w -t 30 >/dev/null 2>&1 \
                || kill -KILL "$(head -1 "$d/postmaster.pid")" 2>/dev/null
        done
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        cp -f "$WORK"/*.log "$WORK"/pgbouncer/*.log "$RESULTS_DIR/logs/" 2>/dev/null
        if [ "${KEEP_WORKDIR:-0}" = 1 ]; then
            log "work directory kept: $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until something at 127.0.0.1:$1 answers as Postgres (any answer, even "no password").
wait_ready() {
    local port="$1" what="$2" pid="$3" deadline=$((SECONDS + 60))
    until pg_isready -q -h 127.0.0.1 -p "$port" -t 2; do
        kill -0 "$pid" 2>/dev/null || die "$what exited during startup"
        [ "$SECONDS" -lt "$deadline" ] || die "$what not ready on port $port after 60s"
        sleep 0.2
    done
}

# utime+stime of a process in clock ticks (fields 14 and 15; after the ")" of comm).
cpu_ticks() {
    local pid="$1"
    [ -n "$pid" ] || { echo 0; return; }
    local stat
    stat="$(cat "/proc/$pid/stat")" || die "process $pid is gone"
    stat="${stat##*) }"
    # Now field 1 is state (field 3 overall): utime is field 12, stime field 13.
    awk '{print $12 + $13}' <<<"$stat"
}

# CPU ticks used machine-wide and by this benchmark (this script, its children and every
# descendant, live or reaped), for "other CPU": what the machine spent on anything else during a run.
# Prints "<busy ticks machine-wide> <ticks of this benchmark>".
cpu_snapshot() {
    python3 - "$$" <<'PYSNAP'
import os, sys
root = int(sys.argv[1])
with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:]]
busy = sum(v) - v[3] - v[4]  # all but idle and iowait
procs = {}
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        with open(f"/proc/{d}/stat") as f:
            st = f.read()
    except OSError:
        continue
    rest = st[st.rfind(")") + 2:].split()
    # rest[0] is field 3 (state): ppid is field 4, utime..cstime fields 14..17.
    procs[int(d)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))
children = {}
for pid, (ppid, _) in procs.items():
    children.setdefault(ppid, []).append(pid)
ours, stack = 0, [root]
while stack:
    p = stack.pop()
    if p in procs:
        ours += procs[p][1]
    stack.extend(children.get(p, []))
print(busy, ours)
PYSNAP
}

# --- 1. build and tools ------------------------------------------------------------------------
mkdir -p "$RESULTS_DIR/logs"
if [ "${NO_BUILD:-0}" != 1 ]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release)
fi
[ -x "$PGRELAY" ] || die "$PGRELAY not found"
if ! command -v pgbouncer >/dev/null; then
    log "installing pgbouncer"
    apt-get install -y pgbouncer >/dev/null || { apt-get update >/dev/null && apt-get install -y pgbouncer >/dev/null; }
fi
command -v pgbench >/dev/null || die "pgbench not found (PGBIN=$PGBIN)"
id "$PG_OS_USER" >/dev/null 2>&1 || die "OS user $PG_OS_USER does not exist"

WORK="$(mktemp -d /tmp/pgrelay-bench.XXXXXX)"
chmod 755 "$WORK"
log "work directory $WORK, results in $RESULTS_DIR"

# --- 2. the demo cluster (leader, 2 standbys, pgrelay with default routing) ----------------------
PORT_SESSION="$(free_port)"
"$PGRELAY" demo --dir "$WORK/demo" --listen "127.0.0.1:$PORT_SESSION" --followers 2 --metrics-listen "" >"$WORK/demo.log" 2>&1 &
DEMO_PID=$!
deadline=$((SECONDS + STARTUP_DEADLINE))
until grep -q "press Ctrl-C" "$WORK/demo.log"; do
    if ! kill -0 "$DEMO_PID" 2>/dev/null; then
        tail -20 "$WORK/demo.log" >&2
        DEMO_PID=""
        die "pgrelay demo exited during startup"
    fi
    [ "$SECONDS" -lt "$deadline" ] || { tail -20 "$WORK/demo.log" >&2; die "pgrelay demo not ready after ${STARTUP_DEADLINE}s"; }
    sleep 0.5
done
CONF="$WORK/demo/pgrelay.toml"
# The leader's port: the `port =` line of the [[nodes]] block whose role is "leader".
LEADER_PORT="$(awk '/^\[\[nodes\]\]/{role=""} /^role *=/{gsub(/"/,"",$3); role=$3} /^port *=/{if(role=="leader"){print $3; exit}}' "$CONF")"
[[ "$LEADER_PORT" =~ ^[0-9]+$ ]] || die "cannot find the leader's port in $CONF"
# The cluster superuser (for VACUUM and CHECKPOINT between workloads).
SUPERUSER=relay_admin  # the demo's superuser (see src/demo.rs)
SUPERUSER_PASSWORD="$(awk -v u="$SUPERUSER" '/^\[\[users\]\]/{name=""} /^name *=/{gsub(/"/,"",$3); name=$3} /^password *=/{if(name==u){gsub(/"/,"",$3); print $3; exit}}' "$CONF")"
[ -n "$SUPERUSER_PASSWORD" ] || die "cannot find the password of $SUPERUSER in $CONF"
log "demo ready: leader 127.0.0.1:$LEADER_PORT, pgrelay (session routing) 127.0.0.1:$PORT_SESSION"

# --- 3. a second pgrelay that sends everything to the leader -------------------------------------
PORT_LEADER="$(free_port)"
# Only the [proxy] section's listen changes; the copy serves no metrics.
sed -e "/^\[proxy\]/,/^\[/ s|^listen = .*|listen = \"127.0.0.1:$PORT_LEADER\"|" \
    -e '/^\[metrics\]/,/^\[/ s|^listen = .*|listen = ""|' \
    -e 's|^consistency = .*|consistency = "leader"|' "$CONF" >"$WORK/pgrelay-leader.toml"
grep -q '^consistency = "leader"' "$WORK/pgrelay-leader.toml" || die "could not set consistency in the copied config"
RUST_LOG="${RUST_LOG:-warn}" "$PGRELAY" run --config "$WORK/pgrelay-leader.toml" >"$WORK/pgrelay-leader.log" 2>&1 &
RELAY2_PID=$!
wait_ready "$PORT_LEADER" "pgrelay (leader routing)" "$RELAY2_PID"
wait_ready "$PORT_SESSION" "pgrelay (session routing)" "$DEMO_PID"

# --- 4. pgbouncer in front of the leader ----------------------------------------------------------
PORT_BOUNCER="$(free_port)"
mkdir -p "$WORK/pgbouncer"
printf '"app" "app"\n' >"$WORK/pgbouncer/userlist.txt"
cat >"$WORK/pgbouncer/pgbouncer.ini" <<EOF
[databases]
app = host=127.0.0.1 port=$LEADER_PORT dbname=app

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT_BOUNCER
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/pgbouncer/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 200
logfile = $WORK/pgbouncer/pgbouncer.log
log_connections = 0
log_disconnections = 0
EOF
chown -R "$PG_OS_USER" "$WORK/pgbouncer"
chmod 600 "$WORK/pgbouncer/userlist.txt"
# -u: pgbouncer refuses to run as root; it switches user itself, so $! is pgbouncer's own pid.
if [ "$(id -u)" = 0 ]; then
    pgbouncer -u "$PG_OS_USER" "$WORK/pgbouncer/pgbouncer.ini" >"$WORK/pgbouncer/stderr.log" 2>&1 &
else
    pgbouncer "$WORK/pgbouncer/pgbouncer.ini" >"$WORK/pgbouncer/stderr.log" 2>&1 &
fi
BOUNCER_PID=$!
wait_ready "$PORT_BOUNCER" "pgbouncer" "$BOUNCER_PID"
[ "$(cat /proc/$BOUNCER_PID/comm)" = pgbouncer ] || die "pid $BOUNCER_PID is not pgbouncer"
log "pgbouncer on 127.0.0.1:$PORT_BOUNCER (pid $BOUNCER_PID), pgrelay leader routing on 127.0.0.1:$PORT_LEADER (pid $RELAY2_PID)"

# --- 5. the data ----------------------------------------------------------------------------------
log "pgbench -i -s $SCALE on the leader"
pgbench -i -s "$SCALE" -p "$LEADER_PORT" >"$WORK/pgbench-init.log" 2>&1 || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }

# --- 6. the runs ----------------------------------------------------------------------------------
target_port() {
    case "$1" in
    direct) echo "$LEADER_PORT" ;;
    pgbouncer) echo "$PORT_BOUNCER" ;;
    pgrelay-leader) echo "$PORT_LEADER" ;;
    pgrelay-session) echo "$PORT_SESSION" ;;
    *) die "unknown target $1" ;;
    esac
}
target_pid() {
    case "$1" in
    direct) echo "" ;;
    pgbouncer) echo "$BOUNCER_PID" ;;
    pgrelay-leader) echo "$RELAY2_PID" ;;
    pgrelay-session) echo "$DEMO_PID" ;;
    esac
}
workload_args() {
    case "$1" in
    S-simple) echo "-S -M simple -c 16 -j 2" ;;
    S-prepared) echo "-S -M prepared -c 16 -j 2" ;;
    N-simple) echo "-N -M simple -c 8 -j 2" ;;
    N-prepared) echo "-N -M prepared -c 8 -j 2" ;;
    *) die "unknown workload $1" ;;
    esac
}
pick() { # pick FIELD-REGEX SED-EXPR FILE -> first match or empty
    grep -m1 -E "$1" "$3" | sed -E "$2" || true
}

CSV="$RESULTS_DIR/raw.csv"
echo "workload,args,target,round,position,exit_code,status,tps,latency_ms,transactions,failed_transactions,aborted_clients,proxy_cpu_ticks,proxy_cpu_us_per_txn,loadavg1_before,other_cpu_pct,started_at" >"$CSV"
{
    echo "date: $(date -Is)"
    echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
    echo "duration=$DURATION rounds=$ROUNDS scale=$SCALE pool_size=$POOL_SIZE clk_tck=$CLK_TCK"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    echo "kernel: $(uname -r)"
    echo "postgres: $(postgres --version)"
    echo "pgbouncer: $(pgbouncer --version | head -1)"
    echo "pgbench: $(pgbench --version)"
    echo "uptime at start: $(uptime)"
} >"$RESULTS_DIR/env.txt"

read -r -a TARGET_LIST <<<"$TARGETS"
NT=${#TARGET_LIST[@]}
for workload in $WORKLOADS; do
    args="$(workload_args "$workload")"
    # pgbench would vacuum before every run (and not through every proxy alike): vacuum once, directly.
    log "== $workload ($args): vacuum on the leader"
    PGUSER="$SUPERUSER" PGPASSWORD="$SUPERUSER_PASSWORD" psql -q -X -v ON_ERROR_STOP=1 -p "$LEADER_PORT" \
        -c "TRUNCATE pgbench_history" \
        -c "VACUUM ANALYZE pgbench_branches, pgbench_tellers, pgbench_accounts, pgbench_history" \
        -c "CHECKPOINT" >/dev/null || die "vacuum before $workload failed"
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((i = 0; i < NT; i++)); do
            # Rotate the order each round so no target always runs first or last.
            target="${TARGET_LIST[$(((i + round - 1) % NT))]}"
            port="$(target_port "$target")"
            pid="$(target_pid "$target")"
            out="$RESULTS_DIR/logs/$workload-$target-r$round.log"
            load1="$(cut -d' ' -f1 /proc/loadavg)"
            started="$(date -Is)"
            read -r busy0 ours0 < <(cpu_snapshot)
            before="$(cpu_ticks "$pid")"
            rc=0
            # shellcheck disable=SC2086
            timeout --kill-after=10 $((DURATION + 60)) \
                pgbench -n $args -T "$DURATION" -p "$port" >"$out" 2>&1 || rc=$?
            after="$(cpu_ticks "$pid")"
            read -r busy1 ours1 < <(cpu_snapshot)
            # Share of the machine's CPU capacity (all cores, over the run) used by other work.
            other="$(awk -v b=$((busy1 - busy0)) -v o=$((ours1 - ours0)) -v n="$(nproc)" -v hz="$CLK_TCK" -v d="$DURATION" \
                'BEGIN{x = (b - o) * 100 / (n * hz * d); if (x < 0) x = 0; printf "%.1f", x}')"
            tps="$(pick '^tps = ' 's/^tps = ([0-9.]+).*/\1/' "$out")"
            lat="$(pick '^latency average = ' 's/^latency average = ([0-9.]+) ms.*/\1/' "$out")"
            txns="$(pick '^number of transactions actually processed: ' 's/^[^:]*: ([0-9]+).*/\1/' "$out")"
            failed="$(pick '^number of failed transactions: ' 's/^[^:]*: ([0-9]+).*/\1/' "$out")"
            aborted="$(grep -c 'aborted in command' "$out" || true)"
            ticks=$((after - before))
            us_per_txn=""
            if [ -n "$pid" ] && [ -n "$txns" ] && [ "$txns" -gt 0 ]; then
                us_per_txn="$(awk -v t="$ticks" -v hz="$CLK_TCK" -v n="$txns" 'BEGIN{printf "%.2f", t * 1e6 / hz / n}')"
            fi
            status=ok
            if [ "$rc" != 0 ] || [ "${aborted:-0}" -gt 0 ] || [ -z "$tps" ]; then
                status=failed
            elif [ "${failed:-0}" -gt 0 ]; then
                status=failed-txns
            fi
            echo "$workload,\"$args\",$target,$round,$i,$rc,$status,${tps},${lat},${txns},${failed},${aborted},$([ -n "$pid" ] && echo "$ticks"),${us_per_txn},$load1,$other,$started" >>"$CSV"
            log "$workload r$round $target: status=$status tps=${tps:-?} lat=${lat:-?}ms txns=${txns:-?} failed=${failed:-?} aborted_clients=$aborted proxy_cpu=${us_per_txn:--}us/txn load=$load1 other_cpu=${other}%"
        done
    done
done
echo "uptime at end: $(uptime)" >>"$RESULTS_DIR/env.txt"

# --- 7. summary: medians over rounds, ratios to direct --------------------------------------------
python3 - "$CSV" "$WORKLOADS" "$TARGETS" >"$RESULTS_DIR/summary.md" <<'PY'
import csv, statistics, sys
path, workloads, targets = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
rows = list(csv.DictReader(open(path)))
def med(vals):
    vals = [float(v) for v in vals if v not in ("", None)]
    return statistics.median(vals) if vals else None
def fmt(v, spec):
    return "-" if v is None else format(v, spec)
print("| workload | target | TPS (median) | x direct | avg latency ms | proxy CPU us/txn | failed txns | runs ok | TPS per round | other CPU % (max) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
for w in workloads:
    ws = [r for r in rows if r["workload"] == w]
    direct = med(r["tps"] for r in ws if r["target"] == "direct" and r["status"] == "ok")
    for t in targets:
        rs = sorted((r for r in ws if r["target"] == t), key=lambda r: int(r["round"]))
        if not rs:
            continue
        ok = [r for r in rs if r["status"] == "ok"]
        tps = med(r["tps"] for r in ok)
        ratio = tps / direct if (tps is not None and direct) else None
        lat = med(r["latency_ms"] for r in ok)
        cpu = med(r["proxy_cpu_us_per_txn"] for r in ok)
        failed = sum(int(r["failed_transactions"] or 0) for r in rs)
        aborted = sum(int(r["aborted_clients"] or 0) for r in rs)
        fail_note = str(failed) + (f" ({aborted} clients aborted)" if aborted else "")
        per_round = " / ".join(r["tps"] if r["status"] == "ok" else f"FAILED({r['tps'] or '-'})" for r in rs)
        status = f"{len(ok)}/{len(rs)}"
        others = [float(r["other_cpu_pct"]) for r in rs if r.get("other_cpu_pct")]
        other = fmt(max(others) if others else None, ".0f")
        if not ok:
            print(f"| {w} | {t} | FAILED | - | - | - | {fail_note} | {status} | {per_round} | {other} |")
        else:
            print(f"| {w} | {t} | {fmt(tps, '.0f')} | {fmt(ratio, '.2f')} | {fmt(lat, '.3f')} | {fmt(cpu, '.1f')} | {fail_note} | {status} | {per_round} | {other} |")
PY
cat "$RESULTS_DIR/summary.md"
log "raw results: $CSV; summary: $RESULTS_DIR/summary.md"
