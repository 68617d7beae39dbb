#!/usr/bin/env bash
# Statement mode against row mode: the same pgbench write load and the same one-million-row UPDATE
# through pgrelay, one leader and one follower, with `[replication] mode = "statement"`
# (`serialize_writes = true`, then `false`) and with `mode = "row"`.
#
# Usage: bench/statement_vs_row.sh      (4-7 minutes with the defaults on 2 cores; as root, Postgres
#                                        runs as OS user postgres, else as the user running the script)
#        SCALE=1 DURATION=5 BIG_ROWS=100000 bench/statement_vs_row.sh   (a quick check, ~2 minutes)
# Knobs (environment):
#   SCALE=5              pgbench -i scale (through pgrelay)
#   DURATION=30          seconds of `pgbench -N` through pgrelay
#   CLIENTS=4 THREADS=2  pgbench -c / -j
#   BIG_ROWS=1000000     rows of the table `big` that one UPDATE rewrites
#   RUNS="statement-serialized statement-concurrent row"   which configurations run, in this order
#   POLL_MS=10           how often the follower's marker row is read while it converges
#   FSYNC=off            fsync and full_page_writes of the servers (off, like `pgrelay demo`)
#   WAIT_TIMEOUT=300     seconds a follower may take to converge before the run is marked failed
#   BUILD=1              run `cargo build --release` even if target/release/pgrelay exists
#   PGBIN=DIR            Postgres binaries (default: the newest /usr/lib/postgresql/*/bin)
#   RESULTS_DIR=bench/results-<date>-statement   raw results and summary.md
#   KEEP_WORKDIR=1       keep the servers' directory after the run
#
# Each configuration gets a fresh leader and a fresh follower (identical settings) and its own
# pgrelay process, which bootstraps the empty follower; configurations run one after the other.
# Everything below goes through pgrelay's port (in statement mode only what passes through pgrelay
# is logged and replayed): `pgbench -i`, `CREATE TABLE big (id int PRIMARY KEY, v int)` filled with
# COPY FROM STDIN, a one-row table `marker`. Then the follower converges, and
# VACUUM ANALYZE + CHECKPOINT run on both servers directly. Per configuration:
#   load     `pgbench -n -N -c CLIENTS -j THREADS -T DURATION` through pgrelay: commit throughput
#            (pgbench's tps, without connection time). Then one marker UPDATE through pgrelay, the
#            last write; "follower apply" = from pgbench's end until the follower shows the marker
#            (read server side every POLL_MS by a DO block connected before the load ended).
#   big      `UPDATE big SET v = v + 1` through pgrelay in one psql session: "leader" is psql's
#            \timing of the UPDATE (the round trip through pgrelay, commit included); right after it
#            the session takes the time (\!) and writes the marker; "follower apply" = from that
#            time until the follower shows the marker.
#   bytes    leader WAL generated over the step: pg_wal_lsn_diff of pg_current_wal_lsn() before and
#            after (both modes; in row mode it is the upper bound of what the walsender decodes
#            and sends). Statement mode also: the growth of
#            pg_total_relation_size('pgrelay.statement_log') (heap, TOAST, index) and the sum of
#            pg_column_size of the step's log rows, which is what the replayer reads (approximately:
#            as stored, TOAST-compressed; `log_retention = "1h"` so the rows are still there).
#            Row mode, in results.csv only: the growth of pg_stat_replication_slots.total_bytes of
#            pgrelay's slot, which is the reorder buffer's in-memory size of the decoded changes
#            (struct overhead included), not bytes on the wire; Postgres counts no walsender bytes.
#   verify   after each step, row counts and sums of pgbench's tables and of `big` equal on leader
#            and follower; a mismatch marks the configuration failed.
# A configuration that fails (an error from pgrelay, no convergence, a mismatch) is recorded as
# failed with the error text in summary.md, and the next configuration still runs; exit status 1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCALE="${SCALE:-5}"
DURATION="${DURATION:-30}"
CLIENTS="${CLIENTS:-4}"
THREADS="${THREADS:-2}"
BIG_ROWS="${BIG_ROWS:-1000000}"
RUNS="${RUNS:-statement-serialized statement-concurrent row}"
POLL_MS="${POLL_MS:-10}"
FSYNC="${FSYNC:-off}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-300}"
PG_OS_USER="${PGRELAY_OS_USER:-postgres}"
PGRELAY="$ROOT/target/release/pgrelay"
DB=bench
FOLLOWER=follower1
SUPERUSER=postgres
SUPERUSER_PASSWORD="$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"

if [ -z "${RESULTS_DIR:-}" ]; then
    RESULTS_DIR="$ROOT/bench/results-$(date +%F)-statement"
    # Never mix two runs' raw files.
    [ ! -e "$RESULTS_DIR" ] || RESULTS_DIR="$RESULTS_DIR-$(date +%H%M%S)"
fi
if [ -z "${PGBIN:-}" ]; then
    PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
    [ -n "$PGBIN" ] || PGBIN="$(pg_config --bindir 2>/dev/null || true)"
fi

export PATH="$PGBIN:$PATH" PGRELAY_PG_BIN="$PGBIN"
export PGHOST=127.0.0.1 PGUSER="$SUPERUSER" PGPASSWORD="$SUPERUSER_PASSWORD" PGDATABASE="$DB" PGCONNECT_TIMEOUT=10

. "$ROOT/bench/lib.sh"
# Inside a configuration's subshell, the message also goes to its error file for the summary.
die() {
    log "error: $*"
    [ -z "${ERR_FILE:-}" ] || printf '%s\n' "$*" >>"$ERR_FILE"
    exit 1
}
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

WORK=""
PGRELAY_PID=""
BG_PIDS=()

# Every server this script started: each one's directory is $WORK/<name>/data.
stop_all_servers() {
    local d
    for d in "$WORK"/*/data; do [ -d "$d" ] && stop_server "$d"; done
}

cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    set +e
    log "cleaning up"
    stop_pid "$PGRELAY_PID" 30 INT
    for p in "${BG_PIDS[@]}"; do stop_pid "$p" 5 TERM; done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        stop_all_servers
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
for r in $RUNS; do
    case "$r" in statement-serialized | statement-concurrent | row) ;;
    *) die "unknown configuration $r in RUNS (statement-serialized, statement-concurrent, row)" ;;
    esac
done
if [ ! -x "$PGRELAY" ] || [ "${BUILD:-0}" = 1 ]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release)
fi
[ -x "$PGRELAY" ] || die "$PGRELAY not found"
if [ -n "$(cd "$ROOT" && find src Cargo.toml Cargo.lock -newer "$PGRELAY" 2>/dev/null | head -1)" ]; then
    log "warning: $PGRELAY is older than the sources; BUILD=1 rebuilds it"
fi
for tool in initdb pg_ctl postgres psql pgbench; do
    [ -x "$PGBIN/$tool" ] || die "$tool not found in PGBIN=$PGBIN"
done
if [ "$(id -u)" = 0 ]; then
    id "$PG_OS_USER" >/dev/null 2>&1 || die "OS user $PG_OS_USER (to run Postgres as) does not exist"
fi

mkdir -p "$RESULTS_DIR"
WORK="$(mktemp -d /tmp/pgrelay-stmtbench.XXXXXX)"
chmod 755 "$WORK"
mkdir -p "$WORK/logs"
# The servers write their logs here, so it belongs to the user they run as.
[ "$(id -u)" != 0 ] || chown "$PG_OS_USER" "$WORK/logs"
log "work directory $WORK, results in $RESULTS_DIR"

MACHINE_CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
MACHINE_RAM="$(awk '/^MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' (src dirty)')"
UPTIME_START="$(uptime)"
{
    echo "date: $(date -Is)"
    echo "commit: $COMMIT"
    echo "pgrelay binary: $(date -r "$PGRELAY" -Is)"
    echo "scale=$SCALE duration=$DURATION clients=$CLIENTS threads=$THREADS big_rows=$BIG_ROWS runs=$RUNS"
    echo "poll_ms=$POLL_MS fsync=$FSYNC wait_timeout=$WAIT_TIMEOUT"
    echo "cpu: $MACHINE_CPU, $(nproc) cores; ram: $MACHINE_RAM"
    echo "kernel: $(uname -r)"
    echo "postgres: $(postgres --version)"
    echo "pgbench: $(pgbench --version)"
    echo "uptime at start: $UPTIME_START"
} >"$RESULTS_DIR/env.txt"
log "load before the run: $UPTIME_START"

# --- 2. servers --------------------------------------------------------------------------------------
# The settings of pgrelay's own test clusters (src/cluster/node.rs); the rest are Postgres' defaults.
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

# init_server NAME PORT: initdb into $WORK/NAME/data with a SCRAM password for TCP, then start.
init_server() {
    local name="$1" port="$2" dir="$WORK/$1/data"
    mkdir -p "$WORK/$1"
    chmod 755 "$WORK/$1"
    mkdir -m 700 "$dir"
    printf '%s\n' "$SUPERUSER_PASSWORD" >"$WORK/$1/pwfile"
    if [ "$(id -u)" = 0 ]; then chown "$PG_OS_USER" "$dir" "$WORK/$1/pwfile"; fi
    chmod 600 "$WORK/$1/pwfile"
    # cd: initdb complains when it cannot return to a working directory its user cannot read.
    (cd "$WORK" && as_pg initdb -D "$dir" -U "$SUPERUSER" --pwfile="$WORK/$1/pwfile" -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 --no-sync) >"$WORK/logs/initdb-$name.log" 2>&1 ||
        { cat "$WORK/logs/initdb-$name.log" >&2; die "initdb $name failed"; }
    rm -f "$WORK/$1/pwfile"
    server_settings "$port" >>"$dir/postgresql.conf"
    printf '%s\n' "local all all trust" "host all all 127.0.0.1/32 scram-sha-256" \
        "host replication all 127.0.0.1/32 scram-sha-256" >"$dir/pg_hba.conf"
    (cd "$WORK" && as_pg pg_ctl start -D "$dir" -l "$WORK/logs/$name.log" -w -t 120 -s) ||
        { tail -20 "$WORK/logs/$name.log" >&2; die "server $name did not start"; }
}

# --- 3. helpers --------------------------------------------------------------------------------------

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
        EXCEPTION WHEN undefined_table OR invalid_schema_name OR undefined_column THEN
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

# pgrelay's ERROR lines so far (replication that stopped: a divergence, a failed bootstrap).
pgrelay_errors() { grep -a ' ERROR ' "$PGRELAY_LOG" 2>/dev/null | tail -5 || true; }

# await_waiter PID OUT WHAT: waits for a background wait_sql_do; gives up at once if pgrelay exits
# or logs an ERROR meanwhile, rather than after WAIT_TIMEOUT.
await_waiter() {
    local pid="$1" out="$2" what="$3" errs
    while kill -0 "$pid" 2>/dev/null; do
        if [ -n "$PGRELAY_PID" ] && ! kill -0 "$PGRELAY_PID" 2>/dev/null; then
            die "pgrelay exited while waiting for $what; its log ends with: $(tail -5 "$PGRELAY_LOG")"
        fi
        errs="$(pgrelay_errors)"
        [ -z "$errs" ] || die "pgrelay logged an error while waiting for $what: $errs"
        sleep 0.1
    done
    forget_pid "$pid"
    wait "$pid" || die "waiting for $what failed: $(grep -v '^NOTICE' "$out" | tail -5)"
}

# start_waiter PORT CONDITION OUT [DB]: a background wait_sql_do, returned once it polls; sets WAITER.
WAITER=""
start_waiter() {
    local port="$1" cond="$2" out="$3" db="${4:-$DB}" n=0
    : >"$out"
    wait_sql_do "$port" "$db" "$cond" "$POLL_MS" >/dev/null 2>"$out" &
    WAITER=$!
    BG_PIDS+=("$WAITER")
    until grep -q '^NOTICE:  ready' "$out"; do
        kill -0 "$WAITER" 2>/dev/null || die "the waiter on port $port failed: $(cat "$out")"
        n=$((n + 1)); [ "$n" -lt 600 ] || die "the waiter on port $port did not start"
        sleep 0.05
    done
}

# wait_for PORT CONDITION WHAT [DB]: blocks until CONDITION holds on that server.
wait_for() {
    local out="$WORK/wait.out"
    start_waiter "$1" "$2" "$out" "${4:-$DB}"
    await_waiter "$WAITER" "$out" "$3"
}

marker_cond() { echo "(SELECT n FROM marker WHERE id = 1) >= $1"; }

# Through pgrelay: the marker's last write.
write_marker() { q "$PROXY_PORT" "$DB" "UPDATE marker SET n = $1 WHERE id = 1" >/dev/null; }

# Prints "<tps> <transactions>" from a pgbench log.
pgbench_numbers() {
    local tps txns
    tps="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$1" | head -1)"
    txns="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$1" | head -1)"
    [ -n "$tps" ] && [ -n "$txns" ] || die "pgbench failed: $(grep -v '^progress' "$1" | tail -5)"
    echo "$tps $txns"
}

# run_bg SECONDS LOG CMD...: in the background with `wait`, so Ctrl-C stops the run at once.
run_bg() {
    local secs="$1" out="$2" pid rc=0
    shift 2
    timeout --kill-after=10 "$secs" "$@" >"$out" 2>&1 &
    pid=$!
    BG_PIDS+=("$pid")
    wait "$pid" || rc=$?
    forget_pid "$pid"
    return "$rc"
}

CHECKSUM_SQL="SELECT concat_ws(' ',
    (SELECT count(*) FROM pgbench_accounts), (SELECT sum(abalance) FROM pgbench_accounts),
    (SELECT count(*) FROM pgbench_branches), (SELECT sum(bbalance) FROM pgbench_branches),
    (SELECT count(*) FROM pgbench_tellers), (SELECT sum(tbalance) FROM pgbench_tellers),
    (SELECT count(*) FROM pgbench_history), (SELECT coalesce(sum(delta), 0) FROM pgbench_history),
    (SELECT count(*) FROM big), (SELECT sum(v::bigint) FROM big), (SELECT n FROM marker WHERE id = 1))"

# verify STEP: leader and follower hold the same (the leader is quiet, the follower converged).
verify() {
    local l f
    l="$(q "$LEADER_PORT" "$DB" "$CHECKSUM_SQL")"
    f="$(q "$FOLLOWER_PORT" "$DB" "$CHECKSUM_SQL")"
    printf '%s leader:   %s\n%s follower: %s\n' "$1" "$l" "$1" "$f" >>"$PHASE_DIR/verify.txt"
    [ "$l" = "$f" ] || die "after $1 the follower differs from the leader: leader [$l] follower [$f] (accounts sum branches sum tellers sum history sum big sum marker)"
}

# The measurements taken before and after a step, as "lsn log_bytes seq slot_bytes" (log_bytes and
# seq are 0 in row mode, slot_bytes is 0 in statement mode).
snapshot() {
    local lsn size=0 seq=0 slot=0
    lsn="$(q "$LEADER_PORT" "$DB" "SELECT pg_current_wal_lsn()")"
    if [ "$MODE" = statement ]; then
        size="$(q "$LEADER_PORT" "$DB" "SELECT pg_total_relation_size('pgrelay.statement_log')")"
        seq="$(q "$LEADER_PORT" "$DB" "SELECT coalesce(max(seq), 0) FROM pgrelay.statement_log")"
    else
        slot="$(slot_bytes)"
    fi
    echo "$lsn $size $seq $slot"
}

slot_bytes() {
    q "$LEADER_PORT" "$DB" "SELECT coalesce((SELECT total_bytes FROM pg_stat_replication_slots
        WHERE slot_name = 'pgrelay_${FOLLOWER}_$DB'), 0)"
}

# bytes_between "BEFORE" "AFTER" -> "wal_bytes log_growth_bytes log_rows log_rows_bytes"
# (log_rows_bytes: sum of pg_column_size of the log rows with seq in (before, after]).
bytes_between() {
    local l0 s0 q0 l1 s1 q1 wal rows rowbytes
    read -r l0 s0 q0 _ <<<"$1"
    read -r l1 s1 q1 _ <<<"$2"
    wal="$(q "$LEADER_PORT" "$DB" "SELECT pg_wal_lsn_diff('$l1', '$l0')::bigint")"
    if [ "$MODE" = statement ]; then
        rows="$(q "$LEADER_PORT" "$DB" "SELECT count(*)::text || ' ' || coalesce(sum(pg_column_size(l.*)), 0)
            FROM pgrelay.statement_log l WHERE seq > $q0 AND seq <= $q1")"
        read -r rows rowbytes <<<"$rows"
    else
        rows=0 rowbytes=0
    fi
    echo "$wal $((s1 - s0)) $rows $rowbytes"
}

# Slot bytes decoded between two snapshots, read after the follower converged (the walsender
# updates the statistics as it decodes).
slot_growth() {
    local x0 now_bytes
    read -r _ _ _ x0 <<<"$1"
    [ "$MODE" = row ] || { echo 0; return; }
    now_bytes="$(slot_bytes)"
    echo $((now_bytes - x0))
}

pgrelay_start() {
    NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$PGRELAY" run --config "$PGRELAY_CONF" >>"$PGRELAY_LOG" 2>&1 &
    PGRELAY_PID=$!
    echo "$PGRELAY_PID" >"$PHASE_WORK/pgrelay.pid"
}

write_config() { # write_config RUN
    local mode="$MODE" serialize=true
    [ "$1" != statement-concurrent ] || serialize=false
    cat >"$PGRELAY_CONF" <<EOF
# Written by bench/statement_vs_row.sh ($1).
[proxy]
listen = "127.0.0.1:$PROXY_PORT"

[replication]
mode = "$mode"
user = "$SUPERUSER"
databases = ["$DB"]

[statement]
serialize_writes = $serialize
# So the log rows of a step are still there when their size is measured.
log_retention = "1h"

[[nodes]]
name = "leader"
role = "leader"
host = "127.0.0.1"
port = $LEADER_PORT

[[nodes]]
name = "$FOLLOWER"
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
}

# --- 4. one configuration, start to end (in a subshell: a failure ends this configuration only) -----
CSV="$RESULTS_DIR/results.csv"
echo "run,setup_s,load_tps,load_txns,load_apply_s,load_wal_bytes,load_log_growth_bytes,load_log_rows,load_log_rows_bytes,load_slot_decoded_bytes,big_leader_s,big_apply_s,big_wal_bytes,big_log_growth_bytes,big_log_rows,big_log_rows_bytes,big_slot_decoded_bytes,status" >"$CSV"

run_one() {
    local r="$1"
    PHASE_DIR="$RESULTS_DIR/$r"
    PHASE_WORK="$WORK/$r"
    mkdir -p "$PHASE_DIR" "$PHASE_WORK"
    ERR_FILE="$PHASE_DIR/error.txt"
    MODE=statement
    [ "$r" != row ] || MODE=row
    PGRELAY_LOG="$WORK/logs/pgrelay-$r.log"
    # This subshell's own cleanup; the main one sweeps whatever is left.
    trap 'set +e; stop_pid "$PGRELAY_PID" 30 INT; for p in "${BG_PIDS[@]}"; do stop_pid "$p" 5 TERM; done
          stop_server "$WORK/leader-$r/data"; stop_server "$WORK/follower-$r/data"' EXIT
    log "== $r"

    LEADER_PORT="$(free_port)"
    init_server "leader-$r" "$LEADER_PORT"
    FOLLOWER_PORT="$(free_port)"
    init_server "follower-$r" "$FOLLOWER_PORT"
    q "$LEADER_PORT" postgres "CREATE DATABASE $DB" >/dev/null
    PROXY_PORT="$(free_port)"
    METRICS_PORT="$(free_port)"
    PGRELAY_CONF="$PHASE_WORK/pgrelay.toml"
    write_config "$r"
    "$PGRELAY" check-config --config "$PGRELAY_CONF" >"$PHASE_DIR/check-config.txt" 2>&1 ||
        die "pgrelay rejects the config: $(tail -5 "$PHASE_DIR/check-config.txt")"
    sed -i '/password/d' "$PHASE_DIR/check-config.txt"
    log "$r: leader :$LEADER_PORT, follower :$FOLLOWER_PORT, pgrelay :$PROXY_PORT"
    pgrelay_start

    # The empty database's bootstrap, then the data, all through pgrelay.
    local t0 t1 setup apply_big
    t0="$(now)"
    local cond="EXISTS (SELECT FROM pg_database WHERE datname = '$DB')"
    wait_for "$FOLLOWER_PORT" "$cond" "pgrelay to create the database on the follower" postgres
    wait_for "$FOLLOWER_PORT" "EXISTS (SELECT FROM pgrelay.applied WHERE $([ "$r" = row ] && echo position || echo seq) IS NOT NULL)" \
        "the follower's bootstrap"
    # pgrelay may accept connections a moment after the bootstrap started.
    local n=0
    until q "$PROXY_PORT" "$DB" "SELECT 1" >/dev/null 2>&1; do
        n=$((n + 1)); [ "$n" -lt 100 ] || die "pgrelay does not accept connections: $(tail -5 "$PGRELAY_LOG")"
        sleep 0.1
    done
    q "$PROXY_PORT" "$DB" "CREATE TABLE marker (id int PRIMARY KEY, n int NOT NULL)" >/dev/null ||
        die "CREATE TABLE marker through pgrelay failed"
    q "$PROXY_PORT" "$DB" "INSERT INTO marker VALUES (1, 0)" >/dev/null || die "INSERT INTO marker through pgrelay failed"
    log "$r: pgbench -i -s $SCALE through pgrelay"
    run_bg 1800 "$PHASE_DIR/pgbench-init.log" pgbench -i -q -s "$SCALE" -p "$PROXY_PORT" "$DB" ||
        die "pgbench -i through pgrelay failed: $(tail -5 "$PHASE_DIR/pgbench-init.log")"
    log "$r: big ($BIG_ROWS rows) through pgrelay"
    # COPY, not INSERT ... SELECT FROM generate_series: with serialize_writes = false statement
    # mode refuses an INSERT that reads rows (SQLSTATE 0A000), generate_series' included. In a
    # transaction block: statement mode refuses COPY FROM STDIN outside one.
    q "$PROXY_PORT" "$DB" "CREATE TABLE big (id int PRIMARY KEY, v int NOT NULL)" >"$PHASE_DIR/big-create.log" 2>&1 ||
        die "CREATE TABLE big through pgrelay failed: $(tail -5 "$PHASE_DIR/big-create.log")"
    { echo "BEGIN;"; echo "COPY big (id, v) FROM STDIN;"; seq 1 "$BIG_ROWS" | sed 's/$/\t0/'; echo '\.'; echo "COMMIT;"; } |
        psql -X -q -v ON_ERROR_STOP=1 -p "$PROXY_PORT" -d "$DB" >>"$PHASE_DIR/big-create.log" 2>&1 ||
        die "COPY big through pgrelay failed: $(tail -5 "$PHASE_DIR/big-create.log")"
    write_marker 1
    wait_for "$FOLLOWER_PORT" "$(marker_cond 1)" "the follower to copy pgbench's tables and big"
    t1="$(now)"
    setup="$(sub "$t0" "$t1")"
    verify setup
    local srv
    for srv in "$LEADER_PORT" "$FOLLOWER_PORT"; do
        q "$srv" "$DB" "VACUUM ANALYZE" >/dev/null
        q "$srv" "$DB" "CHECKPOINT" >/dev/null
    done
    log "$r: setup (bootstrap, pgbench -i, big, converged) ${setup}s"

    # 1. the pgbench load
    local s0 s1 p1 done_t tps txns apply bytes slot
    s0="$(snapshot)"
    start_waiter "$FOLLOWER_PORT" "$(marker_cond 2)" "$PHASE_DIR/load-wait.out"
    local waiter="$WAITER"
    log "$r: pgbench -n -N -c $CLIENTS -j $THREADS -T $DURATION through pgrelay"
    run_bg $((DURATION + 120)) "$PHASE_DIR/pgbench-load.log" \
        pgbench -n -N -c "$CLIENTS" -j "$THREADS" -T "$DURATION" -p "$PROXY_PORT" "$DB" ||
        die "pgbench -N through pgrelay failed: $(grep -v '^progress' "$PHASE_DIR/pgbench-load.log" | tail -5)"
    p1="$(now)"
    s1="$(snapshot)"
    write_marker 2
    await_waiter "$waiter" "$PHASE_DIR/load-wait.out" "the follower to apply the load"
    done_t="$(done_at "$PHASE_DIR/load-wait.out")"
    apply="$(sub "$p1" "$done_t")"
    tps="$(pgbench_numbers "$PHASE_DIR/pgbench-load.log")"
    read -r tps txns <<<"$tps"
    bytes="$(bytes_between "$s0" "$s1")"
    slot="$(slot_growth "$s0")"
    verify load
    local lw lg lr lrb
    read -r lw lg lr lrb <<<"$bytes"
    log "$r: $tps tps ($txns txns); follower apply ${apply}s after the load; WAL $lw B, log +$lg B ($lr rows, $lrb B), slot decoded $slot B"

    # 2. one UPDATE of every row of big
    local b0 b1 tu leader_s bbytes bslot bw bg br brb
    b0="$(snapshot)"
    start_waiter "$FOLLOWER_PORT" "$(marker_cond 3)" "$PHASE_DIR/big-wait.out"
    waiter="$WAITER"
    log "$r: UPDATE big SET v = v + 1 through pgrelay"
    psql -X -q -v ON_ERROR_STOP=1 -p "$PROXY_PORT" -d "$DB" >"$PHASE_DIR/big-update.log" 2>&1 <<EOF ||
\\timing on
UPDATE big SET v = v + 1;
\\! date +%s.%N >$PHASE_WORK/big-updated
\\timing off
UPDATE marker SET n = 3 WHERE id = 1;
EOF
        die "UPDATE big through pgrelay failed: $(tail -5 "$PHASE_DIR/big-update.log")"
    tu="$(cat "$PHASE_WORK/big-updated")"
    leader_s="$(sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' "$PHASE_DIR/big-update.log" | head -1 | awk '{ printf "%.3f", $1 / 1000 }')"
    b1="$(snapshot)"
    await_waiter "$waiter" "$PHASE_DIR/big-wait.out" "the follower to apply the big UPDATE"
    done_t="$(done_at "$PHASE_DIR/big-wait.out")"
    apply_big="$(sub "$tu" "$done_t")"
    # b1 was taken after the marker: the marker's own log row and WAL (a few hundred bytes) are in.
    bbytes="$(bytes_between "$b0" "$b1")"
    bslot="$(slot_growth "$b0")"
    verify big
    read -r bw bg br brb <<<"$bbytes"
    log "$r: UPDATE big ${leader_s}s on the leader; follower apply ${apply_big}s; WAL $bw B, log +$bg B ($br rows, $brb B), slot decoded $bslot B"

    echo "$r,$setup,$tps,$txns,$apply,$lw,$lg,$lr,$lrb,$slot,$leader_s,$apply_big,$bw,$bg,$br,$brb,$bslot,ok" >>"$CSV"
    curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" >"$PHASE_DIR/pgrelay-metrics.txt" 2>/dev/null || true
}

MODE=""
FAILED=()
for r in $RUNS; do
    # Not `if ! (...)`: errexit would be off inside the subshell.
    set +e
    (set -e; run_one "$r")
    rc=$?
    set -e
    if [ "$rc" != 0 ]; then
        FAILED+=("$r")
        err="$(tr '\n' ' ' <"$RESULTS_DIR/$r/error.txt" 2>/dev/null | tr ',' ';' || true)"
        echo "$r,,,,,,,,,,,,,,,,,FAILED: ${err:-see logs}" >>"$CSV"
        log "$r failed; going on with the next configuration"
    fi
    stop_all_servers
done
UPTIME_END="$(uptime)"
echo "uptime at end: $UPTIME_END" >>"$RESULTS_DIR/env.txt"

# --- 5. summary -----------------------------------------------------------------------------------------
mib() { [ -n "$1" ] && awk -v b="$1" 'BEGIN { if (b < 1048576) printf "%.1f KiB", b / 1024; else printf "%.1f MiB", b / 1048576 }' || echo "-"; }
{
    echo "Statement mode vs row mode, \`bench/statement_vs_row.sh\`, $(date +%F), commit \`$COMMIT\`."
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| machine | $MACHINE_CPU, $(nproc) cores, $MACHINE_RAM RAM, Linux $(uname -r) |"
    echo "| PostgreSQL | $(postgres --version | sed 's/^postgres (PostgreSQL) //'); one leader, one follower: \`fsync=$FSYNC\`, \`full_page_writes=$FSYNC\`, \`synchronous_commit=on\`, \`wal_level=logical\`, other settings default, loopback TCP, SCRAM |"
    echo "| load | through pgrelay: \`pgbench -i -s $SCALE\`, then \`pgbench -n -N -c $CLIENTS -j $THREADS -T $DURATION\` |"
    echo "| big | \`UPDATE big SET v = v + 1\` on $BIG_ROWS rows, one transaction through pgrelay |"
    echo "| load average | start: ${UPTIME_START##*load average: }; end: ${UPTIME_END##*load average: } |"
    echo
    echo "| configuration | load TPS | load: follower apply s | load: leader WAL | load: log growth (rows, their size) | big: leader s | big: follower apply s | big: leader WAL | big: log growth (rows, their size) | status |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    tail -n +2 "$CSV" | while IFS=, read -r r setup tps txns apply lw lg lr lrb slot bl ba bw bg br brb bslot status; do
        if [ "$status" != ok ]; then
            echo "| $r | | | | | | | | | $status |"
            continue
        fi
        if [ "$r" = row ]; then
            printf '| %s | %.0f | %s | %s | - | %s | %s | %s | - | %s |\n' "$r" "$tps" "$apply" "$(mib "$lw")" \
                "$bl" "$ba" "$(mib "$bw")" "$status"
        else
            printf '| %s | %.0f | %s | %s | %s (%s, %s) | %s | %s | %s | %s (%s, %s) | %s |\n' "$r" "$tps" "$apply" "$(mib "$lw")" \
                "$(mib "$lg")" "$lr" "$(mib "$lrb")" "$bl" "$ba" "$(mib "$bw")" "$(mib "$bg")" "$br" "$(mib "$brb")" "$status"
        fi
    done
    echo
    echo "statement-serialized: \`[statement] serialize_writes = true\`; statement-concurrent: \`serialize_writes = false\`;"
    echo "both \`log_retention = \"1h\"\`. Leader WAL: \`pg_wal_lsn_diff\` of \`pg_current_wal_lsn()\` over the step, all of"
    echo "the leader's WAL (in row mode the upper bound of what the walsender decodes and sends). Log growth:"
    echo "\`pg_total_relation_size('pgrelay.statement_log')\`; rows' size: sum of \`pg_column_size\` of the step's log rows"
    echo "(what the replayer reads, as stored). results.csv also has row mode's growth of"
    echo "\`pg_stat_replication_slots.total_bytes\` (the reorder buffer's in-memory size of the decoded changes, not bytes sent)."
    echo "Follower apply: from the end of the step on the leader until the follower showed the marker written last."
} >"$RESULTS_DIR/summary.md"
cat "$RESULTS_DIR/summary.md"
log "raw results: $RESULTS_DIR (results.csv, per-configuration logs, verify.txt, error.txt)"
if [ "${#FAILED[@]}" -gt 0 ]; then
    ERR_FILE="" die "failed: ${FAILED[*]} (see $RESULTS_DIR/<configuration>/error.txt and logs/)"
fi
