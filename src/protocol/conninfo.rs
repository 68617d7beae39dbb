//! libpq connection strings (`host=... port=... dbname=...`) for the external programs pgrelay
//! runs (`pg_dump`, `psql`, `pg_basebackup`).
//! <https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-KEYWORD-VALUE>
//!
//! A database, role or host name never reaches a program as a bare argument: libpq reads a
//! `-d` value that looks like a connection string (`host=elsewhere port=5432`) or a URI
//! (`postgresql://...`) as one, so a database named like that, which any role with CREATEDB can
//! create, would send pgrelay's replication user and its `PGPASSWORD` to another server. Every
//! value goes into one connection string, quoted: libpq expands only the outer `dbname`, so a
//! quoted value inside it is just a value (Postgres's own tools do the same since CVE-2016-5424).

/// A value that cannot go into a connection string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnInfoError {
    /// C strings end at a NUL byte: libpq would silently read another value.
    #[error("the {keyword} {value:?} contains a NUL byte and cannot be passed to libpq")]
    Nul {
        keyword: &'static str,
        value: String,
    },
}

/// Builds `keyword='value' ...` from `pairs`, every value quoted. The keywords are pgrelay's
/// own (`host`, `port`, `user`, `dbname`, `application_name`), never input.
pub fn conninfo(pairs: &[(&'static str, &str)]) -> Result<String, ConnInfoError> {
    let mut out = String::new();
    for (keyword, value) in pairs {
        if value.contains('\0') {
            return Err(ConnInfoError::Nul {
                keyword,
                value: value.replace('\0', "\\0"),
            });
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(keyword);
        out.push('=');
        push_quoted(&mut out, value);
    }
    Ok(out)
}

/// The connection string of one database on one server, as one user.
pub fn database(host: &str, port: u16, user: &str, dbname: &str) -> Result<String, ConnInfoError> {
    conninfo(&[
        ("host", host),
        ("port", &port.to_string()),
        ("user", user),
        ("dbname", dbname),
    ])
}

/// `'value'` with `\` and `'` escaped by a backslash, as libpq's `conninfo_parse` reads it.
fn push_quoted(out: &mut String, value: &str) {
    out.push('\'');
    for c in value.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_and_escaped() {
        assert_eq!(
            database("127.0.0.1", 5432, "repl", "app").unwrap(),
            "host='127.0.0.1' port='5432' user='repl' dbname='app'"
        );
        assert_eq!(
            conninfo(&[("dbname", "host=evil port=1 dbname=x")]).unwrap(),
            "dbname='host=evil port=1 dbname=x'"
        );
        assert_eq!(
            conninfo(&[("dbname", "a'b\\c")]).unwrap(),
            "dbname='a\\'b\\\\c'"
        );
        assert_eq!(
            conninfo(&[("dbname", "postgresql://evil/x")]).unwrap(),
            "dbname='postgresql://evil/x'"
        );
        assert_eq!(conninfo(&[("dbname", "")]).unwrap(), "dbname=''");
    }

    #[test]
    fn a_nul_byte_is_refused() {
        let err = database("h", 1, "u", "a\0b").unwrap_err();
        assert_eq!(
            err,
            ConnInfoError::Nul {
                keyword: "dbname",
                value: "a\\0b".into()
            }
        );
        assert!(err.to_string().contains("NUL"), "{err}");
    }
}
