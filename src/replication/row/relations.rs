//! The leader's tables as the change stream describes them (pgoutput Relation messages),
//! matched against the follower's tables, and the statements that apply a row change to them.
//!
//! A Relation message that no longer matches the follower's table means DDL ran on the leader
//! without passing through pgrelay: applying on would write the wrong columns, so the
//! follower stops with an error that names the table and what differs.

use std::fmt::Write as _;

use crate::protocol::pgoutput::{Relation, ReplicaIdentity};

use super::setup::ident;

/// One column of a follower table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerColumn {
    pub name: String,
    pub type_oid: u32,
    /// `schema.name` of the type.
    pub type_name: String,
}

/// The follower's columns of `schema.table` (generated columns left out, like pgoutput does);
/// None when the table does not exist.
pub fn describe_sql(schema: &str, table: &str) -> String {
    format!(
        "SELECT a.attname, a.atttypid, tn.nspname || '.' || t.typname \
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
         JOIN pg_namespace tn ON tn.oid = t.typnamespace \
         WHERE a.attrelid = to_regclass({}) AND a.attnum > 0 AND NOT a.attisdropped \
           AND a.attgenerated = '' ORDER BY a.attnum",
        super::setup::literal(&format!("{}.{}", ident(schema), ident(table)))
    )
}

/// Type OIDs below this are built into every Postgres and equal on leader and follower.
const FIRST_NORMAL_OBJECT_ID: u32 = 16384;

/// A leader table the applier knows, with the follower's view of it.
#[derive(Debug, Clone)]
pub struct Table {
    pub relation: Relation,
    /// `"schema"."table"`.
    pub qualified: String,
    /// Parameter types for each leader column, as the follower knows the type.
    pub param_types: Vec<u32>,
    /// Bumped whenever the relation changes, so cached statements are not reused.
    pub generation: u64,
}

impl Table {
    /// Matches the leader's description against the follower's table. `leader_type_name`
    /// names a leader type OID (from pgoutput Type messages) for types that are not built in.
    pub fn resolve(
        relation: Relation,
        follower: Option<&[FollowerColumn]>,
        leader_type_name: impl Fn(u32) -> Option<String>,
        generation: u64,
    ) -> Result<Table, String> {
        let qualified = format!("{}.{}", ident(&relation.namespace), ident(&relation.name));
        let Some(follower) = follower else {
            return Err(format!("table {qualified} does not exist on the follower"));
        };
        let mut param_types = Vec::with_capacity(relation.columns.len());
        let mut problems = Vec::new();
        for column in &relation.columns {
            match follower.iter().find(|f| f.name == column.name) {
                None => problems.push(format!(
                    "column \"{}\" is on the leader but not on the follower",
                    column.name
                )),
                Some(f) => {
                    let same_type = if column.type_oid < FIRST_NORMAL_OBJECT_ID {
                        f.type_oid == column.type_oid
                    } else {
                        leader_type_name(column.type_oid).is_none_or(|n| n == f.type_name)
                    };
                    if !same_type {
                        problems.push(format!(
                            "column \"{}\" has type {} on the follower but another type (oid {}) on the leader",
                            column.name, f.type_name, column.type_oid
                        ));
                    }
                    param_types.push(f.type_oid);
                }
            }
        }
        for f in follower {
            if !relation.columns.iter().any(|c| c.name == f.name) {
                problems.push(format!(
                    "column \"{}\" is on the follower but not on the leader",
                    f.name
                ));
            }
        }
        if !problems.is_empty() {
            return Err(format!(
                "table {qualified} differs between leader and follower: {} (was it changed \
                 on the leader without going through pgrelay?)",
                problems.join("; ")
            ));
        }
        Ok(Table {
            relation,
            qualified,
            param_types,
            generation,
        })
    }

    fn full_identity(&self) -> bool {
        self.relation.replica_identity == ReplicaIdentity::Full
    }

    /// `INSERT INTO t (every column) VALUES ($1, ...)`.
    pub fn insert_sql(&self) -> String {
        let mut sql = format!("INSERT INTO {} (", self.qualified);
        let mut values = String::new();
        for (i, c) in self.relation.columns.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
                values.push_str(", ");
            }
            sql.push_str(&ident(&c.name));
            let _ = write!(values, "${}", i + 1);
        }
        let _ = write!(sql, ") VALUES ({values})");
        sql
    }

    /// The WHERE clause that finds the old row, with parameters numbered from `first`:
    /// key columns compared with `=` (replica identity default or index), or, for
    /// `REPLICA IDENTITY FULL`, every column given in `key` compared by its text form (so
    /// types without an equality operator work), limited to one row since such tables may hold
    /// duplicates.
    fn where_clause(&self, key: &[usize], first: usize) -> String {
        let mut conds = Vec::with_capacity(key.len());
        for (n, &i) in key.iter().enumerate() {
            let Some(c) = self.relation.columns.get(i) else {
                continue;
            };
            let p = first + n;
            if self.full_identity() {
                conds.push(format!(
                    "{}::text IS NOT DISTINCT FROM ${p}::text",
                    ident(&c.name)
                ));
            } else {
                conds.push(format!("{} = ${p}", ident(&c.name)));
            }
        }
        let conds = if conds.is_empty() {
            "true".to_owned()
        } else {
            conds.join(" AND ")
        };
        if self.full_identity() {
            format!(
                "ctid = (SELECT ctid FROM ONLY {} WHERE {conds} LIMIT 1)",
                self.qualified
            )
        } else {
            conds
        }
    }

    /// `UPDATE ONLY t SET (columns in set) WHERE (columns in key)`.
    pub fn update_sql(&self, set: &[usize], key: &[usize]) -> String {
        let mut sql = format!("UPDATE ONLY {} SET ", self.qualified);
        for (n, &i) in set.iter().enumerate() {
            if let Some(c) = self.relation.columns.get(i) {
                if n > 0 {
                    sql.push_str(", ");
                }
                let _ = write!(sql, "{} = ${}", ident(&c.name), n + 1);
            }
        }
        let _ = write!(sql, " WHERE {}", self.where_clause(key, set.len() + 1));
        sql
    }

    /// `DELETE FROM ONLY t WHERE (columns in key)`.
    pub fn delete_sql(&self, key: &[usize]) -> String {
        format!(
            "DELETE FROM ONLY {} WHERE {}",
            self.qualified,
            self.where_clause(key, 1)
        )
    }

    /// Parameter types of the given columns, in order.
    pub fn types_of<'a>(&'a self, columns: impl Iterator<Item = &'a usize>) -> Vec<u32> {
        columns
            .map(|&i| {
                if self.full_identity() {
                    0
                } else {
                    self.param_types.get(i).copied().unwrap_or(0)
                }
            })
            .collect()
    }

    /// Indexes of the replica identity columns.
    pub fn key_columns(&self) -> Vec<usize> {
        self.relation
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::pgoutput::Column;

    fn relation(identity: ReplicaIdentity) -> Relation {
        Relation {
            id: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: identity,
            columns: vec![
                Column {
                    key: true,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                Column {
                    key: identity == ReplicaIdentity::Full,
                    name: "v".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
            ],
        }
    }

    fn follower() -> Vec<FollowerColumn> {
        vec![
            FollowerColumn {
                name: "id".into(),
                type_oid: 23,
                type_name: "pg_catalog.int4".into(),
            },
            FollowerColumn {
                name: "v".into(),
                type_oid: 25,
                type_name: "pg_catalog.text".into(),
            },
        ]
    }

    #[test]
    fn statements_for_a_keyed_table() {
        let t = Table::resolve(
            relation(ReplicaIdentity::Default),
            Some(&follower()),
            |_| None,
            0,
        )
        .unwrap();
        assert_eq!(
            t.insert_sql(),
            "INSERT INTO \"public\".\"t\" (\"id\", \"v\") VALUES ($1, $2)"
        );
        assert_eq!(
            t.update_sql(&[1], &[0]),
            "UPDATE ONLY \"public\".\"t\" SET \"v\" = $1 WHERE \"id\" = $2"
        );
        assert_eq!(
            t.delete_sql(&[0]),
            "DELETE FROM ONLY \"public\".\"t\" WHERE \"id\" = $1"
        );
        assert_eq!(t.key_columns(), vec![0]);
        assert_eq!(t.types_of([1, 0].iter()), vec![25, 23]);
    }

    #[test]
    fn full_identity_compares_text_and_touches_one_row() {
        let t = Table::resolve(
            relation(ReplicaIdentity::Full),
            Some(&follower()),
            |_| None,
            0,
        )
        .unwrap();
        assert_eq!(
            t.delete_sql(&[0, 1]),
            "DELETE FROM ONLY \"public\".\"t\" WHERE ctid = (SELECT ctid FROM ONLY \"public\".\"t\" \
             WHERE \"id\"::text IS NOT DISTINCT FROM $1::text AND \"v\"::text IS NOT DISTINCT FROM $2::text LIMIT 1)"
        );
    }

    #[test]
    fn differences_are_named() {
        let mut f = follower();
        f.pop();
        f.push(FollowerColumn {
            name: "w".into(),
            type_oid: 25,
            type_name: "pg_catalog.text".into(),
        });
        let err =
            Table::resolve(relation(ReplicaIdentity::Default), Some(&f), |_| None, 0).unwrap_err();
        assert!(err.contains("\"public\".\"t\""), "{err}");
        assert!(
            err.contains("column \"v\" is on the leader but not on the follower"),
            "{err}"
        );
        assert!(
            err.contains("column \"w\" is on the follower but not on the leader"),
            "{err}"
        );
        let mut f = follower();
        if let Some(c) = f.get_mut(1) {
            c.type_oid = 1043;
            c.type_name = "pg_catalog.varchar".into();
        }
        let err =
            Table::resolve(relation(ReplicaIdentity::Default), Some(&f), |_| None, 0).unwrap_err();
        assert!(
            err.contains("column \"v\" has type pg_catalog.varchar"),
            "{err}"
        );
        let err =
            Table::resolve(relation(ReplicaIdentity::Default), None, |_| None, 0).unwrap_err();
        assert!(err.contains("does not exist on the follower"), "{err}");
    }
}
