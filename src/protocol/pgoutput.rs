//! Decoder of the messages of `pgoutput`, Postgres's built-in logical decoding output plugin,
//! as they arrive in the `data` of one [`XLogData`](super::replication::XLogData): protocol
//! version 1, values in text format or as raw binary bytes.
//!
//! Streamed in-progress transactions (`streaming`, protocol version 2) and two-phase commit
//! (version 3) are not requested by pgrelay, so their messages are rejected as unexpected.
//! <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>
//!
//! The input comes from a server but is still checked like untrusted input: every count is
//! compared with the bytes left before anything is allocated for it, strings must be UTF-8, and
//! bytes after a complete message are an error. Values are zero-copy slices of the input.

use bytes::Bytes;

use super::codec::Reader;
use super::ProtocolError;

/// One pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeInfo),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
}

/// 'B': a transaction starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record.
    pub final_lsn: u64,
    /// Microseconds since the Postgres epoch (see [`super::replication::system_time`]).
    pub commit_time: i64,
    pub xid: u32,
}

/// 'C': the transaction opened by the last [`Begin`] commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Currently unused by Postgres (always 0).
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: u64,
    /// The LSN just past the commit record: where a subscriber confirms it has applied up to.
    pub end_lsn: u64,
    /// Microseconds since the Postgres epoch.
    pub commit_time: i64,
}

/// 'O': the transaction was replicated to this server from the named origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The LSN of the commit on the origin server.
    pub commit_lsn: u64,
    pub name: String,
}

/// Which old values an UPDATE or DELETE of a relation carries ('d' 'n' 'f' 'i' in the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// 'd': the primary key.
    Default,
    /// 'n': none.
    Nothing,
    /// 'f': the whole old row.
    Full,
    /// 'i': the columns of a chosen unique index.
    Index,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The column is part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    /// The `atttypmod`, e.g. the length of a `varchar(n)`; -1 when there is none.
    pub type_modifier: i32,
}

/// 'R': the shape of a table, sent before the first change to it in a session and again after
/// it changes. Later messages refer to it by `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID.
    pub id: u32,
    /// The schema; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

/// 'Y': a non-built-in type used by a later [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// The type's OID.
    pub id: u32,
    /// The schema; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
}

/// One column's value in a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// 'n'
    Null,
    /// 'u': an unchanged TOASTed value, which the server did not send. An UPDATE must not
    /// overwrite such a column: the subscriber's current value is the right one, so leave the
    /// column out of what is written rather than setting it to NULL or to nothing.
    Unchanged,
    /// 't': the value in text format, in the server's encoding.
    Text(Bytes),
    /// 'b': the value in binary format (only with the `binary` option).
    Binary(Bytes),
}

/// A row's values, in the order of its [`Relation`]'s columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple(pub Vec<Value>);

/// What the old values of an UPDATE or DELETE cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// 'K': only the replica identity key columns; the others are [`Value::Null`].
    Key,
    /// 'O': the whole old row (`REPLICA IDENTITY FULL`).
    Full,
}

/// The old values of an UPDATE or DELETE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldTuple {
    pub kind: OldKind,
    pub tuple: Tuple,
}

/// 'I'
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// The [`Relation::id`].
    pub relation: u32,
    pub new: Tuple,
}

/// 'U'
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The [`Relation::id`].
    pub relation: u32,
    /// Present when the key changed ('K') or the table is `REPLICA IDENTITY FULL` ('O').
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

/// 'D'
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// The [`Relation::id`].
    pub relation: u32,
    pub old: OldTuple,
}

/// 'T'
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    /// [`Relation::id`]s.
    pub relations: Vec<u32>,
}

/// 'M': a message written by `pg_logical_emit_message` (only with the `messages` option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Part of a transaction (between [`Begin`] and [`Commit`]), rather than sent at once.
    pub transactional: bool,
    pub lsn: u64,
    pub prefix: String,
    pub content: Bytes,
}

/// Flag bits of Truncate.
const TRUNCATE_CASCADE: u8 = 1;
const TRUNCATE_RESTART_IDENTITY: u8 = 2;
/// Flag bit of a Relation's column.
const COLUMN_KEY: u8 = 1;
/// Flag bit of Message.
const MESSAGE_TRANSACTIONAL: u8 = 1;

/// Fewest bytes one column of a Relation takes: flags, an empty name's NUL, type OID, modifier.
const MIN_COLUMN_BYTES: usize = 1 + 1 + 4 + 4;
/// Fewest bytes one value of a Tuple takes: its kind byte.
const MIN_VALUE_BYTES: usize = 1;

/// Decodes one pgoutput message (the `data` of one XLogData).
pub fn decode(data: Bytes) -> Result<Message, ProtocolError> {
    let Some((&tag, body)) = data.split_first() else {
        return Err(ProtocolError::malformed("pgoutput"));
    };
    let what = message_name(tag)?;
    let mut f = Fields {
        data: &data,
        r: Reader::new(body, what),
        what,
    };
    let message = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: f.u64()?,
            commit_time: f.i64()?,
            xid: f.u32()?,
        }),
        b'C' => Message::Commit(Commit {
            flags: f.u8()?,
            commit_lsn: f.u64()?,
            end_lsn: f.u64()?,
            commit_time: f.i64()?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: f.u64()?,
            name: f.string()?,
        }),
        b'R' => Message::Relation(f.relation()?),
        b'Y' => Message::Type(TypeInfo {
            id: f.u32()?,
            namespace: f.string()?,
            name: f.string()?,
        }),
        b'I' => {
            let relation = f.u32()?;
            f.expect(b'N')?;
            Message::Insert(Insert {
                relation,
                new: f.tuple()?,
            })
        }
        b'U' => {
            let relation = f.u32()?;
            let old = match f.u8()? {
                b'N' => None,
                kind => {
                    let old = f.old_tuple(kind)?;
                    f.expect(b'N')?;
                    Some(old)
                }
            };
            Message::Update(Update {
                relation,
                old,
                new: f.tuple()?,
            })
        }
        b'D' => {
            let relation = f.u32()?;
            let kind = f.u8()?;
            Message::Delete(Delete {
                relation,
                old: f.old_tuple(kind)?,
            })
        }
        b'T' => Message::Truncate(f.truncate()?),
        b'M' => {
            let flags = f.u8()?;
            let lsn = f.u64()?;
            let prefix = f.string()?;
            let content = f.counted_bytes()?;
            Message::Message(LogicalMessage {
                transactional: flags & MESSAGE_TRANSACTIONAL != 0,
                lsn,
                prefix,
                content,
            })
        }
        // message_name has already rejected every other tag.
        other => return Err(ProtocolError::UnexpectedMessage(other)),
    };
    if f.r.remaining() != 0 {
        return Err(f.err());
    }
    Ok(message)
}

/// The name errors give a message, for the tags this decoder knows.
fn message_name(tag: u8) -> Result<&'static str, ProtocolError> {
    Ok(match tag {
        b'B' => "pgoutput Begin",
        b'C' => "pgoutput Commit",
        b'O' => "pgoutput Origin",
        b'R' => "pgoutput Relation",
        b'Y' => "pgoutput Type",
        b'I' => "pgoutput Insert",
        b'U' => "pgoutput Update",
        b'D' => "pgoutput Delete",
        b'T' => "pgoutput Truncate",
        b'M' => "pgoutput Message",
        other => return Err(ProtocolError::UnexpectedMessage(other)),
    })
}

/// A [`Reader`] over the body of `data`, which can hand out fields as zero-copy slices of it.
struct Fields<'a> {
    data: &'a Bytes,
    r: Reader<'a>,
    /// The message's name, for errors.
    what: &'static str,
}

impl Fields<'_> {
    fn err(&self) -> ProtocolError {
        ProtocolError::malformed(self.what)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        self.r.u8()
    }

    fn expect(&mut self, byte: u8) -> Result<(), ProtocolError> {
        if self.u8()? == byte {
            Ok(())
        } else {
            Err(self.err())
        }
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        // Postgres reads these counts back as unsigned (`pq_getmsgint(msg, 2)`).
        Ok(self.r.i16()? as u16)
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(self.r.i32()? as u32)
    }

    fn i32(&mut self) -> Result<i32, ProtocolError> {
        self.r.i32()
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.r.u64()
    }

    fn i64(&mut self) -> Result<i64, ProtocolError> {
        self.r.i64()
    }

    fn string(&mut self) -> Result<String, ProtocolError> {
        self.r.cstr().map(String::from)
    }

    /// Fails unless `count` items of at least `min_bytes` each can still follow, so that a
    /// count can be trusted for an allocation.
    fn check_count(&self, count: usize, min_bytes: usize) -> Result<(), ProtocolError> {
        match count.checked_mul(min_bytes) {
            Some(needed) if needed <= self.r.remaining() => Ok(()),
            _ => Err(self.err()),
        }
    }

    /// An Int32 length followed by that many bytes.
    fn counted_bytes(&mut self) -> Result<Bytes, ProtocolError> {
        let len = usize::try_from(self.i32()?).map_err(|_| self.err())?;
        let bytes = self.r.bytes(len)?;
        Ok(self.data.slice_ref(bytes))
    }

    fn relation(&mut self) -> Result<Relation, ProtocolError> {
        let id = self.u32()?;
        let namespace = self.string()?;
        let name = self.string()?;
        let replica_identity = match self.u8()? {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            _ => return Err(self.err()),
        };
        let count = usize::from(self.u16()?);
        self.check_count(count, MIN_COLUMN_BYTES)?;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            columns.push(Column {
                key: self.u8()? & COLUMN_KEY != 0,
                name: self.string()?,
                type_oid: self.u32()?,
                type_modifier: self.i32()?,
            });
        }
        Ok(Relation {
            id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn tuple(&mut self) -> Result<Tuple, ProtocolError> {
        let count = usize::from(self.u16()?);
        self.check_count(count, MIN_VALUE_BYTES)?;
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => Value::Text(self.counted_bytes()?),
                b'b' => Value::Binary(self.counted_bytes()?),
                _ => return Err(self.err()),
            });
        }
        Ok(Tuple(values))
    }

    /// The tuple after a 'K' or 'O' `kind` byte.
    fn old_tuple(&mut self, kind: u8) -> Result<OldTuple, ProtocolError> {
        let kind = match kind {
            b'K' => OldKind::Key,
            b'O' => OldKind::Full,
            _ => return Err(self.err()),
        };
        Ok(OldTuple {
            kind,
            tuple: self.tuple()?,
        })
    }

    fn truncate(&mut self) -> Result<Truncate, ProtocolError> {
        let count = usize::try_from(self.u32()?).map_err(|_| self.err())?;
        let flags = self.u8()?;
        self.check_count(count, 4)?;
        let mut relations = Vec::with_capacity(count);
        for _ in 0..count {
            relations.push(self.u32()?);
        }
        Ok(Truncate {
            cascade: flags & TRUNCATE_CASCADE != 0,
            restart_identity: flags & TRUNCATE_RESTART_IDENTITY != 0,
            relations,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn hex(s: &str) -> Bytes {
        let digits: Vec<u8> = s
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .map(|b| char::from(b).to_digit(16).unwrap() as u8)
            .collect();
        digits.chunks(2).map(|p| p[0] << 4 | p[1]).collect()
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn binary(b: &[u8]) -> Value {
        Value::Binary(Bytes::copy_from_slice(b))
    }

    /// A test-only encoder, the mirror of `decode`, to build inputs by hand.
    fn encode(message: &Message) -> Vec<u8> {
        fn cstr(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        fn tuple(out: &mut Vec<u8>, t: &Tuple) {
            out.extend_from_slice(&(t.0.len() as u16).to_be_bytes());
            for v in &t.0 {
                match v {
                    Value::Null => out.push(b'n'),
                    Value::Unchanged => out.push(b'u'),
                    Value::Text(b) | Value::Binary(b) => {
                        out.push(if matches!(v, Value::Text(_)) {
                            b't'
                        } else {
                            b'b'
                        });
                        out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                        out.extend_from_slice(b);
                    }
                }
            }
        }
        fn old(out: &mut Vec<u8>, o: &OldTuple) {
            out.push(match o.kind {
                OldKind::Key => b'K',
                OldKind::Full => b'O',
            });
            tuple(out, &o.tuple);
        }
        let mut out = Vec::new();
        match message {
            Message::Begin(b) => {
                out.push(b'B');
                out.extend_from_slice(&b.final_lsn.to_be_bytes());
                out.extend_from_slice(&b.commit_time.to_be_bytes());
                out.extend_from_slice(&b.xid.to_be_bytes());
            }
            Message::Commit(c) => {
                out.push(b'C');
                out.push(c.flags);
                out.extend_from_slice(&c.commit_lsn.to_be_bytes());
                out.extend_from_slice(&c.end_lsn.to_be_bytes());
                out.extend_from_slice(&c.commit_time.to_be_bytes());
            }
            Message::Origin(o) => {
                out.push(b'O');
                out.extend_from_slice(&o.commit_lsn.to_be_bytes());
                cstr(&mut out, &o.name);
            }
            Message::Relation(r) => {
                out.push(b'R');
                out.extend_from_slice(&r.id.to_be_bytes());
                cstr(&mut out, &r.namespace);
                cstr(&mut out, &r.name);
                out.push(match r.replica_identity {
                    ReplicaIdentity::Default => b'd',
                    ReplicaIdentity::Nothing => b'n',
                    ReplicaIdentity::Full => b'f',
                    ReplicaIdentity::Index => b'i',
                });
                out.extend_from_slice(&(r.columns.len() as u16).to_be_bytes());
                for c in &r.columns {
                    out.push(u8::from(c.key));
                    cstr(&mut out, &c.name);
                    out.extend_from_slice(&c.type_oid.to_be_bytes());
                    out.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            Message::Type(t) => {
                out.push(b'Y');
                out.extend_from_slice(&t.id.to_be_bytes());
                cstr(&mut out, &t.namespace);
                cstr(&mut out, &t.name);
            }
            Message::Insert(i) => {
                out.push(b'I');
                out.extend_from_slice(&i.relation.to_be_bytes());
                out.push(b'N');
                tuple(&mut out, &i.new);
            }
            Message::Update(u) => {
                out.push(b'U');
                out.extend_from_slice(&u.relation.to_be_bytes());
                if let Some(o) = &u.old {
                    old(&mut out, o);
                }
                out.push(b'N');
                tuple(&mut out, &u.new);
            }
            Message::Delete(d) => {
                out.push(b'D');
                out.extend_from_slice(&d.relation.to_be_bytes());
                old(&mut out, &d.old);
            }
            Message::Truncate(t) => {
                out.push(b'T');
                out.extend_from_slice(&(t.relations.len() as u32).to_be_bytes());
                out.push(u8::from(t.cascade) | u8::from(t.restart_identity) << 1);
                for r in &t.relations {
                    out.extend_from_slice(&r.to_be_bytes());
                }
            }
            Message::Message(m) => {
                out.push(b'M');
                out.push(u8::from(m.transactional));
                out.extend_from_slice(&m.lsn.to_be_bytes());
                cstr(&mut out, &m.prefix);
                out.extend_from_slice(&(m.content.len() as i32).to_be_bytes());
                out.extend_from_slice(&m.content);
            }
        }
        out
    }

    /// One message of every kind and variant, built by hand.
    fn hand_built() -> Vec<Message> {
        let row = Tuple(vec![
            Value::Null,
            Value::Unchanged,
            text("héllo"),
            binary(&[0, 0, 0, 42]),
            text(""),
        ]);
        let key = Tuple(vec![
            text("1"),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ]);
        vec![
            Message::Begin(Begin {
                final_lsn: 0x0000_0001_0000_00a0,
                commit_time: -1,
                xid: u32::MAX,
            }),
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: 0x16_b374_d848,
                end_lsn: 0x16_b374_d878,
                commit_time: 757_382_400_000_000,
            }),
            Message::Origin(Origin {
                commit_lsn: 7,
                name: "node_a".into(),
            }),
            Message::Relation(Relation {
                id: 16_384,
                namespace: String::new(),
                name: "pg_cat".into(),
                replica_identity: ReplicaIdentity::Nothing,
                columns: vec![],
            }),
            Message::Relation(Relation {
                id: 16_385,
                namespace: "app".into(),
                name: "users".into(),
                replica_identity: ReplicaIdentity::Index,
                columns: vec![
                    Column {
                        key: true,
                        name: "id".into(),
                        type_oid: 20,
                        type_modifier: -1,
                    },
                    Column {
                        key: false,
                        name: "name".into(),
                        type_oid: 1043,
                        type_modifier: 68,
                    },
                ],
            }),
            Message::Type(TypeInfo {
                id: 16_390,
                namespace: "app".into(),
                name: "mood".into(),
            }),
            Message::Insert(Insert {
                relation: 16_385,
                new: row.clone(),
            }),
            Message::Insert(Insert {
                relation: 16_385,
                new: Tuple(vec![]),
            }),
            Message::Update(Update {
                relation: 16_385,
                old: None,
                new: row.clone(),
            }),
            Message::Update(Update {
                relation: 16_385,
                old: Some(OldTuple {
                    kind: OldKind::Key,
                    tuple: key.clone(),
                }),
                new: row.clone(),
            }),
            Message::Update(Update {
                relation: 16_385,
                old: Some(OldTuple {
                    kind: OldKind::Full,
                    tuple: row.clone(),
                }),
                new: row.clone(),
            }),
            Message::Delete(Delete {
                relation: 16_385,
                old: OldTuple {
                    kind: OldKind::Key,
                    tuple: key,
                },
            }),
            Message::Delete(Delete {
                relation: 16_385,
                old: OldTuple {
                    kind: OldKind::Full,
                    tuple: row,
                },
            }),
            Message::Truncate(Truncate {
                cascade: false,
                restart_identity: false,
                relations: vec![16_385],
            }),
            Message::Truncate(Truncate {
                cascade: true,
                restart_identity: false,
                relations: vec![1, 2, 3],
            }),
            Message::Truncate(Truncate {
                cascade: false,
                restart_identity: true,
                relations: vec![],
            }),
            Message::Message(LogicalMessage {
                transactional: true,
                lsn: 0x0153_24e0,
                prefix: "pgrelay".into(),
                content: Bytes::from_static(b"\x00\xff payload"),
            }),
            Message::Message(LogicalMessage {
                transactional: false,
                lsn: 1,
                prefix: String::new(),
                content: Bytes::new(),
            }),
        ]
    }

    /// Real messages from PostgreSQL 15 (`pg_logical_slot_peek_binary_changes` with
    /// `proto_version 1, messages true`, plus `binary true` for the last one), with what they
    /// must decode to. Script: tables `s.t (id int primary key, note text, big text storage
    /// external, m s.mood, n numeric(10,2))` and `s.f (a int, b text)` with replica identity
    /// full; insert, update `big` to 3000 bytes, update only `note` (so `big` is unchanged
    /// TOAST), update the key, delete; insert/update/delete on `s.f`; `truncate s.f restart
    /// identity cascade`; transactional and non-transactional `pg_logical_emit_message`; one
    /// insert with replication origin `o1` set to commit LSN 0/12345678 at 2024-01-01.
    fn real_server() -> Vec<(&'static str, Message)> {
        let t = 16_391;
        let f = 16_398;
        let t_columns = vec![
            Column {
                key: true,
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
            },
            Column {
                key: false,
                name: "note".into(),
                type_oid: 25,
                type_modifier: -1,
            },
            Column {
                key: false,
                name: "big".into(),
                type_oid: 25,
                type_modifier: -1,
            },
            Column {
                key: false,
                name: "m".into(),
                type_oid: 16_386,
                type_modifier: -1,
            },
            // numeric(10,2): ((10 << 16) | 2) + VARHDRSZ
            Column {
                key: false,
                name: "n".into(),
                type_oid: 1700,
                type_modifier: 655_366,
            },
        ];
        let f_relation = Relation {
            id: f,
            namespace: "s".into(),
            name: "f".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![
                Column {
                    key: true,
                    name: "a".into(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                Column {
                    key: true,
                    name: "b".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
            ],
        };
        vec![
            (
                "4200000000015308b00003044277d4019c000002db",
                Message::Begin(Begin {
                    final_lsn: 0x0153_08b0,
                    commit_time: 0x3_0442_77d4_019c,
                    xid: 731,
                }),
            ),
            (
                "590000400273006d6f6f6400",
                Message::Type(TypeInfo {
                    id: 16_386,
                    namespace: "s".into(),
                    name: "mood".into(),
                }),
            ),
            (
                "5200004007730074006400050169640000000017ffffffff006e6f74650000000019ffffffff00626967\
                 0000000019ffffffff006d0000004002ffffffff006e00000006a4000a0006",
                Message::Relation(Relation {
                    id: t,
                    namespace: "s".into(),
                    name: "t".into(),
                    replica_identity: ReplicaIdentity::Default,
                    columns: t_columns,
                }),
            ),
            (
                "49000040074e0005740000000131740000000566697273746e74000000026f6b7400000004312e3530",
                Message::Insert(Insert {
                    relation: t,
                    new: Tuple(vec![
                        text("1"),
                        text("first"),
                        Value::Null,
                        text("ok"),
                        text("1.50"),
                    ]),
                }),
            ),
            (
                "430000000000015308b000000000015308e00003044277d4019c",
                Message::Commit(Commit {
                    flags: 0,
                    commit_lsn: 0x0153_08b0,
                    end_lsn: 0x0153_08e0,
                    commit_time: 0x3_0442_77d4_019c,
                }),
            ),
            (
                "55000040074e000574000000013174000000067365636f6e647574000000026f6b7400000004312e3530",
                Message::Update(Update {
                    relation: t,
                    old: None,
                    new: Tuple(vec![
                        text("1"),
                        text("second"),
                        Value::Unchanged,
                        text("ok"),
                        text("1.50"),
                    ]),
                }),
            ),
            (
                "55000040074b00057400000001316e6e6e6e4e00057400000001327400000006\
                 7365636f6e647574000000026f6b7400000004312e3530",
                Message::Update(Update {
                    relation: t,
                    old: Some(OldTuple {
                        kind: OldKind::Key,
                        tuple: Tuple(vec![
                            text("1"),
                            Value::Null,
                            Value::Null,
                            Value::Null,
                            Value::Null,
                        ]),
                    }),
                    new: Tuple(vec![
                        text("2"),
                        text("second"),
                        Value::Unchanged,
                        text("ok"),
                        text("1.50"),
                    ]),
                }),
            ),
            (
                "44000040074b00057400000001326e6e6e6e",
                Message::Delete(Delete {
                    relation: t,
                    old: OldTuple {
                        kind: OldKind::Key,
                        tuple: Tuple(vec![
                            text("2"),
                            Value::Null,
                            Value::Null,
                            Value::Null,
                            Value::Null,
                        ]),
                    },
                }),
            ),
            (
                "520000400e7300660066000201610000000017ffffffff01620000000019ffffffff",
                Message::Relation(f_relation),
            ),
            (
                "490000400e4e0002740000000131740000000161",
                Message::Insert(Insert {
                    relation: f,
                    new: Tuple(vec![text("1"), text("a")]),
                }),
            ),
            (
                "550000400e4f00027400000001317400000001614e0002740000000131740000000162",
                Message::Update(Update {
                    relation: f,
                    old: Some(OldTuple {
                        kind: OldKind::Full,
                        tuple: Tuple(vec![text("1"), text("a")]),
                    }),
                    new: Tuple(vec![text("1"), text("b")]),
                }),
            ),
            (
                "440000400e4f0002740000000131740000000162",
                Message::Delete(Delete {
                    relation: f,
                    old: OldTuple {
                        kind: OldKind::Full,
                        tuple: Tuple(vec![text("1"), text("b")]),
                    },
                }),
            ),
            (
                "5400000001030000400e",
                Message::Truncate(Truncate {
                    cascade: true,
                    restart_identity: true,
                    relations: vec![f],
                }),
            ),
            (
                "4d0100000000015324e0706678000000000568656c6c6f",
                Message::Message(LogicalMessage {
                    transactional: true,
                    lsn: 0x0153_24e0,
                    prefix: "pfx".into(),
                    content: Bytes::from_static(b"hello"),
                }),
            ),
            (
                "4d000000000001532548706678000000000200ff",
                Message::Message(LogicalMessage {
                    transactional: false,
                    lsn: 0x0153_2548,
                    prefix: "pfx".into(),
                    content: Bytes::from_static(b"\x00\xff"),
                }),
            ),
            (
                // The origin's commit time becomes the transaction's.
                "4200000000015327f00002b0d5d4e94000000002e6",
                Message::Begin(Begin {
                    final_lsn: 0x0153_27f0,
                    commit_time: 757_382_400_000_000,
                    xid: 742,
                }),
            ),
            (
                "4f00000000123456786f3100",
                Message::Origin(Origin {
                    commit_lsn: 0x1234_5678,
                    name: "o1".into(),
                }),
            ),
            (
                // With `binary true`: int4, text, NULL, enum, numeric in their send formats.
                "49000040074e0005620000000400000001620000000566697273746e62000000026f6b\
                 620000000c000200000000000200011388",
                Message::Insert(Insert {
                    relation: t,
                    new: Tuple(vec![
                        binary(&[0, 0, 0, 1]),
                        binary(b"first"),
                        Value::Null,
                        binary(b"ok"),
                        binary(&[0, 2, 0, 0, 0, 0, 0, 2, 0, 1, 0x13, 0x88]),
                    ]),
                }),
            ),
        ]
    }

    /// Every valid input the tests know, as bytes.
    fn valid_inputs() -> Vec<Bytes> {
        let mut inputs: Vec<Bytes> = real_server().iter().map(|(h, _)| hex(h)).collect();
        inputs.extend(hand_built().iter().map(|m| Bytes::from(encode(m))));
        inputs
    }

    #[test]
    fn decodes_real_server_messages() {
        for (h, expected) in real_server() {
            let input = hex(h);
            assert_eq!(decode(input.clone()).unwrap(), expected, "{h}");
            // The test encoder agrees with the server, so hand-built inputs are realistic.
            assert_eq!(encode(&expected), &input[..], "{h}");
        }
    }

    #[test]
    fn decodes_hand_built_messages() {
        for message in hand_built() {
            assert_eq!(decode(Bytes::from(encode(&message))).unwrap(), message);
        }
    }

    #[test]
    fn values_are_slices_of_the_input() {
        let input = hex(
            "49000040074e0005740000000131740000000566697273746e74000000026f6b7400000004312e3530",
        );
        let range = input.as_ptr_range();
        let Message::Insert(insert) = decode(input.clone()).unwrap() else {
            panic!("not an insert");
        };
        for value in &insert.new.0 {
            if let Value::Text(b) = value {
                assert!(range.contains(&b.as_ptr()));
            }
        }
        let input = hex("4d0100000000015324e0706678000000000568656c6c6f");
        let Message::Message(m) = decode(input.clone()).unwrap() else {
            panic!("not a message");
        };
        assert_eq!(m.content.as_ptr(), input[input.len() - 5..].as_ptr());
    }

    #[test]
    fn every_truncation_is_an_error() {
        for input in valid_inputs() {
            for len in 0..input.len() {
                assert!(
                    decode(input.slice(..len)).is_err(),
                    "prefix of {len} bytes of {input:02x?}"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for input in valid_inputs() {
            let mut padded = input.to_vec();
            padded.push(0);
            assert!(decode(Bytes::from(padded)).is_err(), "{input:02x?}");
        }
    }

    #[test]
    fn counts_are_checked_before_allocating() {
        // 65535 values claimed, 3 bytes left.
        assert_eq!(
            decode(hex("49 00004007 4e ffff 6e6e6e")),
            Err(ProtocolError::malformed("pgoutput Insert"))
        );
        // 65535 columns claimed, one left.
        assert!(decode(hex(
            "52 00004007 7300 7400 64 ffff 00 6100 00000017 ffffffff"
        ))
        .is_err());
        // 4 billion relations claimed, one given.
        assert!(decode(hex("54 ffffffff 00 0000400e")).is_err());
        // A value or message content longer than what is left, or negative.
        assert!(decode(hex("49 00004007 4e 0001 74 7fffffff 31")).is_err());
        assert!(decode(hex("49 00004007 4e 0001 74 ffffffff")).is_err());
        assert!(decode(hex("4d 01 0000000000000001 00 7fffffff 00")).is_err());
        assert!(decode(hex("4d 01 0000000000000001 00 ffffffff")).is_err());
    }

    #[test]
    fn rejects_unknown_kinds() {
        assert!(decode(Bytes::new()).is_err());
        // Streaming (protocol 2) and two-phase (protocol 3) messages, and nonsense.
        for tag in [
            b'S', b'E', b'c', b'A', b'b', b'P', b'K', b'r', b'p', b'X', 0,
        ] {
            assert_eq!(
                decode(Bytes::from(vec![tag, 0, 0, 0, 0])),
                Err(ProtocolError::UnexpectedMessage(tag))
            );
        }
        // Unknown value kind.
        assert!(decode(hex("49 00004007 4e 0001 78")).is_err());
        // Unknown replica identity.
        assert!(decode(hex("52 00004007 7300 7400 78 0000")).is_err());
        // Insert without 'N'; Update with an old tuple but no 'N'; Delete without an old tuple.
        assert!(decode(hex("49 00004007 4b 0000")).is_err());
        assert!(decode(hex("55 00004007 4b 0000 4b 0000")).is_err());
        assert!(decode(hex("55 00004007 78 0000")).is_err());
        assert!(decode(hex("44 00004007 4e 0000")).is_err());
    }

    #[test]
    fn strings_must_be_utf8() {
        assert!(decode(hex("59 00004002 7300 ff00")).is_err());
        assert!(decode(hex("4f 0000000000000001 c3 00")).is_err());
        assert!(decode(hex("4d 00 0000000000000001 80 00 00000000")).is_err());
        // Values are bytes and need not be UTF-8.
        assert_eq!(
            decode(hex("49 00004007 4e 0001 74 00000001 ff")).unwrap(),
            Message::Insert(Insert {
                relation: 0x4007,
                new: Tuple(vec![Value::Text(Bytes::from_static(b"\xff"))]),
            })
        );
    }

    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let corpus = valid_inputs();
        let tags = b"BCORYIUDTMSEcAx";
        let mut rng = StdRng::seed_from_u64(0x7067_6f75_7470_7574);
        let (mut ok, mut err) = (0u32, 0u32);
        for _ in 0..100_000 {
            let input: Vec<u8> = match rng.gen_range(0..4) {
                // Random bytes after a plausible tag.
                0 => {
                    let len = rng.gen_range(0..48);
                    let mut v: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    v.insert(0, tags[rng.gen_range(0..tags.len())]);
                    v
                }
                // A valid message with a few bytes changed.
                1 => {
                    let mut v = corpus[rng.gen_range(0..corpus.len())].to_vec();
                    for _ in 0..rng.gen_range(1..4) {
                        let i = rng.gen_range(0..v.len());
                        v[i] = rng.gen();
                    }
                    v
                }
                // A valid message cut short and followed by random bytes.
                2 => {
                    let mut v = corpus[rng.gen_range(0..corpus.len())].to_vec();
                    v.truncate(rng.gen_range(0..=v.len()));
                    v.extend((0..rng.gen_range(0..8)).map(|_| rng.gen::<u8>()));
                    v
                }
                // A valid message with a run of 0xff (huge counts, -1 lengths) spliced in.
                _ => {
                    let mut v = corpus[rng.gen_range(0..corpus.len())].to_vec();
                    let at = rng.gen_range(1..=v.len());
                    let run = rng.gen_range(1..5);
                    v.splice(at..at, std::iter::repeat_n(0xff, run));
                    v
                }
            };
            match decode(Bytes::from(input)) {
                Ok(_) => ok += 1,
                Err(_) => err += 1,
            }
        }
        // Both outcomes occur, so the mutations reach past the first checks.
        assert!(ok > 1_000 && err > 1_000, "ok {ok}, err {err}");
    }
}
