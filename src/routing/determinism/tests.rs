#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::HashSet;

use super::*;

fn row(values: &[&str]) -> Vec<Option<String>> {
    values
        .iter()
        .map(|v| (!v.is_empty()).then(|| (*v).to_owned()))
        .collect()
}

/// kind, schema, table, column, attnum, default, identity, generated, sequence.
fn column(schema: &str, table: &str, col: &str, num: &str, default: &str) -> Vec<Option<String>> {
    row(&["column", schema, table, col, num, default, "", "", ""])
}

fn identity(table: &str, col: &str, kind: &str, seq: &str) -> Vec<Option<String>> {
    row(&["column", "public", table, col, "1", "", kind, "", seq])
}

fn catalog() -> Catalog {
    let mut rows = vec![];
    for f in [
        "random",
        "nextval",
        "setval",
        "clock_timestamp",
        "gen_random_uuid",
        "uuid_generate_v4",
        "set_config",
        "pg_advisory_xact_lock",
        "pg_notify",
        "lo_create",
        "my_volatile",
    ] {
        rows.push(row(&["volatile", f]));
    }
    rows.extend([
        // Out of attnum order on purpose.
        column("public", "t", "created_at", "3", "now()"),
        column("public", "t", "id", "1", "nextval('t_id_seq'::regclass)"),
        column("public", "t", "name", "2", ""),
        column("public", "u", "id", "1", "gen_random_uuid()"),
        column("public", "u", "v", "2", ""),
        identity("a", "id", "a", "public.a_id_seq"),
        column("public", "a", "x", "2", ""),
        identity("d", "id", "d", "public.d_id_seq"),
        column("public", "d", "x", "2", ""),
        column("app", "Items", "Id", "1", "nextval('app.\"Items_Id_seq\"'::regclass)"),
        column("app", "Items", "label", "2", ""),
        row(&["column", "app", "Items", "len", "3", "length(label)", "", "s", ""]),
        column("public", "c", "x", "1", ""),
        column("public", "c", "ts", "2", "clock_timestamp()"),
        column("public", "plain", "a", "1", ""),
        column("public", "plain", "b", "2", "'x'::text"),
        column("public", "dates", "d", "1", "CURRENT_DATE"),
        column("public", "dates", "x", "2", ""),
        column("public", "f", "x", "1", ""),
        column("public", "f", "y", "2", "my_volatile()"),
        row(&[
            "procedure",
            "p_ok",
            "plpgsql",
            "CREATE OR REPLACE PROCEDURE public.p_ok()\n LANGUAGE plpgsql\nAS $procedure$ BEGIN UPDATE plain SET a = 1; END $procedure$\n",
        ]),
        row(&[
            "procedure",
            "p_bad",
            "plpgsql",
            "CREATE OR REPLACE PROCEDURE public.p_bad()\n LANGUAGE plpgsql\nAS $procedure$ BEGIN UPDATE plain SET b = now()::text; END $procedure$\n",
        ]),
        row(&["procedure", "p_c", "c", "CREATE PROCEDURE ..."]),
        row(&["relation", "public", "v", "v"]),
        row(&["relation", "public", "ft", "f"]),
        row(&["relation", "public", "s", "S"]),
        // A view earlier in the search path hides the table `t` in `app`.
        row(&["relation", "shadow", "t", "v"]),
        column("shadow2", "t", "id", "1", "nextval('x'::regclass)"),
        column("public", "trg", "a", "1", ""),
        column("public", "trg", "at", "2", ""),
        row(&[
            "trigger",
            "public",
            "trg",
            "stamp",
            "plpgsql",
            "CREATE OR REPLACE FUNCTION public.stamp()\n RETURNS trigger\n LANGUAGE plpgsql\nAS $function$ BEGIN NEW.at := now(); RETURN NEW; END $function$\n",
        ]),
        column("public", "trg2", "a", "1", ""),
        row(&[
            "trigger",
            "public",
            "trg2",
            "keep_at",
            "plpgsql",
            "CREATE OR REPLACE FUNCTION public.keep_at()\n RETURNS trigger\n LANGUAGE plpgsql\nAS $function$ BEGIN NEW.at := pgrelay.now(); RETURN NEW; END $function$\n",
        ]),
        row(&["trigger", "public", "trg2", "c_trigger", "c", "..."]),
        column("public", "trg3", "a", "1", ""),
        row(&[
            "trigger",
            "public",
            "trg3",
            "ok",
            "sql",
            "CREATE FUNCTION public.ok() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.a := NEW.a + 1; RETURN NEW; END $$",
        ]),
        // Malformed rows are skipped.
        row(&["column", "public"]),
        row(&["column", "public", "t", "x", "not a number", "", "", "", ""]),
        row(&["mystery"]),
        vec![],
    ]);
    Catalog::from_rows(rows)
}

struct Env {
    catalog: Catalog,
    path: Vec<String>,
    temp: HashSet<String>,
    serialize: bool,
}

impl Env {
    fn new() -> Self {
        Env {
            catalog: catalog(),
            path: vec!["public".into()],
            temp: HashSet::from(["tmp".to_owned()]),
            serialize: true,
        }
    }

    fn run(&self, sql: &str) -> Outcome {
        let cx = Context {
            catalog: &self.catalog,
            search_path: &self.path,
            serialize_writes: self.serialize,
            temp_tables: &self.temp,
        };
        make_deterministic(sql, &cx)
    }
}

fn run(sql: &str) -> Outcome {
    Env::new().run(sql)
}

#[track_caller]
fn rewrite(sql: &str, expected: &str) {
    assert_eq!(run(sql), Outcome::Rewrite(expected.to_owned()), "{sql}");
}

#[track_caller]
fn keep(sql: &str) {
    assert_eq!(run(sql), Outcome::Keep, "{sql}");
}

#[track_caller]
fn unsafe_(sql: &str, construct: &str) -> String {
    match run(sql) {
        Outcome::Unsafe(u) => {
            assert_eq!(u.construct, construct, "{sql}: {}", u.reason);
            u.reason
        }
        other => panic!("{sql}: expected unsafe {construct}, got {other:?}"),
    }
}

const SEQ_T: &str = "pgrelay.nextval('t_id_seq'::regclass)";

#[test]
fn catalog_loads_from_rows() {
    let c = catalog();
    let t = c.table("public", "t").unwrap();
    let names: Vec<_> = t.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "name", "created_at"]);
    assert_eq!(
        t[0].default.as_deref(),
        Some("nextval('t_id_seq'::regclass)")
    );
    assert_eq!(t[1].default, None);
    let a = c.table("public", "a").unwrap();
    assert_eq!(a[0].identity, Identity::Always);
    assert_eq!(a[0].sequence.as_deref(), Some("public.a_id_seq"));
    assert_eq!(
        c.table("public", "d").unwrap()[0].identity,
        Identity::ByDefault
    );
    assert!(c.table("app", "Items").unwrap()[2].generated);
    assert!(c.table("app", "items").is_none());
    assert!(c.is_volatile("my_volatile"));
    assert!(!c.is_volatile("now"));
    assert_eq!(c.procedure("p_ok").len(), 1);
    assert_eq!(c.procedure("p_c")[0].0, None);
    assert!(c.procedure("nope").is_empty());
    assert_eq!(c.triggers("public", "trg")[0].name, "stamp");
    assert!(c.triggers("public", "plain").is_empty());
    for kind in [
        "'volatile'",
        "'procedure'",
        "'column'",
        "pg_get_serial_sequence",
        "attgenerated",
    ] {
        assert!(Catalog::LOAD_SQL.contains(kind), "{kind}");
    }
}

#[test]
fn time_functions_become_pgrelay_now() {
    rewrite(
        "SELECT now(), CURRENT_TIMESTAMP, transaction_timestamp(), statement_timestamp(), pg_catalog.now()",
        "SELECT pgrelay.now(), pgrelay.now(), pgrelay.now(), pgrelay.now(), pgrelay.now()",
    );
    rewrite(
        "select current_date, CURRENT_TIME, LOCALTIME, localtimestamp",
        "select (pgrelay.now())::date, (pgrelay.now())::timetz, (pgrelay.now())::time, (pgrelay.now())::timestamp",
    );
    rewrite(
        "SELECT CURRENT_TIMESTAMP(3), localtimestamp(2), current_time(1), LOCALTIME (0)",
        "SELECT (pgrelay.now())::timestamptz(3), (pgrelay.now())::timestamp(2), (pgrelay.now())::timetz(1), (pgrelay.now())::time(0)",
    );
    rewrite(
        "UPDATE plain SET b = now()::text, a = extract(epoch from CURRENT_TIMESTAMP) WHERE a = $1",
        "UPDATE plain SET b = pgrelay.now()::text, a = extract(epoch from pgrelay.now()) WHERE a = $1",
    );
    rewrite(
        "DELETE FROM plain WHERE b::timestamptz < NOW() - interval '1 day' /* now() */",
        "DELETE FROM plain WHERE b::timestamptz < pgrelay.now() - interval '1 day' /* now() */",
    );
}

#[test]
fn columns_strings_and_comments_named_like_time_stay() {
    keep("UPDATE plain SET b = t.now, \"now\" = 'now()' -- now()\nWHERE x.current_date = 1");
    keep("SELECT now FROM plain AS current_date");
    keep("SELECT 1 AS current_timestamp");
    keep("INSERT INTO plain (b) VALUES ('CURRENT_TIMESTAMP'), ($$random()$$)");
    // A relation called like a function is no call.
    keep("INSERT INTO random (a) VALUES (1)");
    keep("WITH random (a) AS (SELECT 1) SELECT a FROM random");
}

#[test]
fn now_string_literals_are_unsafe() {
    unsafe_("INSERT INTO plain (b) VALUES ('now'::timestamptz)", "'now'");
    unsafe_("UPDATE plain SET b = timestamp 'today'", "'today'");
    unsafe_("SELECT CAST(' Tomorrow ' AS date)", "' Tomorrow '");
    keep("SELECT 'now', 'epoch'::timestamptz");
}

#[test]
fn generators_in_values_and_select_without_from() {
    rewrite(
        "INSERT INTO plain (a, b) VALUES (random() * 10, gen_random_uuid()::text), ($1, uuid_generate_v4()::text)",
        "INSERT INTO plain (a, b) VALUES (pgrelay.random() * 10, pgrelay.uuid()::text), ($1, pgrelay.uuid()::text)",
    );
    rewrite("SELECT nextval('s')", "SELECT pgrelay.nextval('s')");
    rewrite(
        "SELECT pg_catalog.nextval('s'::regclass), public.uuid_generate_v4(), pg_catalog.random()",
        "SELECT pgrelay.nextval('s'::regclass), pgrelay.uuid(), pgrelay.random()",
    );
    rewrite(
        "SELECT nextval('s') WHERE EXISTS (SELECT 1 FROM plain)",
        "SELECT pgrelay.nextval('s') WHERE EXISTS (SELECT 1 FROM plain)",
    );
    rewrite(
        "INSERT INTO plain (a) VALUES ((SELECT random()))",
        "INSERT INTO plain (a) VALUES ((SELECT pgrelay.random()))",
    );
    keep("SELECT setval('s', 42)");
    keep("SELECT pgrelay.random(), pgrelay.nextval('s')");
}

#[test]
fn generators_over_many_rows_are_unsafe() {
    let reason = unsafe_("UPDATE plain SET a = random() * 10", "random()");
    assert_eq!(
        reason,
        "random() over many rows: the rows are visited in an order the follower may not repeat"
    );
    unsafe_("DELETE FROM plain WHERE random() < 0.5", "random()");
    unsafe_(
        "SELECT nextval('s') FROM generate_series(1, 3)",
        "nextval()",
    );
    unsafe_(
        "INSERT INTO plain (a) SELECT nextval('s') FROM plain",
        "nextval()",
    );
    unsafe_(
        "INSERT INTO plain (a) VALUES ((SELECT random() FROM plain LIMIT 1))",
        "random()",
    );
    unsafe_(
        "WITH x AS (SELECT 1) SELECT gen_random_uuid()",
        "gen_random_uuid()",
    );
    unsafe_("SELECT currval('s')", "currval()");
    unsafe_("SELECT lastval()", "lastval()");
}

#[test]
fn volatile_functions_are_unsafe() {
    let reason = unsafe_("UPDATE plain SET a = my_volatile()", "my_volatile()");
    assert_eq!(
        reason,
        "my_volatile() is a volatile function; pgrelay cannot know that it returns the same on the followers"
    );
    unsafe_("SELECT public.my_volatile()", "my_volatile()");
    unsafe_(
        "INSERT INTO plain (b) VALUES (clock_timestamp()::text)",
        "clock_timestamp()",
    );
    unsafe_("SELECT txid_current()", "txid_current()");
    unsafe_("SELECT lo_create(0)", "lo_create()");
    unsafe_("SELECT random(1, 10)", "random()");
    // Without a catalog too.
    let mut env = Env::new();
    env.catalog = Catalog::default();
    assert!(
        matches!(env.run("SELECT random(1, 10)"), Outcome::Unsafe(u) if u.construct == "random()")
    );
    assert!(
        matches!(env.run("SELECT clock_timestamp()"), Outcome::Unsafe(u) if u.construct == "clock_timestamp()")
    );
    keep("SELECT pg_advisory_xact_lock(1), set_config('a.b', 'c', true), pg_notify('ch', 'x')");
    keep("SELECT pg_sleep(0.1), setseed(0.5)");
}

#[test]
fn serial_and_timestamp_defaults_are_filled() {
    rewrite(
        "INSERT INTO t (name) VALUES ('a')",
        &format!("INSERT INTO t (name, id, created_at) VALUES ('a', {SEQ_T}, pgrelay.now())"),
    );
    rewrite(
        "INSERT INTO t (id, name) VALUES (DEFAULT, 'a'), (7, 'b'), (default, $1) RETURNING id",
        &format!(
            "INSERT INTO t (id, name, created_at) VALUES ({SEQ_T}, 'a', pgrelay.now()), (7, 'b', pgrelay.now()), ({SEQ_T}, $1, pgrelay.now()) RETURNING id"
        ),
    );
    // No column list: the row gives the first columns; the list is created in table order.
    rewrite(
        "INSERT INTO t VALUES (DEFAULT, 'a')",
        &format!("INSERT INTO t (id, name, created_at) VALUES ({SEQ_T}, 'a', pgrelay.now())"),
    );
    rewrite(
        "INSERT INTO t AS x VALUES (DEFAULT, 'a')",
        &format!("INSERT INTO t AS x (id, name, created_at) VALUES ({SEQ_T}, 'a', pgrelay.now())"),
    );
    rewrite(
        "insert into public.t default values",
        &format!("insert into public.t (id, created_at) VALUES ({SEQ_T}, pgrelay.now())"),
    );
    rewrite(
        "/* hi */ INSERT INTO t (name) -- list\nVALUES ('now()')  ;  SELECT 1",
        &format!("/* hi */ INSERT INTO t (name, id, created_at) -- list\nVALUES ('now()', {SEQ_T}, pgrelay.now())  ;  SELECT 1"),
    );
    rewrite(
        "INSERT INTO t (name) VALUES ('a') ON CONFLICT (name) DO UPDATE SET created_at = now()",
        &format!("INSERT INTO t (name, id, created_at) VALUES ('a', {SEQ_T}, pgrelay.now()) ON CONFLICT (name) DO UPDATE SET created_at = pgrelay.now()"),
    );
    rewrite(
        "INSERT INTO dates (x) VALUES (1)",
        "INSERT INTO dates (x, d) VALUES (1, (pgrelay.now())::date)",
    );
    rewrite(
        "INSERT INTO u (v) VALUES (1), (2)",
        "INSERT INTO u (v, id) VALUES (1, pgrelay.uuid()), (2, pgrelay.uuid())",
    );
    // Everything given: nothing to fill.
    keep("INSERT INTO t (id, name, created_at) VALUES (1, 'a', $1)");
    keep("INSERT INTO plain VALUES (1)");
    keep("INSERT INTO plain (a) VALUES (1), (2)");
    // A table the catalog does not know (quoted names keep their case).
    keep("INSERT INTO \"T\" (name) VALUES ('a')");
    keep("INSERT INTO app.items (label) VALUES ('x')");
}

#[test]
fn identity_columns_are_filled() {
    rewrite(
        "INSERT INTO a (x) VALUES (1), (2) RETURNING id",
        "INSERT INTO a (x, id) OVERRIDING SYSTEM VALUE VALUES (1, pgrelay.nextval('public.a_id_seq'::regclass)), (2, pgrelay.nextval('public.a_id_seq'::regclass)) RETURNING id",
    );
    rewrite(
        "INSERT INTO a (id, x) OVERRIDING SYSTEM VALUE VALUES (DEFAULT, 1)",
        "INSERT INTO a (id, x) OVERRIDING SYSTEM VALUE VALUES (pgrelay.nextval('public.a_id_seq'::regclass), 1)",
    );
    rewrite(
        "INSERT INTO a DEFAULT VALUES",
        "INSERT INTO a (id) OVERRIDING SYSTEM VALUE VALUES (pgrelay.nextval('public.a_id_seq'::regclass))",
    );
    rewrite(
        "INSERT INTO d (x) VALUES (1)",
        "INSERT INTO d (x, id) VALUES (1, pgrelay.nextval('public.d_id_seq'::regclass))",
    );
    // An explicit value for an ALWAYS identity without OVERRIDING: the server rejects it, and
    // pgrelay must not make it pass.
    keep("INSERT INTO a (id, x) VALUES (5, 1)");
    unsafe_(
        "INSERT INTO a (x) OVERRIDING USER VALUE VALUES (1)",
        "OVERRIDING USER VALUE",
    );
}

#[test]
fn quoted_and_qualified_tables() {
    rewrite(
        "INSERT INTO app.\"Items\" (label) VALUES ('x')",
        "INSERT INTO app.\"Items\" (label, \"Id\") VALUES ('x', pgrelay.nextval('app.\"Items_Id_seq\"'::regclass))",
    );
    let mut env = Env::new();
    env.path = vec!["nothere".into(), "app".into()];
    assert_eq!(
        env.run("INSERT INTO \"Items\" VALUES (DEFAULT, 'x')"),
        Outcome::Rewrite(
            "INSERT INTO \"Items\" VALUES (pgrelay.nextval('app.\"Items_Id_seq\"'::regclass), 'x')"
                .into()
        )
    );
    // Not in the search path.
    assert_eq!(env.run("INSERT INTO t (name) VALUES ('a')"), Outcome::Keep);
    assert_eq!(
        env.run("INSERT INTO \"Items\" (label) VALUES ('x')"),
        Outcome::Rewrite(
            "INSERT INTO \"Items\" (label, \"Id\") VALUES ('x', pgrelay.nextval('app.\"Items_Id_seq\"'::regclass))"
                .into()
        )
    );
}

#[test]
fn defaults_that_cannot_be_made_deterministic() {
    let reason = unsafe_("INSERT INTO c (x) VALUES (1)", "clock_timestamp()");
    assert!(
        reason.starts_with("column ts of public.c defaults to clock_timestamp()"),
        "{reason}"
    );
    unsafe_("INSERT INTO f (x) VALUES (1)", "my_volatile()");
    // Given explicitly: the default does not run.
    keep("INSERT INTO c (x, ts) VALUES (1, $1)");
    // INSERT ... SELECT: the time can be added to the select list, a sequence only when there
    // is a single row.
    rewrite(
        "INSERT INTO dates (x) SELECT a FROM plain WHERE a > $1 ON CONFLICT DO NOTHING",
        "INSERT INTO dates (x, d) SELECT a, (pgrelay.now())::date FROM plain WHERE a > $1 ON CONFLICT DO NOTHING",
    );
    rewrite(
        "INSERT INTO dates (x) SELECT DISTINCT a IS DISTINCT FROM 1 RETURNING d",
        "INSERT INTO dates (x, d) SELECT DISTINCT a IS DISTINCT FROM 1, (pgrelay.now())::date RETURNING d",
    );
    rewrite(
        "INSERT INTO t (name) SELECT 'a'",
        &format!("INSERT INTO t (name, id, created_at) SELECT 'a', {SEQ_T}, pgrelay.now()"),
    );
    rewrite(
        "INSERT INTO a (x) SELECT 1",
        "INSERT INTO a (x, id) OVERRIDING SYSTEM VALUE SELECT 1, pgrelay.nextval('public.a_id_seq'::regclass)",
    );
    unsafe_(
        "INSERT INTO dates (x) SELECT a FROM plain UNION SELECT 2",
        "public.dates.d",
    );
    unsafe_(
        "INSERT INTO dates (x) WITH q AS (SELECT 1) SELECT * FROM q",
        "public.dates.d",
    );
    let reason = unsafe_("INSERT INTO t (name) SELECT b FROM plain", "public.t.id");
    assert_eq!(
        reason,
        "INSERT ... SELECT into a table with a sequence or volatile default (id): the follower may number the rows in another order"
    );
    unsafe_("INSERT INTO t SELECT * FROM t", "public.t.id");
    rewrite(
        "INSERT INTO t (id, name) SELECT 1, b FROM plain",
        "INSERT INTO t (id, name, created_at) SELECT 1, b, pgrelay.now() FROM plain",
    );
    keep("INSERT INTO t (id, name, created_at) SELECT 1, b, $1 FROM plain");
    unsafe_(
        "MERGE INTO t USING plain ON t.name = plain.b WHEN NOT MATCHED THEN INSERT (name) VALUES (plain.b)",
        "public.t.id",
    );
}

#[test]
fn update_set_default() {
    rewrite(
        "UPDATE t SET created_at = DEFAULT WHERE id = 1",
        "UPDATE t SET created_at = pgrelay.now() WHERE id = 1",
    );
    unsafe_("UPDATE t SET id = DEFAULT", "public.t.id");
    unsafe_(
        "UPDATE t SET (name, created_at) = ('a', DEFAULT)",
        "DEFAULT in a multi-column SET",
    );
    keep("UPDATE plain SET (a, b) = (1, DEFAULT)");
    keep("UPDATE plain SET b = DEFAULT");
}

#[test]
fn rows_chosen_by_physical_order_or_locks_are_unsafe() {
    unsafe_(
        "DELETE FROM plain WHERE a IN (SELECT a FROM plain LIMIT 10)",
        "LIMIT without ORDER BY",
    );
    unsafe_(
        "UPDATE plain SET b = 'x' WHERE a = (SELECT a FROM plain ORDER BY a LIMIT 1 FOR UPDATE SKIP LOCKED)",
        "SKIP LOCKED",
    );
    unsafe_(
        "INSERT INTO plain (a) SELECT a FROM plain OFFSET 5",
        "OFFSET without ORDER BY",
    );
    unsafe_(
        "INSERT INTO plain SELECT * FROM plain TABLESAMPLE SYSTEM (10)",
        "TABLESAMPLE",
    );
    unsafe_(
        "CREATE TABLE z AS SELECT * FROM plain FETCH FIRST 3 ROWS ONLY",
        "FETCH FIRST without ORDER BY",
    );
    unsafe_(
        "SELECT a INTO z FROM plain LIMIT 1",
        "LIMIT without ORDER BY",
    );
    keep("DELETE FROM plain WHERE a IN (SELECT a FROM plain ORDER BY a LIMIT 10)");
    keep("INSERT INTO plain (a) SELECT a FROM plain ORDER BY a DESC LIMIT 1");
    keep("UPDATE plain SET b = (SELECT string_agg(b, ',' ORDER BY b) FROM plain)");
    // Reads may pick any rows.
    keep("SELECT * FROM plain LIMIT 1");
    keep("WITH x AS (SELECT * FROM plain LIMIT 1) SELECT * FROM x");
}

#[test]
fn reading_other_rows_needs_serialized_writes() {
    let mut env = Env::new();
    env.serialize = false;
    let unsafe_construct = |sql: &str| match env.run(sql) {
        Outcome::Unsafe(u) => {
            assert!(
                u.reason.starts_with("with serialize_writes = false"),
                "{sql}"
            );
            u.construct
        }
        other => panic!("{sql}: {other:?}"),
    };
    assert_eq!(
        unsafe_construct("UPDATE plain SET a = t.id FROM t WHERE t.name = plain.b"),
        "UPDATE reading other rows"
    );
    unsafe_construct("UPDATE plain SET a = (SELECT max(id) FROM t)");
    unsafe_construct("DELETE FROM plain USING t WHERE t.id = plain.a");
    unsafe_construct("DELETE FROM plain WHERE a IN (SELECT id FROM t)");
    unsafe_construct("INSERT INTO plain (a) SELECT id FROM t");
    unsafe_construct(
        "WITH x AS (DELETE FROM plain RETURNING a) INSERT INTO plain (a) SELECT a FROM x",
    );
    unsafe_construct("MERGE INTO plain USING t ON t.id = plain.a WHEN MATCHED THEN DELETE");
    unsafe_construct("SELECT a INTO newt FROM plain");
    for sql in [
        "UPDATE plain SET a = 1 WHERE b IS DISTINCT FROM 'x'",
        "DELETE FROM plain WHERE a = 1",
        "INSERT INTO plain (a) VALUES (1)",
        "INSERT INTO plain (a) SELECT 1",
        "UPDATE plain SET a = extract(year FROM $1::date)",
    ] {
        assert_eq!(env.run(sql), Outcome::Keep, "{sql}");
    }
    // With serialized writes they are fine.
    keep("UPDATE plain SET a = t.id FROM t WHERE t.name = plain.b");
    keep("DELETE FROM plain WHERE a IN (SELECT id FROM t)");
}

#[test]
fn temporary_tables_are_local() {
    for sql in [
        "INSERT INTO tmp VALUES (now(), random())",
        "INSERT INTO pg_temp.x (a) SELECT random() FROM plain",
        "UPDATE tmp SET a = clock_timestamp()",
        "UPDATE pg_temp.foo SET a = 1",
        "DELETE FROM ONLY tmp",
        "COPY tmp FROM STDIN",
        "TRUNCATE tmp",
        "TRUNCATE TABLE tmp, pg_temp.other",
        "DROP TABLE IF EXISTS tmp",
        "ALTER TABLE tmp ADD COLUMN ts timestamptz DEFAULT now()",
        "CREATE TEMP TABLE x (a int DEFAULT nextval('s'))",
        "CREATE TEMPORARY TABLE x AS SELECT random() FROM plain",
        "create global temporary table x (a int)",
        "CREATE TABLE pg_temp.x (a int)",
        "SELECT random() INTO TEMP x FROM plain",
        "BEGIN; INSERT INTO tmp VALUES (1); SELECT * FROM tmp; COMMIT",
        "WITH x AS (SELECT 1) INSERT INTO tmp SELECT * FROM x",
    ] {
        assert_eq!(run(sql), Outcome::Local, "{sql}");
    }
    assert_eq!(
        run("CREATE TEMP TABLE x (a int); INSERT INTO x VALUES (1); UPDATE x SET a = 2"),
        Outcome::Local
    );
    // A quoted name keeps its case: "TMP" is not tmp.
    keep("INSERT INTO \"TMP\" VALUES (1)");
    keep("TRUNCATE plain");
    unsafe_(
        "TRUNCATE tmp, plain",
        "temporary and replicated tables in one statement",
    );
    unsafe_(
        "INSERT INTO tmp VALUES (1); INSERT INTO plain VALUES (1)",
        "temporary and replicated tables in one query string",
    );
}

#[test]
fn temp_table_names() {
    assert_eq!(
        temp_table_created("CREATE TEMP TABLE Foo (a int)"),
        Some("foo".into())
    );
    assert_eq!(
        temp_table_created("create temporary table if not exists \"Bar\" (a int)"),
        Some("Bar".into())
    );
    assert_eq!(
        temp_table_created("CREATE LOCAL TEMP TABLE x AS SELECT 1"),
        Some("x".into())
    );
    assert_eq!(
        temp_table_created("CREATE TABLE pg_temp.y (a int)"),
        Some("y".into())
    );
    assert_eq!(
        temp_table_created("SET search_path = public; CREATE TEMP TABLE z (a int)"),
        Some("z".into())
    );
    assert_eq!(temp_table_created("CREATE TABLE t (a int)"), None);
    assert_eq!(temp_table_created("CREATE TEMP VIEW v AS SELECT 1"), None);
    assert_eq!(temp_table_created("CREATE TEMP TABLE 'broken"), None);
}

#[test]
fn dropped_temp_tables_are_forgotten() {
    let mut temp: HashSet<String> = ["a", "b", "c", "Q"].iter().map(|s| s.to_string()).collect();
    forget_temp_tables(
        "DROP TABLE IF EXISTS a, pg_temp.b CASCADE; DROP TABLE \"Q\"",
        &mut temp,
    );
    assert_eq!(temp, HashSet::from(["c".to_owned()]));
    forget_temp_tables("DROP TABLE public.c; DROP VIEW c", &mut temp);
    assert_eq!(temp.len(), 1);
    forget_temp_tables("DISCARD TEMP", &mut temp);
    assert!(temp.is_empty());
}

#[test]
fn ddl() {
    keep("CREATE TABLE z (id serial, ts timestamptz DEFAULT now(), u uuid DEFAULT gen_random_uuid())");
    keep("ALTER TABLE plain ALTER COLUMN b SET DEFAULT now()");
    keep("ALTER TABLE plain ADD COLUMN n int DEFAULT 0 NOT NULL, ADD CONSTRAINT c CHECK (a > 0)");
    keep("CREATE FUNCTION f() RETURNS timestamptz LANGUAGE sql AS $$ SELECT now() $$");
    keep("DROP TABLE plain");
    let reason = unsafe_(
        "ALTER TABLE plain ADD COLUMN ts timestamptz DEFAULT now() NOT NULL",
        "DEFAULT now()",
    );
    assert!(reason.contains("existing rows"), "{reason}");
    unsafe_("ALTER TABLE plain ADD COLUMN id bigserial", "bigserial");
    unsafe_(
        "ALTER TABLE plain ADD COLUMN n text DEFAULT coalesce(NULL, now()::text) NOT NULL",
        "DEFAULT coalesce(NULL, now()::text)",
    );
    unsafe_(
        "ALTER TABLE plain ADD id int GENERATED ALWAYS AS IDENTITY",
        "GENERATED AS IDENTITY",
    );
    unsafe_(
        "alter table if exists only plain add column u uuid default gen_random_uuid()",
        "DEFAULT gen_random_uuid()",
    );
    rewrite(
        "ALTER TABLE plain ALTER COLUMN b TYPE timestamptz USING now()",
        "ALTER TABLE plain ALTER COLUMN b TYPE timestamptz USING pgrelay.now()",
    );
    rewrite(
        "CREATE TABLE z AS SELECT now() AS ts, nextval('s') AS id",
        "CREATE TABLE z AS SELECT pgrelay.now() AS ts, pgrelay.nextval('s') AS id",
    );
    rewrite(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS mv AS SELECT a, CURRENT_DATE FROM plain WITH NO DATA",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS mv AS SELECT a, (pgrelay.now())::date FROM plain WITH NO DATA",
    );
    unsafe_(
        "CREATE MATERIALIZED VIEW mv AS SELECT random() FROM plain",
        "random()",
    );
    rewrite("SELECT now() INTO z2", "SELECT pgrelay.now() INTO z2");
    keep("REFRESH MATERIALIZED VIEW mv");
}

#[test]
fn do_blocks_and_procedures() {
    keep("DO $$BEGIN INSERT INTO plain VALUES (1); PERFORM pg_notify('c', 'x'); END$$");
    let reason = unsafe_("DO $$BEGIN UPDATE plain SET b = now(); END$$", "now()");
    assert!(reason.starts_with("a DO block calls now()"), "{reason}");
    unsafe_("DO 'BEGIN PERFORM my_volatile(); END'", "my_volatile()");
    unsafe_(
        "DO $do$ BEGIN EXECUTE 'UPDATE plain SET b = CURRENT_DATE'; END $do$",
        "CURRENT_DATE",
    );
    unsafe_(
        "DO $$BEGIN INSERT INTO t (name) VALUES ('x'); END$$",
        "public.t.id",
    );
    keep("DO $$BEGIN INSERT INTO t (id, name, created_at) VALUES (1, 'x', $1); END$$");
    unsafe_("DO LANGUAGE plpython3u $$ import random $$", "a DO block");
    keep("CALL p_ok()");
    unsafe_("CALL p_bad()", "now()");
    unsafe_("CALL public.p_c(1)", "procedure p_c");
    rewrite(
        "CALL p_ok(now(), nextval('s'))",
        "CALL p_ok(pgrelay.now(), pgrelay.nextval('s'))",
    );
    unsafe_("DO $$BEGIN CALL p_bad(); END$$", "now()");
}

#[test]
fn triggers_are_checked() {
    let reason = unsafe_("INSERT INTO trg (a) VALUES (1)", "now()");
    assert!(
        reason.starts_with("trigger stamp on public.trg calls now()"),
        "{reason}"
    );
    unsafe_("UPDATE trg SET a = 2", "now()");
    unsafe_("DELETE FROM public.trg", "now()");
    unsafe_("COPY trg FROM STDIN", "now()");
    unsafe_(
        "WITH x AS (UPDATE trg SET a = 1 RETURNING a) SELECT * FROM x",
        "now()",
    );
    assert_eq!(
        run("WITH x AS (DELETE FROM tmp RETURNING a) DELETE FROM pg_temp.y"),
        Outcome::Local
    );
    unsafe_(
        "INSERT INTO trg2 (a) VALUES (1)",
        "trigger c_trigger on public.trg2",
    );
    keep("INSERT INTO trg3 (a) VALUES (1)");
    keep("UPDATE trg3 SET a = 2");
    // Temporary tables never reach the check.
    let mut env = Env::new();
    env.temp.insert("trg".into());
    assert_eq!(env.run("INSERT INTO trg (a) VALUES (1)"), Outcome::Local);
}

#[test]
fn views_and_foreign_tables() {
    unsafe_("INSERT INTO v (a) VALUES (1)", "public.v");
    unsafe_("COPY v FROM STDIN", "public.v");
    keep("UPDATE v SET a = 1");
    unsafe_("UPDATE ft SET a = 1", "public.ft");
    unsafe_("DELETE FROM public.ft", "public.ft");
    unsafe_("INSERT INTO ft VALUES (1)", "public.ft");
    let mut env = Env::new();
    env.path = vec!["shadow".into(), "shadow2".into()];
    assert!(
        matches!(env.run("INSERT INTO t (a) VALUES (1)"), Outcome::Unsafe(u) if u.construct == "shadow.t")
    );
    env.path = vec!["shadow2".into(), "shadow".into()];
    assert_eq!(
        env.run("INSERT INTO t (a) VALUES (1)"),
        Outcome::Rewrite("INSERT INTO t (a, id) VALUES (1, pgrelay.nextval('x'::regclass))".into())
    );
}

#[test]
fn copy() {
    keep("COPY plain FROM STDIN");
    keep("COPY t (id, name, created_at) FROM STDIN WITH (FORMAT csv)");
    keep("COPY t TO STDOUT");
    keep("COPY (SELECT now()) TO STDOUT");
    let reason = unsafe_("COPY t (name) FROM STDIN", "public.t.id");
    assert!(
        reason.starts_with("COPY into a table whose column id"),
        "{reason}"
    );
    unsafe_(
        "COPY plain FROM '/tmp/x.csv'",
        "COPY ... FROM a file or program",
    );
    unsafe_(
        "COPY plain FROM PROGRAM 'cat x'",
        "COPY ... FROM a file or program",
    );
}

#[test]
fn prepared_and_explained_statements() {
    rewrite(
        "PREPARE ins (text) AS INSERT INTO t (name) VALUES ($1)",
        &format!("PREPARE ins (text) AS INSERT INTO t (name, id, created_at) VALUES ($1, {SEQ_T}, pgrelay.now())"),
    );
    rewrite("EXECUTE ins(now())", "EXECUTE ins(pgrelay.now())");
    rewrite(
        "EXPLAIN (ANALYZE, COSTS off) UPDATE plain SET b = now()",
        "EXPLAIN (ANALYZE, COSTS off) UPDATE plain SET b = pgrelay.now()",
    );
    keep("EXPLAIN UPDATE plain SET a = random()");
}

#[test]
fn several_statements() {
    rewrite(
        "BEGIN; INSERT INTO u (v) VALUES (1);\nUPDATE plain SET b = now()::text; COMMIT;",
        "BEGIN; INSERT INTO u (v, id) VALUES (1, pgrelay.uuid());\nUPDATE plain SET b = pgrelay.now()::text; COMMIT;",
    );
    unsafe_("SELECT now(); UPDATE plain SET a = random()", "random()");
    keep("BEGIN; SET LOCAL x = 1; UPDATE plain SET a = 1; COMMIT");
    keep("");
    keep("  -- only a comment");
}

#[test]
fn writable_ctes() {
    // The only INSERT of the query: its VALUES run once, in order.
    rewrite(
        "WITH x AS (INSERT INTO t (name) VALUES ('a') RETURNING id) SELECT id, now() FROM x",
        &format!("WITH x AS (INSERT INTO t (name, id, created_at) VALUES ('a', {SEQ_T}, pgrelay.now()) RETURNING id) SELECT id, pgrelay.now() FROM x"),
    );
    // The time is added to the main INSERT's select list.
    rewrite(
        "WITH x AS (SELECT 1 AS a) INSERT INTO dates (x) SELECT a FROM x",
        "WITH x AS (SELECT 1 AS a) INSERT INTO dates (x, d) SELECT a, (pgrelay.now())::date FROM x",
    );
    let reason = unsafe_(
        "WITH x AS (SELECT 1 AS a) INSERT INTO dates (x) SELECT a FROM x UNION SELECT 1",
        "public.dates.d",
    );
    assert_eq!(
        reason,
        "INSERT in a WITH query into a table whose column d defaults to CURRENT_DATE: pgrelay cannot fill it in; list the column and give it CURRENT_DATE explicitly"
    );
    // Two writes run in no fixed order.
    unsafe_(
        "WITH x AS (INSERT INTO t (name) VALUES ('a') RETURNING id) INSERT INTO u (v) VALUES (1)",
        "public.t.id",
    );
    unsafe_(
        "WITH x AS (UPDATE plain SET a = 1 RETURNING a) SELECT nextval('s')",
        "nextval()",
    );
    keep("WITH x AS (DELETE FROM plain RETURNING a) INSERT INTO plain (a) SELECT a + 1 FROM x");
}

#[test]
fn text_that_does_not_lex_is_kept() {
    keep("INSERT INTO t VALUES ('unterminated");
    keep("SELECT now() /* unterminated");
}

#[test]
fn backslashes_that_change_the_meaning_are_unsafe() {
    unsafe_("SELECT 'a\\', now() -- '", "a backslash in a '...' string");
    // Both readings give the same rewrite.
    rewrite("SELECT 'a\\b', now()", "SELECT 'a\\b', pgrelay.now()");
}

#[test]
fn unicode_escaped_function_names_are_unsafe() {
    unsafe_("SELECT U&\"r\\0061ndom\"()", "U&\"r\\0061ndom\"");
    keep("SELECT \"NOW\"()");
}

#[test]
fn never_panics_on_prefixes() {
    let env = Env::new();
    let samples = [
        "INSERT INTO t (id, name) VALUES (DEFAULT, 'a'), (7, 'b') ON CONFLICT (name) DO UPDATE SET created_at = now() RETURNING id",
        "INSERT INTO a DEFAULT VALUES; INSERT INTO app.\"Items\" AS i VALUES (DEFAULT, $1)",
        "WITH x AS (INSERT INTO t (name) VALUES ('a') RETURNING id) SELECT CURRENT_TIMESTAMP(3) FROM x",
        "ALTER TABLE ONLY plain ADD COLUMN ts timestamptz DEFAULT now(), ALTER b TYPE int USING random()",
        "DO $x$ BEGIN EXECUTE 'SELECT ''now''::date'; CALL p_ok(); END $x$",
        "EXPLAIN ANALYZE PREPARE p AS EXECUTE q(nextval('s'))",
        "COPY t (name) FROM STDIN; MERGE INTO t USING plain ON true WHEN NOT MATCHED THEN INSERT VALUES (1)",
        "UPDATE t SET (a, b) = (DEFAULT, now()) FROM (SELECT 1) s; DELETE FROM t USING",
        "CREATE TEMP TABLE IF NOT EXISTS x AS SELECT; TRUNCATE ONLY",
    ];
    for sql in samples {
        for end in 0..=sql.len() {
            if let Some(prefix) = sql.get(..end) {
                let _ = env.run(prefix);
                let _ = temp_table_created(prefix);
            }
        }
    }
}

#[test]
fn never_panics_on_token_soup() {
    const WORDS: &[&str] = &[
        "INSERT",
        "INTO",
        "t",
        "a",
        "tmp",
        "VALUES",
        "DEFAULT",
        "SELECT",
        "FROM",
        "WITH",
        "AS",
        "UPDATE",
        "SET",
        "DELETE",
        "USING",
        "MERGE",
        "WHEN",
        "THEN",
        "COPY",
        "STDIN",
        "CREATE",
        "TEMP",
        "TABLE",
        "ALTER",
        "ADD",
        "COLUMN",
        "DO",
        "CALL",
        "EXECUTE",
        "PREPARE",
        "EXPLAIN",
        "ANALYZE",
        "now",
        "random",
        "nextval",
        "CURRENT_TIMESTAMP",
        "OVERRIDING",
        "SYSTEM",
        "VALUE",
        "(",
        ")",
        "(",
        ")",
        ",",
        ";",
        ".",
        "=",
        "::",
        "'now'",
        "$1",
        "1",
        "\"Items\"",
        "app",
        "$$ BEGIN now(); END $$",
        "pg_temp",
        "RETURNING",
        "ON",
        "CONFLICT",
        "INTO",
        "serial",
    ];
    let env = Env::new();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) as usize
    };
    for _ in 0..5000 {
        let n = next() % 40;
        let sql: Vec<&str> = (0..n).map(|_| WORDS[next() % WORDS.len()]).collect();
        let sql = sql.join(" ");
        let _ = env.run(&sql);
        let _ = temp_table_created(&sql);
    }
}

#[test]
fn large_statements_take_linear_time() {
    let started = std::time::Instant::now();
    let rows = vec!["('a')"; 20_000].join(", ");
    let out = run(&format!("INSERT INTO t (name) VALUES {rows}"));
    assert!(matches!(out, Outcome::Rewrite(s) if s.matches("pgrelay.now()").count() == 20_000));
    let deep = format!("SELECT {}now(){}", "(".repeat(20_000), ")".repeat(20_000));
    assert!(matches!(run(&deep), Outcome::Rewrite(_)));
    let defaults = format!(
        "UPDATE t SET {}",
        vec!["created_at = DEFAULT"; 5_000].join(", ")
    );
    assert!(matches!(run(&defaults), Outcome::Rewrite(_)));
    let adds = format!(
        "ALTER TABLE plain ADD COLUMN c int {}",
        "DEFAULT 0 ".repeat(5_000)
    );
    assert_eq!(run(&adds), Outcome::Keep);
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

#[test]
fn catalog_changes() {
    assert!(affects_catalog("CREATE TABLE x (a int)"));
    assert!(affects_catalog(
        "BEGIN; ALTER TABLE t ADD COLUMN b int; COMMIT"
    ));
    assert!(affects_catalog("drop function f"));
    assert!(affects_catalog(
        "CREATE OR REPLACE TRIGGER x BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()"
    ));
    assert!(affects_catalog("SELECT 1 INTO newt"));
    assert!(!affects_catalog("CREATE TEMP TABLE x (a int)"));
    assert!(!affects_catalog(
        "INSERT INTO t VALUES (1); SELECT 'CREATE TABLE'"
    ));
    assert!(!affects_catalog("SELECT 'unterminated"));
}
