#!/usr/bin/env bash
# Row mode apply: pgrelay (`[replication] mode = "row"`) side by side with PostgreSQL's native
# logical replication (CREATE SUBSCRIPTION): same leader, same pgbench load, same machine.
#
# Usage: bench/row_apply.sh        (a few minutes with the defaults; as root, Postgres runs as OS
#                                   user postgres, else as the user running the script)
#        SCALE=1 DURATION=5 BACKLOG=5 bench/row_apply.sh     (a quick check that it works, ~40 s)
# Knobs (environment):
#   SCALE=10             pgbench -i scale
#   DURATION=30          seconds of `pgbench -N` while the lag is sampled
#   BACKLOG=20           seconds of `pgbench -N` written while replication is stopped
#   CLIENTS=8 THREADS=2  pgbench -c / -j
#   METHODS="pgrelay native"   which methods run, in this order
#   HEARTBEAT_MS=100     how often the leader's heartbeat row is updated during the lag run
#   POLL_MS=5            how often the follower's heartbeat row is read (the lag's resolution)
#   CATCHUP_POLL_MS=10   how often the follower is checked while it catches up a backlog
#   FSYNC=off            fsync and full_page_writes of all three servers (off, like `pgrelay demo`)
#   NATIVE_SYNC_COMMIT=on   the subscription's synchronous_commit; native's own default is off,
#                        but pgrelay's applier commits with the follower's setting (on), so on is fair
#   BUILD=1              run `cargo build --release` even if target/release/pgrelay exists
#   PGBIN=DIR            Postgres binaries (default: the newest /usr/lib/postgresql/*/bin)
#   RESULTS_DIR=bench/results-<date>-row   raw results and summary.md
#   KEEP_WORKDIR=1       keep the servers' directory after the run
#
# Methods run one after the other, never together, so neither applier competes with the other
# for the CPU. Before each: no slot on the leader, `TRUNCATE pgbench_history; VACUUM ANALYZE;
# CHECKPOINT` there, and a fresh follower server (identical settings) that the method fills itself.
# Per method:
#   bootstrap  time until the follower holds a consistent copy (pgrelay: schema dump + COPY;
#              native: `pg_dump -s | psql`, then CREATE SUBSCRIPTION ... copy_data = true).
#   lag        during `pgbench -N` on the leader, a loop on the leader sets heartbeat.ts =
#              clock_timestamp() every HEARTBEAT_MS, and a loop on the follower reads
#              (clock_timestamp(), ts) every POLL_MS. Lag of a heartbeat = first follower time at
#              which it is visible - its ts (an upper bound, within POLL_MS + one query).
#              "staleness" is the plain follower clock_timestamp() - replicated ts of each read; it
#              also counts the age of the heartbeat on the leader (0..HEARTBEAT_MS), so it reads
#              ~HEARTBEAT_MS/2 even with no lag. Both loops run server side (DO blocks), so no
#              process is spawned per sample and both clocks are the one system clock.
#   backlog    replication stopped (pgrelay: the process exits on SIGINT; native: ALTER
#              SUBSCRIPTION DISABLE), until the slot is inactive; `pgbench -N` for BACKLOG s; one
#              marker heartbeat as the last transaction; replication resumed; catch-up = until the
#              follower shows the marker (a 1-row read polled server side: a count(*) of
#              pgbench_history would cost the applier CPU and grow with every run). It includes
#              restarting the applier (pgrelay: process start, connections, START_REPLICATION;
#              native: the launcher starting the apply worker). Apply rate =
#              backlog / catch-up; each -N transaction writes 2 rows (UPDATE pgbench_accounts,
#              INSERT pgbench_history), the marker 1.
#   verify     row counts of every table, sum(abalance), sum(delta) and the heartbeat equal on
#              leader and follower; a mismatch fails the run (exit 1) after the other methods ran.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCALE="${SCALE:-10}"
DURATION="${DURATION:-30}"
BACKLOG="${BACKLOG:-20}"
CLIENTS="${CLIENTS:-8}"
THREADS="${THREADS:-2}"
METHODS="${METHODS:-pgrelay native}"
HEARTBEAT_MS="${HEARTBEAT_MS:-100}"
POLL_MS="${POLL_MS:-5}"
CATCHUP_POLL_MS="${CATCHUP_POLL_MS:-10}"
FSYNC="${FSYNC:-off}"
NATIVE_SYNC_COMMIT="${NATIVE_SYNC_COMMIT:-on}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-600}"   # seconds any bootstrap or catch-up may take before we give up
PG_OS_USER="${PGRELAY_OS_USER:-postgres}"
PGRELAY="$ROOT/target/release/pgrelay"
DB=bench
SUPERUSER=postgres
SUPERUSER_PASSWORD="$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"

if [ -z "${RESULTS_DIR:-}" ]; then
    RESULTS_DIR="$ROOT/bench/results-$(date +%F)-row"
    # Never mix two runs' raw files.
    [ ! -e "$RESULTS_DIR" ] || RESULTS_DIR="$RESULTS_DIR-$(date +%H%M%S)"
fi
if [ -z "${PGBIN:-}" ]; then
    # The newest installed major version, as pgrelay itself picks it.
    PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
    [ -n "$PGBIN" ] || PGBIN="$(pg_config --bindir 2>/dev/null || true)"
fi

export PATH="$PGBIN:$PATH" PGRELAY_PG_BIN="$PGBIN"
export PGHOST=127.0.0.1 PGUSER="$SUPERUSER" PGPASSWORD="$SUPERUSER_PASSWORD" PGDATABASE="$DB" PGCONNECT_TIMEOUT=10

. "$ROOT/bench/lib.sh"
die() { log "error: $*"; exit 1; }

WORK=""
PGRELAY_PID=""
BG_PIDS=()
SERVERS=()

cleanup() {
    local rc=$? p d
    trap - EXIT INT TERM
    set +e
    log "cleaning up"
    stop_pid "$PGRELAY_PID" 30 INT
    for p in "${BG_PIDS[@]}"; do stop_pid "$p" 5 TERM; done
    for d in "${SERVERS[@]}"; do stop_server "$d"; done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        mkdir -p "$RESULTS_DIR/logs"
        cp -f "$WORK"/logs/*.log "$RESULTS_DIR/logs/" 2>/dev/null
        if [ "${KEEP_WORKDIR:-0}" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. pgrelay, Postgres binaries, work directory ------------------------------------------------
for m in $METHODS; do
    case "$m" in pgrelay | native) ;; *) die "unknown method $m in METHODS (pgrelay, native)" ;; esac
done
if [ ! -x "$PGRELAY" ] || [ "${BUILD:-0}" = 1 ]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release)
fi
[ -x "$PGRELAY" ] || die "$PGRELAY not found"
if [ -n "$(cd "$ROOT" && find src Cargo.toml Cargo.lock -newer "$PGRELAY" 2>/dev/null | head -1)" ]; then
    log "warning: $PGRELAY is older than the sources; BUILD=1 rebuilds it"
fi
for tool in initdb pg_ctl postgres psql pgbench pg_dump; do
    [ -x "$PGBIN/$tool" ] || die "$tool not found in PGBIN=$PGBIN"
done
if [ "$(id -u)" = 0 ]; then
    id "$PG_OS_USER" >/dev/null 2>&1 || die "OS user $PG_OS_USER (to run Postgres as) does not exist"
fi
command -v curl >/dev/null || die "curl not found (reads pgrelay's metrics)"

mkdir -p "$RESULTS_DIR"
WORK="$(mktemp -d /tmp/pgrelay-rowbench.XXXXXX)"
chmod 755 "$WORK"
mkdir -p "$WORK/logs"
# The servers write their logs here, so it belongs to the user they run as.
[ "$(id -u)" != 0 ] || chown "$PG_OS_USER" "$WORK/logs"
log "work directory $WORK, results in $RESULTS_DIR"

# --- 2. three identical servers: the leader and one follower per method ----------------------------
# The settings of pgrelay's own test clusters (src/cluster/node.rs). Everything else (shared_buffers,
# wal settings, autovacuum, max_sync_workers_per_subscription = 2 like bootstrap_workers = 2) keeps
# Postgres' defaults, on every server alike.
server_settings() {
    cat <<EOF
listen_addresses = '127.0.0.1'
port = $1
unix_socket_directories = ''
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
fsync = $FSYNC
full_page_writes = $FSYNC
synchronous_commit = on
logging_collector = off
EOF
}

# init_server NAME PORT: initdb with a SCRAM password for TCP (the only way in), then start.
init_server() {
    local name="$1" port="$2" dir="$WORK/$1"
    mkdir -m 700 "$dir"
    printf '%s\n' "$SUPERUSER_PASSWORD" >"$WORK/pwfile"
    if [ "$(id -u)" = 0 ]; then chown "$PG_OS_USER" "$dir" "$WORK/pwfile"; fi
    chmod 600 "$WORK/pwfile"
    # cd: initdb complains when it cannot return to a working directory its user cannot read.
    (cd "$WORK" && as_pg initdb -D "$dir" -U "$SUPERUSER" --pwfile="$WORK/pwfile" -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 --no-sync) >"$WORK/logs/initdb-$name.log" 2>&1 ||
        { cat "$WORK/logs/initdb-$name.log" >&2; die "initdb $name failed"; }
    rm -f "$WORK/pwfile"
    server_settings "$port" >>"$dir/postgresql.conf"
    printf '%s\n' "local all all trust" "host all all 127.0.0.1/32 scram-sha-256" \
        "host replication all 127.0.0.1/32 scram-sha-256" >"$dir/pg_hba.conf"
    SERVERS+=("$dir")
    (cd "$WORK" && as_pg pg_ctl start -D "$dir" -l "$WORK/logs/$name.log" -w -t 120 -s) ||
        { tail -20 "$WORK/logs/$name.log" >&2; die "server $name did not start"; }
}

LEADER_PORT="$(free_port)"
init_server leader "$LEADER_PORT"
log "leader on 127.0.0.1:$LEADER_PORT"

# --- 3. the data: all schema before any replication starts (DDL behind pgrelay's back stops it) ----
q "$LEADER_PORT" postgres "CREATE DATABASE $DB" >/dev/null
log "pgbench -i -s $SCALE on the leader"
pgbench -i -q -s "$SCALE" -p "$LEADER_PORT" "$DB" >"$WORK/logs/pgbench-init.log" 2>&1 ||
    { cat "$WORK/logs/pgbench-init.log" >&2; die "pgbench -i failed"; }
q "$LEADER_PORT" "$DB" "CREATE TABLE heartbeat (id int PRIMARY KEY, ts timestamptz);
    INSERT INTO heartbeat VALUES (1, clock_timestamp())" >/dev/null

PG_VERSION="$(q "$LEADER_PORT" "$DB" "SHOW server_version")"
SHARED_BUFFERS="$(q "$LEADER_PORT" "$DB" "SHOW shared_buffers")"
MACHINE_CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
MACHINE_RAM="$(awk '/^MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' (src dirty)')"
{
    echo "date: $(date -Is)"
    echo "commit: $COMMIT"
    echo "pgrelay binary: $(date -r "$PGRELAY" -Is)"
    echo "scale=$SCALE duration=$DURATION backlog=$BACKLOG clients=$CLIENTS threads=$THREADS methods=$METHODS"
    echo "heartbeat_ms=$HEARTBEAT_MS poll_ms=$POLL_MS catchup_poll_ms=$CATCHUP_POLL_MS"
    echo "fsync=$FSYNC native_sync_commit=$NATIVE_SYNC_COMMIT shared_buffers=$SHARED_BUFFERS"
    echo "cpu: $MACHINE_CPU, $(nproc) cores; ram: $MACHINE_RAM"
    echo "kernel: $(uname -r)"
    echo "postgres: $(postgres --version)"
    echo "pgbench: $(pgbench --version)"
    echo "uptime at start: $(uptime)"
} >"$RESULTS_DIR/env.txt"

# --- helpers for the runs --------------------------------------------------------------------------

# wait_sql_do PORT DB CONDITION POLL_MS: a DO block that loops server side until CONDITION (a SQL
# boolean, run with EXECUTE so tables it names may appear only later) is true. It says
# "NOTICE:  ready <epoch>" once connected and "NOTICE:  done <epoch>" when the condition held.
# COMMIT per round: no snapshot is held while the follower applies.
wait_sql_do() {
    local port="$1" db="$2" cond="$3" poll_ms="$4"
    psql -X -q -At -v ON_ERROR_STOP=1 -p "$port" -d "$db" -c "
DO \$wait\$
DECLARE
    ok boolean;
    deadline timestamptz := clock_timestamp() + interval '$WAIT_TIMEOUT seconds';
BEGIN
    RAISE NOTICE 'ready %', extract(epoch FROM clock_timestamp());
    LOOP
        BEGIN
            EXECUTE \$cond\$SELECT coalesce(($cond), false)\$cond\$ INTO ok;
        EXCEPTION WHEN undefined_table THEN
            ok := false;
        END;
        IF ok THEN
            RAISE NOTICE 'done %', extract(epoch FROM clock_timestamp());
            RETURN;
        END IF;
        IF clock_timestamp() > deadline THEN
            RAISE EXCEPTION 'timed out after $WAIT_TIMEOUT s waiting for: %', \$cond\$$cond\$cond\$;
        END IF;
        COMMIT;
        PERFORM pg_sleep($poll_ms / 1000.0);
    END LOOP;
END
\$wait\$"
}

# The epoch a wait_sql_do output file says "done" at.
done_at() { sed -n 's/^NOTICE:  done //p' "$1" | tail -1; }

# Called before reaping a background pid: cleanup must never signal a pid that may have been reused.
forget_pid() {
    local keep=() p
    for p in "${BG_PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    BG_PIDS=("${keep[@]}")
}

# await_waiter PID OUT WHAT: waits for a background wait_sql_do; gives up at once if pgrelay (when
# running) exits meanwhile, rather than after WAIT_TIMEOUT.
await_waiter() {
    local pid="$1" out="$2" what="$3"
    while kill -0 "$pid" 2>/dev/null; do
        if [ -n "$PGRELAY_PID" ] && ! kill -0 "$PGRELAY_PID" 2>/dev/null; then
            tail -20 "$WORK/logs/pgrelay.log" >&2
            die "pgrelay exited while waiting for $what"
        fi
        sleep 0.1
    done
    forget_pid "$pid"
    wait "$pid" || { cat "$out" >&2; die "waiting for $what failed"; }
}

# wait_for PORT DB CONDITION: blocks until CONDITION holds on that server; sets WAIT_DONE to the
# epoch it did (a global, not output: this must not run in a subshell, which could not die).
WAIT_DONE=""
wait_for() {
    local out="$WORK/wait.out"
    wait_sql_do "$1" "$2" "$3" 50 2>"$out" >/dev/null &
    local pid=$!
    BG_PIDS+=("$pid")
    await_waiter "$pid" "$out" "$3 (port $1)"
    WAIT_DONE="$(done_at "$out")"
}

# Marks the leader's current end with a heartbeat (the leader must be quiet: nothing may commit
# after it) and prints its ts as an epoch.
write_marker() {
    q "$LEADER_PORT" "$DB" "UPDATE heartbeat SET ts = clock_timestamp() WHERE id = 1 RETURNING extract(epoch FROM ts)" | head -1
}

# Equality, not >=: a heartbeat of 'infinity' (the lag sampler's end mark) must not pass.
marker_cond() { echo "(SELECT extract(epoch FROM ts) FROM heartbeat WHERE id = 1) = $1"; }

# Blocks until the follower on port $1 has applied everything the (quiet) leader committed.
wait_caught_up() {
    local marker
    marker="$(write_marker)"
    wait_for "$1" "$DB" "$(marker_cond "$marker")"
}

# Prints "<tps> <transactions>" from a pgbench log.
pgbench_numbers() {
    local tps txns
    tps="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$1" | head -1)"
    txns="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$1" | head -1)"
    [ -n "$tps" ] && [ -n "$txns" ] || { cat "$1" >&2; die "pgbench failed (log: $1)"; }
    echo "$tps $txns"
}

run_pgbench() { # run_pgbench SECONDS LOGFILE: the -N load, straight to the leader, no vacuum (-n)
    # -n matters: without it pgbench TRUNCATEs pgbench_history, which both methods would replicate.
    timeout --kill-after=10 $(($1 + 120)) \
        pgbench -n -N -c "$CLIENTS" -j "$THREADS" -T "$1" -p "$LEADER_PORT" "$DB" >"$2" 2>&1 &
    local pid=$! rc=0
    BG_PIDS+=("$pid")
    # In the background with `wait`, so that Ctrl-C or TERM stops the run at once, not after pgbench.
    wait "$pid" || rc=$?
    forget_pid "$pid"
    [ "$rc" = 0 ] || { cat "$2" >&2; die "pgbench failed (log: $2)"; }
}

# Every table's row count, sum(abalance), sum(delta) and the heartbeat, as one line.
CHECKSUM_SQL="SELECT concat_ws(' ',
    (SELECT count(*) FROM pgbench_accounts), (SELECT sum(abalance) FROM pgbench_accounts),
    (SELECT count(*) FROM pgbench_branches), (SELECT count(*) FROM pgbench_tellers),
    (SELECT count(*) FROM pgbench_history), (SELECT coalesce(sum(delta), 0) FROM pgbench_history),
    (SELECT count(*) FROM heartbeat), (SELECT extract(epoch FROM ts) FROM heartbeat WHERE id = 1))"

slot_active() { # slot_active SLOT -> t / f / (empty: no such slot)
    q "$LEADER_PORT" "$DB" "SELECT active FROM pg_replication_slots WHERE slot_name = '$1'"
}

wait_slot_inactive() {
    local slot="$1" deadline=$((SECONDS + 60))
    while [ "$(slot_active "$slot")" = t ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "slot $slot still active after 60s"
        sleep 0.1
    done
}

metric_sum() { # metric_sum PORT NAME [LABEL-REGEX]: sum of a metric's samples
    curl -sf "http://127.0.0.1:$1/metrics" | awk -v n="$2" -v l="${3:-}" '
        index($1, n "{") == 1 || $1 == n { if (l == "" || $1 ~ l) s += $2 } END { printf "%d\n", s }'
}

# --- method: pgrelay row mode ----------------------------------------------------------------------
FOLLOWER_PORT=""
METRICS_PORT=""
PGRELAY_CONF=""

pgrelay_start() {
    NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$PGRELAY" run --config "$PGRELAY_CONF" >>"$WORK/logs/pgrelay.log" 2>&1 &
    PGRELAY_PID=$!
}

pgrelay_stop() {
    # SIGINT: pgrelay flushes its applied position before it exits.
    stop_pid "$PGRELAY_PID" 30 INT
    PGRELAY_PID=""
    wait_slot_inactive "pgrelay_follower1_$DB"
}

setup_pgrelay() {
    local proxy_port
    proxy_port="$(free_port)"
    METRICS_PORT="$(free_port)"
    PGRELAY_CONF="$WORK/pgrelay.toml"
    cat >"$PGRELAY_CONF" <<EOF
# Written by bench/row_apply.sh. The proxy listens but serves no client: the load goes to the leader.
[proxy]
listen = "127.0.0.1:$proxy_port"

[replication]
mode = "row"
user = "$SUPERUSER"
databases = ["$DB"]

[[nodes]]
name = "leader"
role = "leader"
host = "127.0.0.1"
port = $LEADER_PORT

[[nodes]]
name = "follower1"
role = "follower"
host = "127.0.0.1"
port = $FOLLOWER_PORT

[[users]]
name = "$SUPERUSER"
password = "$SUPERUSER_PASSWORD"

[metrics]
listen = "127.0.0.1:$METRICS_PORT"
EOF
    chmod 600 "$PGRELAY_CONF"
    "$PGRELAY" check-config --config "$PGRELAY_CONF" >"$WORK/logs/pgrelay-check-config.log" 2>&1 ||
        { cat "$WORK/logs/pgrelay-check-config.log" >&2; die "pgrelay rejects the config"; }
    pgrelay_start
    # pgrelay creates the database on the follower, then copies schema and rows; the copy is
    # complete once pgrelay.applied holds the slot's position.
    wait_for "$FOLLOWER_PORT" postgres "EXISTS (SELECT FROM pg_database WHERE datname = '$DB')"
    wait_for "$FOLLOWER_PORT" "$DB" "EXISTS (SELECT FROM pgrelay.applied WHERE position IS NOT NULL)"
}
pause_pgrelay() { pgrelay_stop; }
resume_pgrelay() { pgrelay_start; }
teardown_pgrelay() {
    curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" >"$PHASE_DIR/pgrelay-metrics.txt" || true
    pgrelay_stop
    # So the next method starts on a leader with no slot and no publication of ours.
    q "$LEADER_PORT" "$DB" "SELECT pg_drop_replication_slot('pgrelay_follower1_$DB')" >/dev/null
    q "$LEADER_PORT" "$DB" "DROP PUBLICATION IF EXISTS pgrelay" >/dev/null
}
# Cross-check: what pgrelay says it applied since it was resumed (a fresh process).
applied_by_pgrelay() {
    echo "pgrelay metrics after catch-up: transactions=$(metric_sum "$METRICS_PORT" pgrelay_apply_transactions_total)" \
        "inserts=$(metric_sum "$METRICS_PORT" pgrelay_apply_rows_total 'op="insert"')" \
        "updates=$(metric_sum "$METRICS_PORT" pgrelay_apply_rows_total 'op="update"')"
}

# --- method: native logical replication ------------------------------------------------------------
setup_native() {
    q "$FOLLOWER_PORT" postgres "CREATE DATABASE $DB" >/dev/null
    # Native replication copies no schema: do what its docs say, the schema first.
    pg_dump -s --no-publications --no-subscriptions -p "$LEADER_PORT" "$DB" |
        psql -X -q -v ON_ERROR_STOP=1 -p "$FOLLOWER_PORT" -d "$DB" >/dev/null ||
        die "copying the schema to the native follower failed"
    q "$LEADER_PORT" "$DB" "CREATE PUBLICATION native FOR ALL TABLES" >/dev/null
    # client_min_messages: no "created replication slot" NOTICE in the output.
    PGOPTIONS="-c client_min_messages=warning" q "$FOLLOWER_PORT" "$DB" "CREATE SUBSCRIPTION native
        CONNECTION 'host=127.0.0.1 port=$LEADER_PORT dbname=$DB user=$SUPERUSER password=$SUPERUSER_PASSWORD'
        PUBLICATION native WITH (copy_data = true, synchronous_commit = '$NATIVE_SYNC_COMMIT')" >/dev/null
    # Every table's initial copy is done once all of them are 'r' (ready).
    wait_for "$FOLLOWER_PORT" "$DB" "EXISTS (SELECT FROM pg_subscription_rel)
        AND NOT EXISTS (SELECT FROM pg_subscription_rel WHERE srsubstate <> 'r')"
}
pause_native() {
    q "$FOLLOWER_PORT" "$DB" "ALTER SUBSCRIPTION native DISABLE" >/dev/null
    # DISABLE returns before the apply worker has gone; the load must not start before it has.
    wait_for "$FOLLOWER_PORT" "$DB" "NOT EXISTS (SELECT FROM pg_stat_subscription WHERE subname = 'native' AND pid IS NOT NULL)"
    wait_slot_inactive native
}
resume_native() { q "$FOLLOWER_PORT" "$DB" "ALTER SUBSCRIPTION native ENABLE" >/dev/null; }
teardown_native() {
    # Drops the slot on the leader too.
    PGOPTIONS="-c client_min_messages=warning" q "$FOLLOWER_PORT" "$DB" "DROP SUBSCRIPTION native" >/dev/null
    q "$LEADER_PORT" "$DB" "DROP PUBLICATION native" >/dev/null
}
applied_by_native() { echo "native: no applier counters"; }

# --- the lag sampler ---------------------------------------------------------------------------------
# Writer, on the leader until epoch $1: heartbeat every HEARTBEAT_MS, each one's ts as "hb <epoch>";
# at the end ts = 'infinity', which tells the reader to stop once the follower has everything.
lag_writer() {
    psql -X -q -At -v ON_ERROR_STOP=1 -p "$LEADER_PORT" -d "$DB" -c "
DO \$hb\$
DECLARE t numeric;
BEGIN
    WHILE clock_timestamp() < to_timestamp($1) LOOP
        UPDATE heartbeat SET ts = clock_timestamp() WHERE id = 1 RETURNING extract(epoch FROM ts) INTO t;
        COMMIT;
        RAISE NOTICE 'hb %', t;
        PERFORM pg_sleep($HEARTBEAT_MS / 1000.0);
    END LOOP;
    UPDATE heartbeat SET ts = 'infinity' WHERE id = 1;
END
\$hb\$"
}

# Reader, on the follower: "s <follower clock epoch> <replicated ts epoch>" every POLL_MS until it
# sees 'infinity' (or WAIT_TIMEOUT after epoch $1: the follower is stuck, which the analysis reports).
lag_reader() {
    psql -X -q -At -v ON_ERROR_STOP=1 -p "$FOLLOWER_PORT" -d "$DB" -c "
DO \$rd\$
DECLARE
    at numeric;
    seen numeric;
    finished boolean;
BEGIN
    LOOP
        SELECT extract(epoch FROM clock_timestamp()), ts = 'infinity',
               CASE WHEN ts = 'infinity' THEN NULL ELSE extract(epoch FROM ts) END
            INTO at, finished, seen FROM heartbeat WHERE id = 1;
        EXIT WHEN finished;
        RAISE NOTICE 's % %', at, seen;
        EXIT WHEN clock_timestamp() > to_timestamp($1) + interval '$WAIT_TIMEOUT seconds';
        COMMIT;
        PERFORM pg_sleep($POLL_MS / 1000.0);
    END LOOP;
END
\$rd\$"
}

# analyse_lag WRITER_OUT READER_OUT FROM TO CSV -> "lag_p50 lag_p99 lag_max stale_p50 stale_p99 stale_max n_hb n_samples" (ms)
analyse_lag() {
    python3 - "$@" <<'PY'
import math, sys
writer, reader, t_from, t_to, csv_path = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
hbs = [float(l.split()[2]) for l in open(writer) if l.startswith("NOTICE:  hb ")]
samples = [tuple(float(x) for x in l.split()[2:4]) for l in open(reader) if l.startswith("NOTICE:  s ")]
# Only heartbeats written while pgbench ran.
hbs = [t for t in hbs if t_from <= t <= t_to]
if not hbs or not samples:
    sys.exit(f"no heartbeats ({len(hbs)}) or follower samples ({len(samples)}) to analyse")
lags, j = [], 0
with open(csv_path, "w") as out:
    out.write("heartbeat_epoch,seen_at_epoch,lag_ms\n")
    for t in sorted(hbs):
        # The first read on the follower that shows this heartbeat or a later one.
        while j < len(samples) and samples[j][1] < t:
            j += 1
        if j == len(samples):
            sys.exit(f"the follower never showed the heartbeat of {t:.6f}")
        lag = (samples[j][0] - t) * 1000
        lags.append(lag)
        out.write(f"{t:.6f},{samples[j][0]:.6f},{lag:.3f}\n")
stale = [(a - s) * 1000 for a, s in samples if t_from <= a <= t_to]
def pct(v, p):
    v = sorted(v)
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)]
print(" ".join(f"{x:.1f}" for x in (pct(lags, 50), pct(lags, 99), max(lags),
                                     pct(stale, 50), pct(stale, 99), max(stale))), len(lags), len(stale))
PY
}

# --- one method, start to end --------------------------------------------------------------------------
CSV="$RESULTS_DIR/results.csv"
echo "method,bootstrap_s,load_tps,load_txns,lag_p50_ms,lag_p99_ms,lag_max_ms,staleness_p50_ms,staleness_p99_ms,staleness_max_ms,heartbeats,follower_reads,backlog_tps,backlog_txns,backlog_rows,catchup_s,apply_txns_per_s,apply_rows_per_s,verified" >"$CSV"
FAILED=()

run_method() {
    local m="$1" n
    PHASE_DIR="$RESULTS_DIR/$m"
    mkdir -p "$PHASE_DIR"
    log "== $m"

    # Same starting point for every method: no slot, the same tables, fresh statistics.
    n="$(q "$LEADER_PORT" "$DB" "SELECT count(*) FROM pg_replication_slots")"
    [ "$n" = 0 ] || die "the leader still has $n replication slot(s)"
    q "$LEADER_PORT" "$DB" "TRUNCATE pgbench_history" >/dev/null
    q "$LEADER_PORT" "$DB" "VACUUM ANALYZE" >/dev/null
    q "$LEADER_PORT" "$DB" "CHECKPOINT" >/dev/null

    FOLLOWER_PORT="$(free_port)"
    init_server "follower-$m" "$FOLLOWER_PORT"
    log "$m: follower on 127.0.0.1:$FOLLOWER_PORT; bootstrap"

    # 1. bootstrap
    local t0 t1 boot
    t0="$(now)"
    "setup_$m"   # returns once the copy is complete, at WAIT_DONE
    boot="$(awk -v a="$t0" -v b="$WAIT_DONE" 'BEGIN { printf "%.1f", b - a }')"
    wait_caught_up "$FOLLOWER_PORT"
    # The copies have no statistics or visibility map yet; vacuum now rather than let autovacuum
    # start in the middle of a measurement.
    q "$FOLLOWER_PORT" "$DB" "VACUUM ANALYZE" >/dev/null
    q "$FOLLOWER_PORT" "$DB" "CHECKPOINT" >/dev/null
    log "$m: bootstrap ${boot}s"

    # 2. lag under load
    local end wpid rpid p0 p1 tps txns stats
    wait_caught_up "$FOLLOWER_PORT"
    end="$(awk -v t="$(now)" -v d="$DURATION" 'BEGIN { printf "%.3f", t + d }')"
    lag_reader "$end" >/dev/null 2>"$PHASE_DIR/lag-reader.out" &
    rpid=$!
    lag_writer "$end" >/dev/null 2>"$PHASE_DIR/lag-writer.out" &
    wpid=$!
    BG_PIDS+=("$rpid" "$wpid")
    log "$m: pgbench -N -c $CLIENTS -j $THREADS -T $DURATION with the heartbeat sampler"
    p0="$(now)"
    run_pgbench "$DURATION" "$PHASE_DIR/pgbench-load.log"
    p1="$(now)"
    await_waiter "$wpid" "$PHASE_DIR/lag-writer.out" "the heartbeat writer"
    await_waiter "$rpid" "$PHASE_DIR/lag-reader.out" "the heartbeat reader (the follower applying the load)"
    stats="$(pgbench_numbers "$PHASE_DIR/pgbench-load.log")"
    read -r tps txns <<<"$stats"
    stats="$(analyse_lag "$PHASE_DIR/lag-writer.out" "$PHASE_DIR/lag-reader.out" "$p0" "$p1" "$PHASE_DIR/lag.csv")" ||
        die "$m: lag analysis failed"
    local lp50 lp99 lmax sp50 sp99 smax nhb nsamp
    read -r lp50 lp99 lmax sp50 sp99 smax nhb nsamp <<<"$stats"
    log "$m: leader $tps tps; lag p50 ${lp50} p99 ${lp99} max ${lmax} ms ($nhb heartbeats); staleness p50 ${sp50} ms"

    # 3. backlog
    local h0 h1 btps btxns marker waiter catch
    wait_caught_up "$FOLLOWER_PORT"
    "pause_$m"
    h0="$(q "$LEADER_PORT" "$DB" "SELECT count(*) FROM pgbench_history")"
    log "$m: replication stopped; pgbench -N -T $BACKLOG"
    run_pgbench "$BACKLOG" "$PHASE_DIR/pgbench-backlog.log"
    stats="$(pgbench_numbers "$PHASE_DIR/pgbench-backlog.log")"
    read -r btps btxns <<<"$stats"
    marker="$(write_marker)"
    h1="$(q "$LEADER_PORT" "$DB" "SELECT count(*) FROM pgbench_history")"
    local backlog_txns=$((h1 - h0 + 1)) backlog_rows=$((2 * (h1 - h0) + 1))
    # The waiter is connected and polling before replication resumes, so the catch-up time has
    # no connection setup in it; its start is the moment just before the resume.
    wait_sql_do "$FOLLOWER_PORT" "$DB" "$(marker_cond "$marker")" "$CATCHUP_POLL_MS" >/dev/null 2>"$PHASE_DIR/catchup.out" &
    waiter=$!
    BG_PIDS+=("$waiter")
    touch "$PHASE_DIR/catchup.out"  # the waiter's redirection may not have created it yet
    n=0
    until grep -q '^NOTICE:  ready' "$PHASE_DIR/catchup.out"; do
        kill -0 "$waiter" 2>/dev/null || { cat "$PHASE_DIR/catchup.out" >&2; die "$m: catch-up waiter failed"; }
        n=$((n + 1)); [ "$n" -lt 600 ] || die "$m: catch-up waiter did not start"
        sleep 0.05
    done
    t0="$(now)"
    "resume_$m"
    await_waiter "$waiter" "$PHASE_DIR/catchup.out" "$m to catch up"
    t1="$(done_at "$PHASE_DIR/catchup.out")"
    catch="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')"
    local atps arows
    atps="$(awk -v n="$backlog_txns" -v s="$catch" 'BEGIN { printf "%.0f", n / s }')"
    arows="$(awk -v n="$backlog_rows" -v s="$catch" 'BEGIN { printf "%.0f", n / s }')"
    "applied_by_$m" >"$PHASE_DIR/applied.txt"
    log "$m: backlog of $backlog_txns txns ($btxns from pgbench at $btps tps) applied in ${catch}s: $atps txn/s, $arows rows/s"

    # 4. verify (the leader is quiet and the follower showed the last transaction)
    local lsum fsum verified=ok
    lsum="$(q "$LEADER_PORT" "$DB" "$CHECKSUM_SQL")"
    fsum="$(q "$FOLLOWER_PORT" "$DB" "$CHECKSUM_SQL")"
    printf 'leader:   %s\nfollower: %s\n(accounts sum(abalance) branches tellers history sum(delta) heartbeats heartbeat_ts)\n' \
        "$lsum" "$fsum" >"$PHASE_DIR/verify.txt"
    if [ "$lsum" != "$fsum" ]; then
        verified=MISMATCH
        FAILED+=("$m")
        log "ERROR: $m: the follower differs from the leader"
        log "ERROR:   leader:   $lsum"
        log "ERROR:   follower: $fsum"
    else
        log "$m: follower equals the leader ($lsum)"
    fi

    echo "$m,$boot,$tps,$txns,$lp50,$lp99,$lmax,$sp50,$sp99,$smax,$nhb,$nsamp,$btps,$backlog_txns,$backlog_rows,$catch,$atps,$arows,$verified" >>"$CSV"
    "teardown_$m"
    stop_server "$WORK/follower-$m"
}

for m in $METHODS; do run_method "$m"; done
echo "uptime at end: $(uptime)" >>"$RESULTS_DIR/env.txt"

# --- summary -----------------------------------------------------------------------------------------
{
    echo "Row apply, \`bench/row_apply.sh\`, $(date +%F), commit \`$COMMIT\`."
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| machine | $MACHINE_CPU, $(nproc) cores, $MACHINE_RAM RAM, Linux $(uname -r) |"
    echo "| PostgreSQL | $PG_VERSION; leader and both followers alike: \`fsync=$FSYNC\`, \`full_page_writes=$FSYNC\`, \`synchronous_commit=on\`, \`shared_buffers=$SHARED_BUFFERS\` (default), \`wal_level=logical\`, loopback TCP, SCRAM |"
    echo "| native | \`CREATE SUBSCRIPTION ... WITH (copy_data = true, synchronous_commit = '$NATIVE_SYNC_COMMIT')\`, \`streaming=off\`, \`binary=false\` (defaults) |"
    echo "| pgrelay | \`mode = \"row\"\`, defaults (\`bootstrap_workers = 2\`, like native's \`max_sync_workers_per_subscription = 2\`) |"
    echo "| load | \`pgbench -n -N -c $CLIENTS -j $THREADS\` on the leader directly, scale $SCALE; lag run ${DURATION} s, backlog ${BACKLOG} s |"
    echo "| lag | heartbeat every ${HEARTBEAT_MS} ms on the leader, read every ${POLL_MS} ms on the follower; staleness includes the heartbeat's age (0-${HEARTBEAT_MS} ms) |"
    echo
    echo "| method | bootstrap s | leader TPS (replicating) | lag p50 / p99 / max ms | staleness p50 / p99 / max ms | leader TPS (stopped) | backlog txns (rows) | catch-up s | apply txn/s | apply rows/s | follower = leader |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    tail -n +2 "$CSV" | while IFS=, read -r m boot tps txns lp50 lp99 lmax sp50 sp99 smax nhb nsamp btps btx brows catch atps arows ver; do
        name="$m"; [ "$m" = pgrelay ] && name="pgrelay row mode"; [ "$m" = native ] && name="native (subscription)"
        printf '| %s | %s | %.0f | %s / %s / %s | %s / %s / %s | %.0f | %s (%s) | %s | %s | %s | %s |\n' \
            "$name" "$boot" "$tps" "$lp50" "$lp99" "$lmax" "$sp50" "$sp99" "$smax" "$btps" "$btx" "$brows" "$catch" "$atps" "$arows" "$ver"
    done
} >"$RESULTS_DIR/summary.md"
cat "$RESULTS_DIR/summary.md"
log "raw results: $RESULTS_DIR (results.csv, per-method logs, lag.csv, verify.txt)"
if [ "${#FAILED[@]}" -gt 0 ]; then
    die "the follower does not equal the leader for: ${FAILED[*]} (see $RESULTS_DIR/*/verify.txt)"
fi
