//! The statement log: what a session writes on the leader next to the client's own changes,
//! and what a replayer reads back and runs on a follower.
//!
//! Every database pgrelay replicates in statement mode has, on the leader, a schema `pgrelay`
//! with the table `pgrelay.statement_log` (one row per committed leader transaction that wrote
//! through pgrelay) and its sequence `pgrelay.statement_seq`. The session inserts the row just
//! before the client's COMMIT, after taking the ordering lock ([`ORDER_LOCK`]) with
//! `pg_advisory_xact_lock`; the lock is held until the commit, so `seq` order is commit order.
//! A transaction that takes a `seq` and then fails to commit leaves a gap; any snapshot that
//! sees a later `seq` also sees every committed earlier one (the lock is released after the
//! commit became visible), so a replayer that applies what it sees, in `seq` order, never
//! skips a committed entry.
//!
//! The functions in [`FUNCTIONS_SQL`] exist on the leader and on every follower. Statements
//! are rewritten to call them instead of their non-deterministic originals:
//! - `pgrelay.now()` returns the transaction's time chosen by pgrelay (setting `pgrelay.now`);
//! - `pgrelay.random()`, `pgrelay.uuid()` and `pgrelay.nextval(regclass)` produce a value on
//!   the leader and append it to the transaction-local setting `pgrelay.values`; on a follower,
//!   where the replayer sets `pgrelay.replaying = on` and `pgrelay.replay_values` to what the
//!   leader recorded, they hand the recorded values out in the same order instead
//!   (`pgrelay.nextval` also moves the follower's sequence to the leader's value, through
//!   `pgrelay.replay_setval`, which runs with its owner's rights, so a role with just USAGE on
//!   a sequence replays, but only for a session user with USAGE or UPDATE on it, and only
//!   forward, as far as `nextval` could have taken it anyway). A replay that
//!   asks for more values than were recorded fails loudly rather than making one up.
//!   Values set with `set_config(..., true)` are undone by `ROLLBACK TO SAVEPOINT`, like the
//!   statements pgrelay drops from the log then.

/// Key of the transaction-level advisory lock that orders commits that write through pgrelay
/// (`pg_advisory_xact_lock`): "pgrelay" in ASCII, then 1.
pub const ORDER_LOCK: i64 = 0x7067_7265_6c61_7901;
/// Key of the session-level advisory lock a replayer holds on a follower database
/// (`pg_try_advisory_lock`), so that one pgrelay process replays into it at a time.
pub const REPLAYER_LOCK: i64 = 0x7067_7265_6c61_7902;
/// Key of the transaction-level advisory lock around the setup of the log on the leader.
pub const SETUP_LOCK: i64 = 0x7067_7265_6c61_7903;

/// `source` of statement mode's row in `pgrelay.applied` on a follower.
pub const APPLIED_SOURCE: &str = "statement";

/// Creates the functions pgrelay's rewritten statements call (leader and followers).
pub const FUNCTIONS_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS pgrelay;
GRANT USAGE ON SCHEMA pgrelay TO PUBLIC;
CREATE OR REPLACE FUNCTION pgrelay.now() RETURNS timestamptz LANGUAGE sql STABLE AS
$f$ SELECT coalesce(nullif(pg_catalog.current_setting('pgrelay.now', true), '')::timestamptz, pg_catalog.now()) $f$;
CREATE OR REPLACE FUNCTION pgrelay.take_value(produced text) RETURNS text LANGUAGE plpgsql VOLATILE AS
$f$
DECLARE
  queue text;
  v text;
BEGIN
  IF pg_catalog.current_setting('pgrelay.replaying', true) = 'on' THEN
    queue := pg_catalog.current_setting('pgrelay.replay_values', true);
    IF queue IS NULL OR queue = '' THEN
      RAISE EXCEPTION 'pgrelay: the replayed statement asks for more generated values than the leader recorded'
        USING ERRCODE = 'XX000';
    END IF;
    v := pg_catalog.split_part(queue, ',', 1);
    PERFORM pg_catalog.set_config('pgrelay.replay_values', pg_catalog.substr(queue, pg_catalog.length(v) + 2), true);
    RETURN v;
  END IF;
  PERFORM pg_catalog.set_config('pgrelay.values',
    coalesce(pg_catalog.current_setting('pgrelay.values', true), '') || produced || ',', true);
  RETURN produced;
END
$f$;
CREATE OR REPLACE FUNCTION pgrelay.random() RETURNS double precision LANGUAGE sql VOLATILE AS
$f$ SELECT pgrelay.take_value(pg_catalog.floor(pg_catalog.random() * 4503599627370496)::bigint::text)::bigint / 4503599627370496.0::double precision $f$;
CREATE OR REPLACE FUNCTION pgrelay.uuid() RETURNS uuid LANGUAGE sql VOLATILE AS
$f$ SELECT pgrelay.take_value(pg_catalog.gen_random_uuid()::text)::uuid $f$;
CREATE OR REPLACE FUNCTION pgrelay.replay_setval(seq regclass, v bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS
$f$
DECLARE
  step bigint;
  last bigint;
  called boolean;
BEGIN
  IF NOT pg_catalog.has_sequence_privilege(session_user, seq, 'USAGE, UPDATE') THEN
    RAISE EXCEPTION 'permission denied for sequence %', seq USING ERRCODE = '42501';
  END IF;
  SELECT seqincrement INTO step FROM pg_catalog.pg_sequence WHERE seqrelid = seq;
  EXECUTE pg_catalog.format('SELECT last_value, is_called FROM %s', seq) INTO last, called;
  -- Only forward, in the sequence's own direction: no further than nextval() could take it.
  IF (step > 0 AND (v > last OR (v = last AND NOT called)))
     OR (step < 0 AND (v < last OR (v = last AND NOT called))) THEN
    PERFORM pg_catalog.setval(seq, v, true);
  END IF;
  RETURN v;
END
$f$;
CREATE OR REPLACE FUNCTION pgrelay.nextval(seq regclass) RETURNS bigint LANGUAGE plpgsql VOLATILE AS
$f$
DECLARE
  v bigint;
BEGIN
  IF pg_catalog.current_setting('pgrelay.replaying', true) = 'on' THEN
    v := pgrelay.take_value(NULL)::bigint;
    PERFORM pgrelay.replay_setval(seq, v);
    RETURN v;
  END IF;
  RETURN pgrelay.take_value(pg_catalog.nextval(seq)::text)::bigint;
END
$f$;
"#;

/// Creates the log on the leader (with the functions), under [`SETUP_LOCK`], in one
/// transaction: safe when several sessions or pgrelay processes race. No other role may read
/// or write the log or its sequence: sessions log through `pgrelay.log_append`, which runs
/// with its owner's rights (pgrelay's replication user), takes the ordering lock and the next
/// `seq` itself and records the inserting session's user as `role`, so an entry replays with
/// no more rights than its author had on the leader, and nobody can choose its `seq`.
/// Earlier versions' trigger and grants to PUBLIC are removed.
pub fn leader_setup_sql() -> String {
    format!(
        "BEGIN; SELECT pg_catalog.pg_advisory_xact_lock({SETUP_LOCK}); {FUNCTIONS_SQL};
CREATE SEQUENCE IF NOT EXISTS pgrelay.statement_seq;
CREATE TABLE IF NOT EXISTS pgrelay.statement_log (
  seq bigint PRIMARY KEY,
  logged_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
  role name NOT NULL,
  settings jsonb NOT NULL,
  statements jsonb NOT NULL,
  gen_values text,
  copy_data bytea[]);
DROP TRIGGER IF EXISTS statement_log_role ON pgrelay.statement_log;
DROP FUNCTION IF EXISTS pgrelay.statement_log_role();
REVOKE ALL ON pgrelay.statement_log FROM PUBLIC;
REVOKE ALL ON SEQUENCE pgrelay.statement_seq FROM PUBLIC;
CREATE OR REPLACE FUNCTION pgrelay.log_append(settings jsonb, statements jsonb, gen_values text,
  copy_data bytea[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS
$f$
DECLARE
  s bigint;
BEGIN
  PERFORM pg_catalog.pg_advisory_xact_lock({ORDER_LOCK});
  s := pg_catalog.nextval('pgrelay.statement_seq');
  INSERT INTO pgrelay.statement_log (seq, role, settings, statements, gen_values, copy_data)
    VALUES (s, session_user, settings, statements, gen_values, copy_data);
  RETURN s;
END
$f$;
REVOKE ALL ON FUNCTION pgrelay.log_append(jsonb, jsonb, text, bytea[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgrelay.log_append(jsonb, jsonb, text, bytea[]) TO PUBLIC;
COMMIT"
    )
}

/// The log entry a session appends just before the client's COMMIT (extended protocol;
/// parameters: `$1` settings, `$2` statements, both JSON text; `$3` the COPY data as
/// `bytea[]` text or NULL). It returns the entry's `seq` (column `seq`), the commit's
/// position. The settings in force that change how text is read (time zone, date style,
/// search path, string escapes, ...: the database's and role's defaults count too) and the
/// transaction's time (`pgrelay.now()`, the leader's `now()` unless pgrelay set it) join the
/// settings, so the replay reads the statements as the leader did.
pub const INSERT_SQL: &str = "SELECT pgrelay.log_append( \
     $1::jsonb || (SELECT pg_catalog.jsonb_agg(pg_catalog.format( \
     'SELECT pg_catalog.set_config(%L, %L, true)', n, pg_catalog.current_setting(n))) \
     FROM pg_catalog.unnest(ARRAY['TimeZone', 'DateStyle', 'IntervalStyle', 'search_path', \
     'standard_conforming_strings', 'extra_float_digits', 'bytea_output']) AS n) \
     || pg_catalog.jsonb_build_array('SET LOCAL pgrelay.now = ' || pg_catalog.quote_literal( \
     pg_catalog.to_char(pgrelay.now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00')), $2::jsonb, \
     nullif(pg_catalog.current_setting('pgrelay.values', true), ''), $3::bytea[]) AS seq";

/// Takes the ordering lock (sent before the first write when `serialize_writes` is on, else
/// right before [`INSERT_SQL`]).
pub fn order_lock_sql() -> String {
    format!("SELECT pg_catalog.pg_advisory_xact_lock({ORDER_LOCK})")
}

/// One statement of a logged transaction, as stored in the `statements` JSON array.
///
/// JSON form: `{"sql": "..."}` for a simple-protocol query string (it may hold several
/// statements); for an extended-protocol statement also `"types"` (parameter type OIDs, as
/// in Parse), `"formats"` (parameter format codes, as in Bind) and `"params"` (each value as
/// lowercase hex of its bytes, or null). A COPY ... FROM STDIN has `"copy": i`, the index
/// (from 1) of its data in the entry's `copy_data` array.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoggedStatement {
    pub sql: String,
    /// Extended protocol: Some, even with no parameters.
    pub extended: Option<Extended>,
    pub copy: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Extended {
    pub types: Vec<u32>,
    pub formats: Vec<i16>,
    pub params: Vec<Option<Vec<u8>>>,
}

/// Quotes `text` as a JSON string.
pub fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        for d in [b >> 4, b & 15] {
            out.push(char::from(
                DIGITS.get(usize::from(d)).copied().unwrap_or(b'0'),
            ));
        }
    }
}

/// Encodes statements as the JSON array stored in `statements`.
pub fn encode_statements(statements: &[LoggedStatement]) -> String {
    let mut out = String::from("[");
    for (i, s) in statements.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"sql\":");
        json_string(&mut out, &s.sql);
        if let Some(e) = &s.extended {
            out.push_str(",\"types\":[");
            for (j, t) in e.types.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                out.push_str(&t.to_string());
            }
            out.push_str("],\"formats\":[");
            for (j, f) in e.formats.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                out.push_str(&f.to_string());
            }
            out.push_str("],\"params\":[");
            for (j, p) in e.params.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                match p {
                    Some(v) => {
                        out.push('"');
                        hex(&mut out, v);
                        out.push('"');
                    }
                    None => out.push_str("null"),
                }
            }
            out.push(']');
        }
        if let Some(c) = s.copy {
            out.push_str(&format!(",\"copy\":{c}"));
        }
        out.push('}');
    }
    out.push(']');
    out
}

/// Encodes settings (SQL statements run at the start of the replayed transaction, each a
/// `SET LOCAL ...` or `SELECT set_config(..., true)`) as the JSON array stored in `settings`.
pub fn encode_settings(settings: &[String]) -> String {
    let mut out = String::from("[");
    for (i, s) in settings.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(&mut out, s);
    }
    out.push(']');
    out
}

/// Encodes COPY data blocks as the text form of a `bytea[]`, for [`INSERT_SQL`]'s `$3`.
pub fn encode_copy_data(blocks: &[Vec<u8>]) -> String {
    let mut out = String::from("{");
    for (i, b) in blocks.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("\"\\\\x");
        hex(&mut out, b);
        out.push('"');
    }
    out.push('}');
    out
}

/// A statement as it reads from the JSON (see [`LoggedStatement`]).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonStatement {
    sql: String,
    types: Option<Vec<u32>>,
    formats: Option<Vec<i16>>,
    params: Option<Vec<Option<String>>>,
    copy: Option<usize>,
}

/// Decodes lowercase (or uppercase) hex.
pub fn unhex(text: &str) -> Result<Vec<u8>, String> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("{:?} is not a hex digit", char::from(c))),
    };
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    bytes
        .chunks_exact(2)
        .map(|pair| match pair {
            [hi, lo] => Ok((digit(*hi)? << 4) | digit(*lo)?),
            _ => Err("odd number of hex digits".into()),
        })
        .collect()
}

/// Decodes the `statements` JSON array ([`encode_statements`] in reverse; any JSON spelling
/// of it, such as `jsonb`'s output, is accepted).
pub fn decode_statements(json: &str) -> Result<Vec<LoggedStatement>, String> {
    let raw: Vec<JsonStatement> =
        serde_json::from_str(json).map_err(|e| format!("statements: {e}"))?;
    raw.into_iter()
        .enumerate()
        .map(|(i, s)| {
            let extended = match (s.types, s.formats, s.params) {
                (None, None, None) => None,
                (types, formats, params) => Some(Extended {
                    types: types.unwrap_or_default(),
                    formats: formats.unwrap_or_default(),
                    params: params
                        .unwrap_or_default()
                        .iter()
                        .map(|p| p.as_deref().map(unhex).transpose())
                        .collect::<Result<_, _>>()
                        .map_err(|e| format!("statement {}: parameter: {e}", i + 1))?,
                }),
            };
            Ok(LoggedStatement {
                sql: s.sql,
                extended,
                copy: s.copy,
            })
        })
        .collect()
}

/// Decodes the `settings` JSON array of SQL strings.
pub fn decode_settings(json: &str) -> Result<Vec<String>, String> {
    serde_json::from_str(json).map_err(|e| format!("settings: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_and_settings_decode_what_was_encoded() {
        let s = vec![
            LoggedStatement {
                sql: "INSERT INTO t VALUES ('\u{e9}\"\\\n\u{1}')".into(),
                ..Default::default()
            },
            LoggedStatement {
                sql: "SELECT $1, $2".into(),
                extended: Some(Extended {
                    types: vec![17, 0],
                    formats: vec![1, 0],
                    params: vec![Some(vec![0, 0xff, 0x10]), None],
                }),
                copy: None,
            },
            LoggedStatement {
                sql: "SELECT 1".into(),
                extended: Some(Extended::default()),
                copy: None,
            },
            LoggedStatement {
                sql: "COPY t FROM STDIN".into(),
                extended: None,
                copy: Some(2),
            },
        ];
        assert_eq!(decode_statements(&encode_statements(&s)), Ok(s));
        // jsonb's own output: spaces, keys reordered.
        assert_eq!(
            decode_statements(r#"[{"sql": "x", "params": ["0A"], "formats": [], "types": [25]}]"#),
            Ok(vec![LoggedStatement {
                sql: "x".into(),
                extended: Some(Extended {
                    types: vec![25],
                    formats: vec![],
                    params: vec![Some(vec![10])],
                }),
                copy: None,
            }])
        );
        let settings = vec!["SET LOCAL pgrelay.now = '2020-01-01 00:00:00+00'".to_owned()];
        assert_eq!(decode_settings(&encode_settings(&settings)), Ok(settings));
        assert!(decode_statements(r#"[{"sql": "x", "params": ["zz"]}]"#).is_err());
        assert!(decode_statements(r#"[{"query": "x"}]"#).is_err());
        assert!(decode_settings("{}").is_err());
    }

    #[test]
    fn statements_encode_as_json() {
        let s = vec![
            LoggedStatement {
                sql: "INSERT INTO t VALUES ('a\"b\\c\n')".into(),
                ..Default::default()
            },
            LoggedStatement {
                sql: "UPDATE t SET a = $1 WHERE b = $2".into(),
                extended: Some(Extended {
                    types: vec![23, 0],
                    formats: vec![0],
                    params: vec![Some(b"42".to_vec()), None],
                }),
                copy: None,
            },
            LoggedStatement {
                sql: "COPY t FROM STDIN".into(),
                extended: None,
                copy: Some(1),
            },
        ];
        assert_eq!(
            encode_statements(&s),
            r#"[{"sql":"INSERT INTO t VALUES ('a\"b\\c\n')"},{"sql":"UPDATE t SET a = $1 WHERE b = $2","types":[23,0],"formats":[0],"params":["3432",null]},{"sql":"COPY t FROM STDIN","copy":1}]"#
        );
        assert_eq!(
            encode_settings(&["SET LOCAL a = 1".into()]),
            r#"["SET LOCAL a = 1"]"#
        );
        assert_eq!(encode_copy_data(&[b"1\n".to_vec()]), r#"{"\\x310a"}"#);
    }
}
