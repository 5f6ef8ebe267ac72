//! The PostgreSQL catalog schema (`migrations/postgres/`) against the SQLite one.
//!
//! A real throwaway PostgreSQL server (Debian's `postgresql-15`, installed by `scripts/test`;
//! [`common::postgres::Postgres`]) is started as the test's child process, on a Unix socket in
//! a private temporary directory, with an ICU en-US default collation (so byte order must come
//! from the columns' `COLLATE "C"`), and the PostgreSQL schema applied to it; the SQLite catalog is made by Stowage's own migration runner ([`stowage::catalog::migrate_file`]).
//! Then:
//! - [`same_shape`]: every SQLite table has a PostgreSQL table with the same columns (names,
//!   types as translated, nullability, byte-order collation for text), the same named indexes
//!   (table, columns in order including SQLite's implicit key suffix, UNIQUE, partial WHERE),
//!   the same primary keys, UNIQUE constraints, foreign keys (columns, target, ON DELETE) and
//!   number of CHECKs per table, and every SQLite trigger a PostgreSQL trigger of the same name on the same table, firing
//!   at the same time on the same event (and `UPDATE OF` columns); and every SQLite migration
//!   after the PostgreSQL baseline has its PostgreSQL counterpart.
//! - [`same_rows`]: one scripted scenario ([`SCENARIO`], written once with `?N` placeholders and
//!   rendered for each dialect) runs on both engines; after each step every table's rows are
//!   compared, trigger-maintained figures included, and the step's expected figures checked on
//!   both (so that a scenario in which no trigger fires cannot pass).
//!
//! A few columns hold values each engine chooses ([`ENGINE_OWN_VALUES`]: the Spack dirty
//! marks) and are compared for presence only.
//!
//! Surrogate ids (rowids, identity columns) are compared by rank, not value: PostgreSQL's
//! identity sequences leave gaps (an upsert taking its DO UPDATE branch, or a rolled-back
//! insert, consumes a value) where SQLite reuses the next rowid. Both assign them in insert
//! order, which the rank comparison checks. The times the triggers write (`stowage_now()`,
//! SQLite's `strftime('%s', 'now')`) must be the test's clock's "now" in unix seconds (within
//! a few seconds; the server runs in a time zone far from UTC so that a local time shows).
//!
//! The test fails, never skips, when PostgreSQL is missing.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use common::postgres::Postgres;

/// The PostgreSQL schema, applied in this order (the baseline, then any later migrations).
fn pg_migrations() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// The SQLite schema version `migrations/postgres/0001_schema.sql` is the end state of.
const PG_BASELINE: usize = 17;

/// A fresh PostgreSQL catalog (the server stays up while the client lives).
fn pg_catalog() -> (Postgres, postgres::Client) {
    let pg = Postgres::start();
    let mut client = pg.client();
    // As the engine's migration runner will: the catalog's schema, and nothing else, on the
    // path (the trigger functions pin it).
    client.batch_execute("SET search_path = public").unwrap();
    for (name, sql) in pg_migrations() {
        client
            .batch_execute(&sql)
            .unwrap_or_else(|e| panic!("migrations/postgres/{name}: {e:?}"));
    }
    (pg, client)
}

/// A fresh SQLite catalog at the current schema version, made by the real migration runner.
fn sqlite_catalog() -> (tempfile::TempDir, rusqlite::Connection) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.db");
    let migrated = stowage::catalog::migrate_file(&path).unwrap();
    assert_eq!(migrated.applied.len(), stowage::catalog::SCHEMA_VERSION);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA foreign_keys = ON").unwrap();
    (dir, conn)
}

// ------------------------------------------------------------------------------------------
// Values, rows, and the two dialects.
// ------------------------------------------------------------------------------------------

/// A bound parameter. Nulls are typed: PostgreSQL checks a parameter's type even when null.
#[derive(Clone, Copy, Debug)]
enum V {
    I(i64),
    T(&'static str),
    B(&'static [u8]),
    NullI,
    NullT,
}

/// One value read back, the same for both engines.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Cell {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cell::Null => write!(f, "NULL"),
            Cell::Int(i) => write!(f, "{i}"),
            Cell::Text(t) => write!(f, "{t}"),
            Cell::Bytes(b) => write!(f, "x'{}'", hex::encode(b)),
        }
    }
}

type Rows = Vec<Vec<Cell>>;

fn render(rows: &Rows) -> String {
    rows.iter()
        .map(|r| r.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// `?N` placeholders as PostgreSQL writes them (`$N`); the scenario puts none in literals.
fn to_pg(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(|n| n.is_ascii_digit()) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

trait Engine {
    fn name(&self) -> &'static str;
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, String>;
    fn query(&mut self, sql: &str, params: &[V]) -> Rows;
}

struct Sqlite(rusqlite::Connection);

fn sqlite_value(v: &V) -> rusqlite::types::Value {
    use rusqlite::types::Value;
    match *v {
        V::I(i) => Value::Integer(i),
        V::T(t) => Value::Text(t.to_owned()),
        V::B(b) => Value::Blob(b.to_vec()),
        V::NullI | V::NullT => Value::Null,
    }
}

impl Engine for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, String> {
        // Through `query`: `execute` refuses a statement that returns rows (RETURNING).
        let values: Vec<_> = params.iter().map(sqlite_value).collect();
        let run = || -> rusqlite::Result<u64> {
            let mut stmt = self.0.prepare(sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(values))?;
            while rows.next()?.is_some() {}
            drop(rows);
            Ok(self.0.changes())
        };
        run().map_err(|e| e.to_string())
    }

    fn query(&mut self, sql: &str, params: &[V]) -> Rows {
        let values: Vec<_> = params.iter().map(sqlite_value).collect();
        let mut stmt = self.0.prepare(sql).unwrap_or_else(|e| panic!("sqlite: {sql}: {e}"));
        let n = stmt.column_count();
        stmt.query_map(rusqlite::params_from_iter(values), |row| {
            (0..n)
                .map(|i| {
                    Ok(match row.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => Cell::Null,
                        rusqlite::types::ValueRef::Integer(i) => Cell::Int(i),
                        rusqlite::types::ValueRef::Text(t) => Cell::Text(String::from_utf8(t.to_vec()).unwrap()),
                        rusqlite::types::ValueRef::Blob(b) => Cell::Bytes(b.to_vec()),
                        rusqlite::types::ValueRef::Real(r) => panic!("unexpected real {r} from {sql}"),
                    })
                })
                .collect()
        })
        .unwrap()
        .collect::<rusqlite::Result<Rows>>()
        .unwrap()
    }
}

struct Pg(postgres::Client);

fn pg_params(params: &[V]) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    params
        .iter()
        .map(|v| -> Box<dyn postgres::types::ToSql + Sync> {
            match *v {
                V::I(i) => Box::new(i),
                V::T(t) => Box::new(t),
                V::B(b) => Box::new(b),
                V::NullI => Box::new(None::<i64>),
                V::NullT => Box::new(None::<&str>),
            }
        })
        .collect()
}

impl Engine for Pg {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, String> {
        let boxed = pg_params(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = boxed.iter().map(|b| b.as_ref()).collect();
        self.0.execute(to_pg(sql).as_str(), &refs).map_err(|e| format!("{e:?}"))
    }

    fn query(&mut self, sql: &str, params: &[V]) -> Rows {
        use postgres::types::Type;
        let boxed = pg_params(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = boxed.iter().map(|b| b.as_ref()).collect();
        let rows = self
            .0
            .query(to_pg(sql).as_str(), &refs)
            .unwrap_or_else(|e| panic!("postgres: {sql}: {e:?}"));
        rows.iter()
            .map(|row| {
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| {
                        let t = col.type_();
                        let cell = if *t == Type::INT8 {
                            row.get::<_, Option<i64>>(i).map(Cell::Int)
                        } else if *t == Type::INT4 {
                            row.get::<_, Option<i32>>(i).map(|v| Cell::Int(v.into()))
                        } else if *t == Type::TEXT || *t == Type::NAME || *t == Type::VARCHAR {
                            row.get::<_, Option<String>>(i).map(Cell::Text)
                        } else if *t == Type::BYTEA {
                            row.get::<_, Option<Vec<u8>>>(i).map(Cell::Bytes)
                        } else {
                            panic!("unexpected column type {t} in {sql}")
                        };
                        cell.unwrap_or(Cell::Null)
                    })
                    .collect()
            })
            .collect()
    }
}

// ------------------------------------------------------------------------------------------
// Shape: tables, columns, indexes, triggers.
// ------------------------------------------------------------------------------------------

fn sqlite_tables(c: &rusqlite::Connection) -> Vec<String> {
    let mut s = c
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .unwrap();
    s.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

/// (name, declared type, not null) of each column of `table`, in declaration order.
fn sqlite_columns(c: &rusqlite::Connection, table: &str) -> Vec<(String, String, bool)> {
    let mut s = c
        .prepare("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?1) ORDER BY cid")
        .unwrap();
    s.query_map([table], |r| {
        let notnull: i64 = r.get(2)?;
        let pk: i64 = r.get(3)?;
        Ok((r.get(0)?, r.get(1)?, notnull == 1 || pk > 0))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Timing, event and `UPDATE OF` columns from a SQLite trigger's text.
fn sqlite_trigger_kind(sql: &str) -> (String, String, Vec<String>) {
    let upper = sql.to_uppercase().replace(['\n', '\t'], " ");
    let words: Vec<&str> = upper.split(' ').filter(|w| !w.is_empty()).collect();
    let at = words.iter().position(|w| *w == "BEFORE" || *w == "AFTER").unwrap();
    let event = words[at + 1].to_owned();
    let mut columns = Vec::new();
    if event == "UPDATE" && words[at + 2] == "OF" {
        for w in &words[at + 3..] {
            if *w == "ON" {
                break;
            }
            columns.push(w.trim_end_matches(',').to_lowercase());
        }
        columns.sort();
    }
    (words[at].to_owned(), event, columns)
}

/// An index: (name, table, columns in order, unique, normalised partial WHERE or "").
type Index = (String, String, Vec<String>, bool, String);

/// A partial index's predicate with parentheses, case and spacing normalised away.
fn norm_predicate(p: &str) -> String {
    p.to_lowercase()
        .replace(['(', ')'], " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The INTEGER PRIMARY KEY column a rowid table's rowid aliases, if any.
fn sqlite_rowid_alias(c: &rusqlite::Connection, table: &str) -> Option<String> {
    let pk: Vec<(String, String)> = c
        .prepare("SELECT name, type FROM pragma_table_info(?1) WHERE pk > 0")
        .unwrap()
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    match pk.as_slice() {
        [(name, ty)] if ty == "INTEGER" => Some(name.clone()),
        _ => None,
    }
}

/// SQLite's named indexes, each with the implicit key suffix `pragma_index_xinfo` shows (the
/// rowid as the column it aliases, or left out when it aliases none); a UNIQUE index by its
/// key columns alone.
fn sqlite_indexes(c: &rusqlite::Connection) -> Vec<Index> {
    let mut out = Vec::new();
    for table in sqlite_tables(c) {
        let alias = sqlite_rowid_alias(c, &table);
        let list: Vec<(String, bool, bool)> = c
            .prepare("SELECT name, \"unique\", partial FROM pragma_index_list(?1) WHERE origin = 'c'")
            .unwrap()
            .query_map([&table], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? == 1, r.get::<_, i64>(2)? == 1))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for (name, unique, partial) in list {
            let cols: Vec<(Option<String>, bool)> = c
                .prepare("SELECT name, key FROM pragma_index_xinfo(?1) ORDER BY seqno")
                .unwrap()
                .query_map([&name], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? == 1)))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let mut columns: Vec<String> = Vec::new();
            for (col, key) in cols {
                if unique && !key {
                    continue;
                }
                let col = col.or_else(|| alias.clone());
                if let Some(col) = col.filter(|c| !columns.contains(c)) {
                    columns.push(col);
                }
            }
            let sql: String = c
                .query_row("SELECT sql FROM sqlite_schema WHERE name = ?1", [&name], |r| r.get(0))
                .unwrap();
            let predicate = match sql.to_uppercase().find(" WHERE ") {
                Some(at) => norm_predicate(&sql[at + 7..]),
                None => String::new(),
            };
            assert_eq!(partial, !predicate.is_empty(), "{name}: {sql}");
            out.push((name, table.clone(), columns, unique, predicate));
        }
    }
    out.sort();
    out
}

fn pg_indexes(pg: &mut postgres::Client) -> Vec<Index> {
    let mut out: Vec<Index> = pg
        .query(
            "SELECT c.relname::text, t.relname::text,
                    array(SELECT a.attname::text
                            FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n)
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                           ORDER BY k.n),
                    i.indisunique, coalesce(pg_get_expr(i.indpred, i.indrelid), '')
               FROM pg_index i
               JOIN pg_class c ON c.oid = i.indexrelid
               JOIN pg_class t ON t.oid = i.indrelid
              WHERE t.relnamespace = current_schema()::regnamespace
                AND c.relname NOT IN (SELECT conname FROM pg_constraint)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let predicate: String = r.get(4);
            (r.get(0), r.get(1), r.get(2), r.get(3), norm_predicate(&predicate))
        })
        .collect();
    out.sort();
    out
}

/// A constraint: (table, kind, columns, target table, target columns, ON DELETE), kind one of
/// `p` (primary key), `u` (UNIQUE), `f` (foreign key), `c` (CHECK: no columns, one per CHECK).
type Constraint = (String, String, Vec<String>, String, Vec<String>, String);

fn sqlite_constraints(c: &rusqlite::Connection) -> Vec<Constraint> {
    let mut out = Vec::new();
    let strings = |sql: &str, arg: &str| -> Vec<String> {
        c.prepare(sql)
            .unwrap()
            .query_map([arg], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let none = || (String::new(), Vec::new(), String::new());
    for table in sqlite_tables(c) {
        let pk = strings(
            "SELECT name FROM pragma_table_info(?1) WHERE pk > 0 ORDER BY pk",
            &table,
        );
        if !pk.is_empty() {
            let (t, tc, d) = none();
            out.push((table.clone(), "p".to_owned(), pk, t, tc, d));
        }
        for index in strings("SELECT name FROM pragma_index_list(?1) WHERE origin = 'u'", &table) {
            let cols = strings(
                "SELECT name FROM pragma_index_xinfo(?1) WHERE key = 1 ORDER BY seqno",
                &index,
            );
            let (t, tc, d) = none();
            out.push((table.clone(), "u".to_owned(), cols, t, tc, d));
        }
        let fks: Vec<(i64, String, String, Option<String>, String)> = c
            .prepare(
                "SELECT id, \"table\", \"from\", \"to\", on_delete FROM pragma_foreign_key_list(?1) ORDER BY id, seq",
            )
            .unwrap()
            .query_map([&table], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut by_id: BTreeMap<i64, Constraint> = BTreeMap::new();
        for (id, target, from, to, on_delete) in fks {
            let action = match on_delete.as_str() {
                "NO ACTION" => "a",
                "RESTRICT" => "r",
                "CASCADE" => "c",
                "SET NULL" => "n",
                "SET DEFAULT" => "d",
                other => panic!("{table}: ON DELETE {other}"),
            };
            let e = by_id.entry(id).or_insert_with(|| {
                (
                    table.clone(),
                    "f".to_owned(),
                    Vec::new(),
                    target.clone(),
                    Vec::new(),
                    action.to_owned(),
                )
            });
            e.2.push(from);
            // A reference to the target's primary key may leave the column out.
            let to = to.unwrap_or_else(|| {
                strings(
                    "SELECT name FROM pragma_table_info(?1) WHERE pk > 0 ORDER BY pk",
                    &target,
                )
                .swap_remove(0)
            });
            e.4.push(to);
        }
        out.extend(by_id.into_values());
        // SQLite keeps no list of CHECKs: count them in the table's text (the word CHECK
        // followed by a parenthesis, so that "checkpoint" in a comment is not one).
        let sql: String = c
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                [&table],
                |r| r.get(0),
            )
            .unwrap();
        let upper = sql.to_uppercase();
        let checks = upper
            .match_indices("CHECK")
            .filter(|(at, _)| {
                let before = upper[..*at].chars().next_back();
                let after = upper[at + 5..].trim_start();
                !before.is_some_and(|b| b.is_alphanumeric() || b == '_') && after.starts_with('(')
            })
            .count();
        for _ in 0..checks {
            let (t, tc, d) = none();
            out.push((table.clone(), "c".to_owned(), Vec::new(), t, tc, d));
        }
    }
    out.sort();
    out
}

fn pg_constraints(pg: &mut postgres::Client) -> Vec<Constraint> {
    let mut out: Vec<Constraint> = pg
        .query(
            "SELECT t.relname::text, c.contype::text,
                    CASE WHEN c.contype = 'c' THEN '{}'::text[] ELSE
                    array(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(attnum, n)
                            JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
                           ORDER BY k.n) END,
                    coalesce(f.relname::text, ''),
                    coalesce(array(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(attnum, n)
                            JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum
                           ORDER BY k.n), '{}'),
                    CASE WHEN c.contype = 'f' THEN c.confdeltype::text ELSE '' END
               FROM pg_constraint c
               JOIN pg_class t ON t.oid = c.conrelid
               LEFT JOIN pg_class f ON f.oid = c.confrelid
              WHERE t.relnamespace = current_schema()::regnamespace",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    out.sort();
    out
}

#[test]
fn same_shape() {
    let (_sdir, sqlite) = sqlite_catalog();
    let (_pg, mut pg) = pg_catalog();

    // Every SQLite migration after the baseline has its PostgreSQL counterpart.
    let pg_files: Vec<String> = pg_migrations().into_iter().map(|(n, _)| n).collect();
    assert!(pg_files[0].starts_with("0001_"), "{pg_files:?}");
    // Empty until the first migration past the baseline (a range clippy would call reversed).
    for version in (PG_BASELINE + 1..).take_while(|v| *v <= stowage::catalog::SCHEMA_VERSION) {
        let prefix = format!("{version:04}_");
        assert!(
            pg_files.iter().any(|f| f.starts_with(&prefix)),
            "SQLite migration {version} has no migrations/postgres/{prefix}*.sql"
        );
    }
    assert_eq!(
        pg_files.len(),
        1 + stowage::catalog::SCHEMA_VERSION - PG_BASELINE,
        "{pg_files:?}"
    );

    // Tables and columns.
    let tables = sqlite_tables(&sqlite);
    let pg_tables: Vec<String> = pg
        .query(
            "SELECT table_name::text FROM information_schema.tables
              WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, pg_tables, "the same tables");
    assert!(tables.len() >= 21, "{tables:?}");
    for table in &tables {
        let expected: Vec<(String, String, bool, Option<String>)> = sqlite_columns(&sqlite, table)
            .into_iter()
            .map(|(name, ty, not_null)| {
                let (pg_type, collation) = match ty.as_str() {
                    "INTEGER" => ("bigint", None),
                    "TEXT" => ("text", Some("C".to_owned())),
                    "BLOB" => ("bytea", None),
                    other => panic!("{table}.{name}: SQLite type {other} has no translation"),
                };
                (name, pg_type.to_owned(), not_null, collation)
            })
            .collect();
        let actual: Vec<(String, String, bool, Option<String>)> = pg
            .query(
                "SELECT column_name::text, data_type::text, is_nullable = 'NO', collation_name::text
                   FROM information_schema.columns
                  WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
                &[table],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        assert_eq!(expected, actual, "columns of {table} (name, type, not null, collation)");
    }

    // Named indexes (SQLite's automatic ones back constraints, as PostgreSQL's do): table,
    // columns in order, UNIQUE, and the partial WHERE.
    assert_eq!(
        sqlite_indexes(&sqlite),
        pg_indexes(&mut pg),
        "the same named indexes (name, table, columns, unique, WHERE)"
    );

    // Primary keys, UNIQUE constraints, foreign keys (columns, target, ON DELETE), CHECKs.
    assert_eq!(
        sqlite_constraints(&sqlite),
        pg_constraints(&mut pg),
        "the same constraints"
    );

    // Every trigger function pins its search_path to the catalog's schema.
    let unpinned: Vec<(String, Option<Vec<String>>)> = pg
        .query(
            "SELECT proname::text, proconfig FROM pg_proc
              WHERE prorettype = 'trigger'::regtype AND pronamespace = current_schema()::regnamespace
                AND NOT coalesce('search_path=public' = ANY (proconfig), false)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        unpinned.is_empty(),
        "trigger functions without search_path=public: {unpinned:?}"
    );

    // Triggers: same name, table, timing, event and UPDATE OF columns.
    let mut s = sqlite
        .prepare("SELECT name, tbl_name, sql FROM sqlite_schema WHERE type = 'trigger' ORDER BY name")
        .unwrap();
    let triggers: Vec<(String, String, String, String, Vec<String>)> = s
        .query_map([], |r| {
            let sql: String = r.get(2)?;
            let (timing, event, columns) = sqlite_trigger_kind(&sql);
            Ok((r.get(0)?, r.get(1)?, timing, event, columns))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(triggers.len(), 32, "SQLite's triggers at version 18: {triggers:?}");
    let mut pg_triggers: Vec<(String, String, String, String, Vec<String>)> = pg
        .query(
            "SELECT t.trigger_name::text, t.event_object_table::text, t.action_timing::text,
                    t.event_manipulation::text,
                    coalesce((SELECT array_agg(u.event_object_column::text ORDER BY u.event_object_column)
                                FROM information_schema.triggered_update_columns u
                               WHERE u.trigger_name = t.trigger_name
                                 AND u.event_object_table = t.event_object_table), '{}'),
                    t.action_orientation::text
               FROM information_schema.triggers t
              WHERE t.trigger_schema = current_schema() ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let (name, orientation): (String, String) = (r.get(0), r.get(5));
            // SQLite's triggers are all row triggers. The closure triggers are statement
            // triggers on PostgreSQL, adding up their rows' effects (see their comment in
            // migrations/postgres/0001_schema.sql; the scenario compares the figures).
            let expected = if STATEMENT_TRIGGERS.contains(&name.as_str()) {
                "STATEMENT"
            } else {
                "ROW"
            };
            assert_eq!(orientation, expected, "trigger {name}");
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
        })
        .collect();
    pg_triggers.sort();
    assert_eq!(
        triggers, pg_triggers,
        "the same triggers (name, table, timing, event, UPDATE OF columns)"
    );
}

// ------------------------------------------------------------------------------------------
// Rows: one scenario on both engines.
// ------------------------------------------------------------------------------------------

/// A statement of the scenario; `fails`: both engines must refuse it (a constraint).
struct Stmt {
    sql: &'static str,
    params: &'static [V],
    fails: bool,
}

const fn ok(sql: &'static str, params: &'static [V]) -> Stmt {
    Stmt {
        sql,
        params,
        fails: false,
    }
}

const fn refused(sql: &'static str, params: &'static [V]) -> Stmt {
    Stmt {
        sql,
        params,
        fails: true,
    }
}

/// A step: its statements, then queries whose rows (rendered as `a,b | c,d`) both engines must
/// give.
struct Step {
    name: &'static str,
    stmts: &'static [Stmt],
    expect: &'static [(&'static str, &'static str)],
}

use V::{B, I, NullI, NullT, T};

/// The shared failed-login limiter's statements, the very text the catalog runs.
use stowage::catalog::login_throttle::{CLEAR, PRUNE, RECORD_FAILURE, SET_BLOCK};
const THROTTLE: &str = "SELECT key, failures, blocked_until_ms, last_failure_ms FROM login_throttle ORDER BY key";

/// The manifest PUT's statements (`catalog::queries`), as the real code binds them.
const PUT_MANIFEST: &str = "INSERT INTO manifests
        (repo_id, digest, media_type, size, content, artifact_type, subject, annotations,
         created_at, touched_at, platform)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)
     ON CONFLICT (repo_id, digest) DO UPDATE
        SET media_type = excluded.media_type, touched_at = excluded.touched_at,
            platform = coalesce(excluded.platform, manifests.platform)
     RETURNING id";
const PUT_REF: &str = "INSERT INTO manifest_refs (manifest_id, digest, kind)
     VALUES ((SELECT id FROM manifests WHERE repo_id = ?1 AND digest = ?2), ?3, ?4) ON CONFLICT DO NOTHING";
const PUT_TAG: &str = "INSERT INTO tags (repo_id, name, manifest_id, updated_at)
     VALUES (?1, ?2, (SELECT id FROM manifests WHERE repo_id = ?1 AND digest = ?3), ?4)
     ON CONFLICT (repo_id, name) DO UPDATE
        SET manifest_id = excluded.manifest_id, updated_at = excluded.updated_at";
const LINK_BLOB: &str =
    "INSERT INTO blobs (digest, size, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (digest) DO NOTHING";
const LINK_REPO: &str = "INSERT INTO repo_blobs (repo_id, digest, linked_at) VALUES (?1, ?2, ?3)
     ON CONFLICT (repo_id, digest) DO UPDATE SET linked_at = excluded.linked_at";
/// `catalog::spack::record_spack_build`'s piece insert.
const ADD_PIECE: &str = "INSERT INTO blob_pieces (digest, ordinal, piece, start, len) VALUES (?1, ?2, ?3, ?4, ?5)";
/// `catalog::spack::sync_tag`'s statements.
const CLEAR_SPEC: &str = "DELETE FROM spack_specs WHERE repo_id = ?1 AND tag = ?2";
const PUT_NODE: &str =
    "INSERT INTO spack_nodes (repo_id, hash, name, version, platform, os, target, compiler, external, node)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT DO NOTHING";
const PUT_DEP: &str =
    "INSERT INTO spack_deps (repo_id, hash, dep_hash, deptypes) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING";
const PUT_SPEC: &str = "INSERT INTO spack_specs (repo_id, tag, hash, manifest_id, layout_version,
                              name, version, platform, os, target, compiler)
     VALUES (?1, ?2, ?3, (SELECT id FROM manifests WHERE repo_id = ?1 AND digest = ?4), ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
const PUT_CLOSURE: &str = "INSERT INTO spack_closure (repo_id, tag, hash) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING";

const REPOS: &str = "SELECT name, tag_count, blob_bytes, manifest_bytes FROM repositories ORDER BY name";
const NODES: &str = "SELECT hash, closure_refs, spec_refs, ref_count FROM spack_nodes ORDER BY id";
const INDEX: &str =
    "SELECT generation, coalesce(built_generation, -1), coalesce(manifest_digest, '-'), specs, old_layout_specs
     FROM spack_index WHERE repo_id = 2";
const CONTENT: &str = "SELECT value FROM content_epoch";
const AUTH: &str = "SELECT value FROM auth_epoch";
/// The times triggers write, as -1 when they are the test's clock's "now" (within
/// [`NOW_SLACK`] seconds) and -2 when they are any other large value (milliseconds, a shifted
/// time zone, a stale transaction time); the scenario's own times are small numbers.
/// `NOW_UNIX` is replaced by the current unix time when the query runs ([`at_now`]).
const TOUCHED: &str = "SELECT digest, CASE WHEN abs(touched_at - NOW_UNIX) <= NOW_SLACK THEN -1
                               WHEN touched_at > 1000000000 THEN -2 ELSE touched_at END
     FROM manifests ORDER BY id";
const LINKED: &str = "SELECT repo_id, digest, CASE WHEN abs(linked_at - NOW_UNIX) <= NOW_SLACK THEN -1
                                      WHEN linked_at > 1000000000 THEN -2 ELSE linked_at END
     FROM repo_blobs ORDER BY repo_id, digest";

/// How far a trigger-written time may be from the test's clock (the scenario takes a second or
/// two; both engines run on this machine's clock).
const NOW_SLACK: i64 = 5;

/// `sql` with `NOW_UNIX` and `NOW_SLACK` filled in from the test's clock.
fn at_now(sql: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    sql.replace("NOW_UNIX", &now.to_string())
        .replace("NOW_SLACK", &NOW_SLACK.to_string())
}

const ZLIB: &str = "zlib-1.3-aaaa.spack";
const LIBPNG: &str = "libpng-1.6-dddd.spack";
const PY: &str = "py-3.12-pppp.spack";
const CURL_A: &str = "curl-8.5-eeee.spack";
const CURL_B: &str = "curl-8.5-eeee-again.spack";

const SCENARIO: &[Step] = &[
    Step {
        name: "repositories",
        stmts: &[
            ok("INSERT INTO repositories (name, created_at) VALUES (?1, 100)", &[T("team/app")]),
            ok("INSERT INTO repositories (name, created_at) VALUES (?1, 100)", &[T("spack")]),
            ok("INSERT INTO repositories (name, created_at) VALUES (?1, 100)", &[T("mirror")]),
            refused("INSERT INTO repositories (name, created_at) VALUES (?1, 100)", &[T("spack")]),
        ],
        expect: &[
            ("SELECT id, name FROM repositories ORDER BY id", "1,team/app | 2,spack | 3,mirror"),
            (REPOS, "mirror,0,0,0 | spack,0,0,0 | team/app,0,0,0"),
        ],
    },
    Step {
        name: "blobs linked, one shared, one linked again",
        stmts: &[
            ok(LINK_BLOB, &[T("sha256:b1"), I(1000), I(100)]),
            ok(LINK_BLOB, &[T("sha256:b2"), I(2000), I(100)]),
            ok(LINK_BLOB, &[T("sha256:b3"), I(300), I(100)]),
            ok(LINK_BLOB, &[T("sha256:b1"), I(1000), I(110)]),
            refused(LINK_BLOB, &[T("sha256:neg"), I(-1), I(100)]),
            ok(LINK_REPO, &[I(1), T("sha256:b1"), I(100)]),
            ok(LINK_REPO, &[I(1), T("sha256:b2"), I(100)]),
            ok(LINK_REPO, &[I(1), T("sha256:b3"), I(100)]),
            ok(LINK_REPO, &[I(3), T("sha256:b1"), I(100)]),
            // Linked again: restarts the grace period, counts nothing.
            ok(LINK_REPO, &[I(1), T("sha256:b1"), I(150)]),
            // A link to a blob the catalog does not record.
            refused(LINK_REPO, &[I(1), T("sha256:unknown"), I(100)]),
        ],
        expect: &[
            (REPOS, "mirror,0,1000,0 | spack,0,0,0 | team/app,0,3300,0"),
            (LINKED, "1,sha256:b1,150 | 1,sha256:b2,100 | 1,sha256:b3,100 | 3,sha256:b1,100"),
        ],
    },
    Step {
        name: "manifests and tags",
        stmts: &[
            ok(
                PUT_MANIFEST,
                &[
                    I(1),
                    T("sha256:m1"),
                    T("application/vnd.oci.image.manifest.v1+json"),
                    I(500),
                    B(b"{\"m\":1}"),
                    NullT,
                    NullT,
                    NullT,
                    I(100),
                    T("linux/amd64"),
                ],
            ),
            ok(PUT_REF, &[I(1), T("sha256:m1"), T("sha256:b3"), T("config")]),
            ok(PUT_REF, &[I(1), T("sha256:m1"), T("sha256:b1"), T("layer")]),
            ok(PUT_REF, &[I(1), T("sha256:m1"), T("sha256:b2"), T("layer")]),
            refused(PUT_REF, &[I(1), T("sha256:m1"), T("sha256:b2"), T("bogus")]),
            ok(
                PUT_MANIFEST,
                &[
                    I(1),
                    T("sha256:m2"),
                    T("application/vnd.oci.image.manifest.v1+json"),
                    I(400),
                    B(b"{\"m\":2}"),
                    T("application/example"),
                    T("sha256:m1"),
                    T("{\"a\":\"b\"}"),
                    I(100),
                    NullT,
                ],
            ),
            ok(PUT_REF, &[I(1), T("sha256:m2"), T("sha256:b3"), T("config")]),
            ok(PUT_REF, &[I(1), T("sha256:m2"), T("sha256:b1"), T("layer")]),
            ok(PUT_TAG, &[I(1), T("latest"), T("sha256:m1"), I(100)]),
            ok(PUT_TAG, &[I(1), T("v1"), T("sha256:m1"), I(100)]),
            ok(PUT_TAG, &[I(1), T("B"), T("sha256:m2"), I(100)]),
            ok(PUT_TAG, &[I(1), T("a"), T("sha256:m2"), I(100)]),
        ],
        expect: &[
            (REPOS, "mirror,0,1000,0 | spack,0,0,0 | team/app,4,3300,900"),
            (CONTENT, "6"),
            // Byte order, as SQLite compares text (COLLATE "C" on PostgreSQL).
            ("SELECT name FROM tags ORDER BY name", "B | a | latest | v1"),
            (TOUCHED, "sha256:m1,100 | sha256:m2,100"),
        ],
    },
    Step {
        name: "manifest pushed again, a tag moved, a tag set to where it was",
        stmts: &[
            ok(
                PUT_MANIFEST,
                &[
                    I(1),
                    T("sha256:m1"),
                    T("application/vnd.oci.image.manifest.v1+json"),
                    I(500),
                    B(b"{\"m\":1}"),
                    NullT,
                    NullT,
                    NullT,
                    I(200),
                    NullT,
                ],
            ),
            ok(PUT_TAG, &[I(1), T("latest"), T("sha256:m2"), I(200)]),
            ok(PUT_TAG, &[I(1), T("a"), T("sha256:m2"), I(200)]),
        ],
        expect: &[
            (REPOS, "mirror,0,1000,0 | spack,0,0,0 | team/app,4,3300,900"),
            (CONTENT, "9"),
            // m1: touched by the tag that left it; m2 untouched (no tag left it).
            (TOUCHED, "sha256:m1,-1 | sha256:m2,100"),
            ("SELECT digest, coalesce(platform, '-') FROM manifests ORDER BY id", "sha256:m1,linux/amd64 | sha256:m2,-"),
        ],
    },
    Step {
        name: "a tag deleted",
        stmts: &[ok("DELETE FROM tags WHERE repo_id = ?1 AND name = ?2", &[I(1), T("v1")])],
        expect: &[(REPOS, "mirror,0,1000,0 | spack,0,0,0 | team/app,3,3300,900"), (CONTENT, "10")],
    },
    Step {
        name: "a manifest deleted, cascading to its tags and references",
        stmts: &[ok("DELETE FROM manifests WHERE repo_id = ?1 AND digest = ?2", &[I(1), T("sha256:m2")])],
        expect: &[
            (REPOS, "mirror,0,1000,0 | spack,0,0,0 | team/app,0,3300,500"),
            (CONTENT, "14"),
            // Its config and layer links restart their grace period; the others keep theirs.
            (LINKED, "1,sha256:b1,-1 | 1,sha256:b2,100 | 1,sha256:b3,-1 | 3,sha256:b1,100"),
            ("SELECT count(*) FROM manifest_refs", "3"),
        ],
    },
    Step {
        name: "a blob unlinked and forgotten",
        stmts: &[
            ok("DELETE FROM repo_blobs WHERE repo_id = ?1 AND digest = ?2", &[I(1), T("sha256:b2")]),
            ok(
                "DELETE FROM blobs WHERE digest = ?1 AND NOT EXISTS (SELECT 1 FROM repo_blobs WHERE digest = ?1)",
                &[T("sha256:b2")],
            ),
            // Still linked elsewhere: the foreign key refuses.
            refused("DELETE FROM blobs WHERE digest = ?1", &[T("sha256:b1")]),
        ],
        expect: &[(REPOS, "mirror,0,1000,0 | spack,0,0,0 | team/app,0,1300,500")],
    },
    Step {
        name: "Spack: zlib pushed (old layout): nodes first, then the spec and its closure",
        stmts: &[
            ok(
                PUT_MANIFEST,
                &[I(2), T("sha256:m3"), T("application/vnd.oci.image.manifest.v1+json"), I(300), B(b"3"), NullT, NullT, NullT, I(300), NullT],
            ),
            ok(PUT_TAG, &[I(2), T(ZLIB), T("sha256:m3"), I(300)]),
            ok(CLEAR_SPEC, &[I(2), T(ZLIB)]),
            ok(
                PUT_NODE,
                &[I(2), T("aaaa"), T("zlib"), T("1.3"), T("linux"), T("debian12"), T("x86_64"), T("gcc@12.2.0"), I(0), T("{\"name\":\"zlib\"}")],
            ),
            ok(PUT_DEP, &[I(2), T("aaaa"), T("bbbb"), T("[\"build\",\"link\"]")]),
            ok(PUT_DEP, &[I(2), T("aaaa"), T("cccc"), T("[\"link\"]")]),
            ok(
                PUT_NODE,
                &[I(2), T("bbbb"), T("gcc-runtime"), T("12.2.0"), T("linux"), T("debian12"), T("x86_64"), NullT, I(0), T("{\"name\":\"gcc-runtime\"}")],
            ),
            ok(PUT_DEP, &[I(2), T("bbbb"), T("cccc"), T("[\"link\"]")]),
            ok(
                PUT_NODE,
                &[I(2), T("cccc"), T("glibc"), T("2.36"), T("linux"), T("debian12"), T("x86_64"), NullT, I(1), T("{\"name\":\"glibc\"}")],
            ),
            ok(
                PUT_SPEC,
                &[I(2), T(ZLIB), T("aaaa"), T("sha256:m3"), I(2), T("zlib"), T("1.3"), T("linux"), T("debian12"), T("x86_64"), T("gcc@12.2.0")],
            ),
            ok(PUT_CLOSURE, &[I(2), T(ZLIB), T("aaaa")]),
            ok(PUT_CLOSURE, &[I(2), T(ZLIB), T("bbbb")]),
            ok(PUT_CLOSURE, &[I(2), T(ZLIB), T("cccc")]),
        ],
        expect: &[
            (NODES, "aaaa,1,1,0 | bbbb,1,0,1 | cccc,1,0,2"),
            (INDEX, "1,-1,-,1,1"),
            (REPOS, "mirror,0,1000,0 | spack,1,0,300 | team/app,0,1300,500"),
            (CONTENT, "16"),
        ],
    },
    Step {
        name: "Spack: libpng pushed, sharing zlib's DAG",
        stmts: &[
            ok(
                PUT_MANIFEST,
                &[I(2), T("sha256:m4"), T("application/vnd.oci.image.manifest.v1+json"), I(350), B(b"4"), NullT, NullT, NullT, I(400), NullT],
            ),
            ok(PUT_TAG, &[I(2), T(LIBPNG), T("sha256:m4"), I(400)]),
            ok(CLEAR_SPEC, &[I(2), T(LIBPNG)]),
            ok(
                PUT_NODE,
                &[I(2), T("dddd"), T("libpng"), T("1.6"), T("linux"), T("debian12"), T("x86_64"), T("gcc@12.2.0"), I(0), T("{\"name\":\"libpng\"}")],
            ),
            ok(PUT_DEP, &[I(2), T("dddd"), T("aaaa"), T("[\"link\"]")]),
            ok(PUT_DEP, &[I(2), T("dddd"), T("cccc"), T("[\"link\"]")]),
            // Already recorded: DO NOTHING, and sync_tag then skips the node's edges.
            ok(
                PUT_NODE,
                &[I(2), T("aaaa"), T("zlib"), T("1.3"), T("linux"), T("debian12"), T("x86_64"), T("gcc@12.2.0"), I(0), T("{\"name\":\"zlib\"}")],
            ),
            ok(
                PUT_SPEC,
                &[I(2), T(LIBPNG), T("dddd"), T("sha256:m4"), I(3), T("libpng"), T("1.6"), T("linux"), T("debian12"), T("x86_64"), T("gcc@12.2.0")],
            ),
            ok(PUT_CLOSURE, &[I(2), T(LIBPNG), T("dddd")]),
            ok(PUT_CLOSURE, &[I(2), T(LIBPNG), T("aaaa")]),
            ok(PUT_CLOSURE, &[I(2), T(LIBPNG), T("bbbb")]),
            ok(PUT_CLOSURE, &[I(2), T(LIBPNG), T("cccc")]),
            ok(PUT_CLOSURE, &[I(2), T(LIBPNG), T("cccc")]),
        ],
        expect: &[(NODES, "aaaa,2,1,1 | bbbb,2,0,1 | cccc,2,0,3 | dddd,1,1,0"), (INDEX, "2,-1,-,2,1")],
    },
    Step {
        name: "Spack: nodes recorded after the rows that name them (fsck's repair order)",
        stmts: &[
            ok(
                PUT_MANIFEST,
                &[I(2), T("sha256:m5"), T("application/vnd.oci.image.manifest.v1+json"), I(250), B(b"5"), NullT, NullT, NullT, I(500), NullT],
            ),
            ok(PUT_TAG, &[I(2), T(PY), T("sha256:m5"), I(500)]),
            ok(
                PUT_SPEC,
                &[I(2), T(PY), T("pppp"), T("sha256:m5"), I(3), T("python"), T("3.12"), NullT, NullT, NullT, NullT],
            ),
            // One statement for several rows: PostgreSQL fires the row triggers at its end.
            ok(
                "INSERT INTO spack_closure (repo_id, tag, hash) VALUES (?1, ?2, ?3), (?1, ?2, ?4), (?1, ?2, ?5)
                 ON CONFLICT DO NOTHING",
                &[I(2), T(PY), T("pppp"), T("qqqq"), T("rrrr")],
            ),
            // qqqq before its dependent: the edge's own trigger counts it.
            ok(
                PUT_NODE,
                &[I(2), T("qqqq"), T("sqlite"), T("3.45"), NullT, NullT, NullT, NullT, I(0), T("{\"name\":\"sqlite\"}")],
            ),
            ok(
                PUT_NODE,
                &[I(2), T("pppp"), T("python"), T("3.12"), NullT, NullT, NullT, NullT, I(0), T("{\"name\":\"python\"}")],
            ),
            ok(PUT_DEP, &[I(2), T("pppp"), T("qqqq"), T("[\"run\"]")]),
            ok(PUT_DEP, &[I(2), T("pppp"), T("rrrr"), T("[\"link\"]")]),
            // rrrr after the edge naming it: its node's trigger counts it.
            ok(
                PUT_NODE,
                &[I(2), T("rrrr"), T("readline"), T("8.2"), NullT, NullT, NullT, NullT, I(0), T("{\"name\":\"readline\"}")],
            ),
            // An edge needs its dependent recorded.
            refused(PUT_DEP, &[I(2), T("zzzz"), T("qqqq"), T("[\"run\"]")]),
        ],
        expect: &[
            (NODES, "aaaa,2,1,1 | bbbb,2,0,1 | cccc,2,0,3 | dddd,1,1,0 | qqqq,1,0,1 | pppp,1,1,0 | rrrr,1,0,1"),
            (INDEX, "3,-1,-,3,1"),
        ],
    },
    Step {
        name: "Spack: an edge of a listed node removed",
        stmts: &[ok(
            "DELETE FROM spack_deps WHERE repo_id = ?1 AND hash = ?2 AND dep_hash = ?3",
            &[I(2), T("pppp"), T("rrrr")],
        )],
        expect: &[(NODES, "aaaa,2,1,1 | bbbb,2,0,1 | cccc,2,0,3 | dddd,1,1,0 | qqqq,1,0,1 | pppp,1,1,0 | rrrr,1,0,0")],
    },
    Step {
        name: "Spack: a spec tag moved to an image that is no spec",
        stmts: &[
            ok(
                PUT_MANIFEST,
                &[I(2), T("sha256:m6"), T("application/vnd.oci.image.manifest.v1+json"), I(100), B(b"6"), NullT, NullT, NullT, I(600), NullT],
            ),
            ok(PUT_TAG, &[I(2), T(ZLIB), T("sha256:m6"), I(600)]),
            ok(CLEAR_SPEC, &[I(2), T(ZLIB)]),
        ],
        expect: &[
            (NODES, "aaaa,1,0,1 | bbbb,1,0,1 | cccc,1,0,3 | dddd,1,1,0 | qqqq,1,0,1 | pppp,1,1,0 | rrrr,1,0,0"),
            (INDEX, "4,-1,-,2,0"),
            (CONTENT, "22"),
        ],
    },
    Step {
        name: "Spack: a spec tag deleted, cascading to its spec and closure",
        stmts: &[
            ok("DELETE FROM tags WHERE repo_id = ?1 AND name = ?2", &[I(2), T(LIBPNG)]),
            // An edge of a node no spec lists any more: counted nowhere, so nothing changes.
            ok(
                "DELETE FROM spack_deps WHERE repo_id = ?1 AND hash = ?2 AND dep_hash = ?3",
                &[I(2), T("aaaa"), T("bbbb")],
            ),
        ],
        expect: &[
            (NODES, "aaaa,0,0,0 | bbbb,0,0,0 | cccc,0,0,0 | dddd,0,0,0 | qqqq,1,0,1 | pppp,1,1,0 | rrrr,1,0,0"),
            (INDEX, "5,-1,-,1,0"),
            (CONTENT, "23"),
        ],
    },
    Step {
        name: "Spack: a spec's manifest deleted, cascading through its tag and directly",
        stmts: &[ok("DELETE FROM manifests WHERE repo_id = ?1 AND digest = ?2", &[I(2), T("sha256:m5")])],
        expect: &[
            (NODES, "aaaa,0,0,0 | bbbb,0,0,0 | cccc,0,0,0 | dddd,0,0,0 | qqqq,0,0,0 | pppp,0,0,0 | rrrr,0,0,0"),
            (INDEX, "6,-1,-,0,0"),
            (CONTENT, "25"),
            (REPOS, "mirror,0,1000,0 | spack,1,0,750 | team/app,0,1300,500"),
        ],
    },
    Step {
        name: "Spack index published; GC bookkeeping",
        stmts: &[
            ok(
                "UPDATE spack_index SET built_generation = ?2, manifest_digest = ?3
                  WHERE repo_id = ?1 AND (built_generation IS NULL OR built_generation <= ?2)",
                &[I(2), I(6), T("sha256:idx1")],
            ),
            // An older build comes too late and changes nothing.
            ok(
                "UPDATE spack_index SET built_generation = ?2, manifest_digest = ?3
                  WHERE repo_id = ?1 AND (built_generation IS NULL OR built_generation <= ?2)",
                &[I(2), I(5), T("sha256:idx0")],
            ),
            ok(
                "INSERT INTO gc_superseded (repo_id, digest, superseded_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (repo_id, digest) DO UPDATE SET superseded_at = excluded.superseded_at",
                &[I(2), T("sha256:old"), I(500)],
            ),
            ok(
                "INSERT INTO gc_superseded (repo_id, digest, superseded_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (repo_id, digest) DO UPDATE SET superseded_at = excluded.superseded_at",
                &[I(2), T("sha256:old"), I(600)],
            ),
            ok(
                "INSERT INTO gc_state (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[T("orphans_listed_at"), I(700)],
            ),
            ok(
                "INSERT INTO gc_state (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[T("orphans_listed_at"), I(710)],
            ),
        ],
        expect: &[
            (INDEX, "6,6,sha256:idx1,0,0"),
            ("SELECT digest, superseded_at FROM gc_superseded", "sha256:old,600"),
            ("SELECT key, value FROM gc_state", "orphans_listed_at,710"),
            (CONTENT, "25"),
        ],
    },
    Step {
        name: "Spack index build recorded: a composite with its pieces, the layout, marks consumed by value",
        stmts: &[
            ok(
                "INSERT INTO blobs (digest, size, created_at, composite) VALUES (?1, ?2, ?3, 1)
                 ON CONFLICT (digest) DO NOTHING",
                &[T("sha256:cmp"), I(1500), I(700)],
            ),
            ok(LINK_BLOB, &[T("sha256:p1"), I(1000), I(700)]),
            ok(LINK_BLOB, &[T("sha256:p2"), I(2000), I(700)]),
            ok(ADD_PIECE, &[T("sha256:cmp"), I(0), T("sha256:p1"), I(0), I(1000)]),
            ok(ADD_PIECE, &[T("sha256:cmp"), I(1), T("sha256:p2"), I(100), I(500)]),
            // A piece is a recorded blob, and stays recorded while a composite names it.
            refused(ADD_PIECE, &[T("sha256:cmp"), I(2), T("sha256:none"), I(0), I(1)]),
            refused("DELETE FROM blobs WHERE digest = ?1", &[T("sha256:p2")]),
            refused(ADD_PIECE, &[T("sha256:cmp"), I(3), T("sha256:p1"), I(0), I(0)]),
            ok("DELETE FROM spack_index_layout WHERE repo_id = ?1", &[I(2)]),
            ok(
                "INSERT INTO spack_index_layout (repo_id, seg, blob, start, len, comma) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                &[I(2), I(0), T("sha256:p1"), I(10), I(990), I(0)],
            ),
            // A mark read at another value (changed since) stays.
            ok(
                "DELETE FROM spack_index_dirty WHERE repo_id = ?1 AND seg = ?2 AND mark = ?3",
                &[I(2), I(0), I(-1)],
            ),
        ],
        expect: &[
            (
                "SELECT digest, ordinal, piece, start, len FROM blob_pieces ORDER BY digest, ordinal",
                "sha256:cmp,0,sha256:p1,0,1000 | sha256:cmp,1,sha256:p2,100,500",
            ),
            ("SELECT repo_id, seg, blob, start, len, comma FROM spack_index_layout", "2,0,sha256:p1,10,990,0"),
            // Segment 0 (ids below 512) changed since the scenario began. The mark's value is
            // the engine's own (SQLite counts changes, PostgreSQL writes the changing
            // transaction's id): builds only compare it with a value they read.
            ("SELECT repo_id, seg FROM spack_index_dirty ORDER BY repo_id, seg", "2,0"),
        ],
    },
    Step {
        name: "a composite forgotten: its pieces go with it; a mark consumed at the value read",
        stmts: &[
            ok("DELETE FROM blobs WHERE digest = ?1", &[T("sha256:cmp")]),
            ok(
                "DELETE FROM spack_index_dirty WHERE repo_id = ?1 AND seg = ?2
                    AND mark = (SELECT mark FROM spack_index_dirty WHERE repo_id = ?1 AND seg = ?2)",
                &[I(2), I(0)],
            ),
        ],
        expect: &[
            ("SELECT count(*) FROM blob_pieces", "0"),
            ("SELECT count(*) FROM spack_index_dirty", "0"),
        ],
    },
    Step {
        name: "retention: a keep-list made and replaced; pull times recorded",
        stmts: &[
            ok(
                "INSERT INTO spack_keep (repo_id, name, created_at, expires_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5)",
                &[I(2), T("release"), I(100), I(9999), T("alice")],
            ),
            ok(
                "INSERT INTO spack_keep_hashes (repo_id, name, hash) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                &[I(2), T("release"), T("aaaa")],
            ),
            ok(
                "INSERT INTO spack_keep_hashes (repo_id, name, hash) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                &[I(2), T("release"), T("aaaa")],
            ),
            ok("DELETE FROM spack_keep WHERE repo_id = ?1 AND name = ?2", &[I(2), T("release")]),
            ok(
                "INSERT INTO spack_keep (repo_id, name, created_at, expires_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5)",
                &[I(2), T("release"), I(200), I(9999), NullT],
            ),
            ok(
                "INSERT INTO spack_keep_hashes (repo_id, name, hash) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                &[I(2), T("release"), T("dddd")],
            ),
            ok("UPDATE manifests SET pulled_at = ?1 WHERE repo_id = 1 AND digest = ?2", &[I(800), T("sha256:m1")]),
            ok("UPDATE manifests SET proxy_pulled_at = ?1 WHERE repo_id = 1 AND digest = ?2", &[I(900), T("sha256:m1")]),
        ],
        expect: &[
            ("SELECT name, hash FROM spack_keep_hashes", "release,dddd"),
            // Pull times are no change of what a lookup answers.
            (CONTENT, "25"),
        ],
    },
    Step {
        name: "users and API tokens",
        stmts: &[
            ok(
                "INSERT INTO users (name, password_hash, admin, created_at, updated_at) VALUES (?1, ?2, ?3, 100, 100)",
                &[T("alice"), T("$argon2id$one"), I(0)],
            ),
            refused(
                "INSERT INTO users (name, password_hash, admin, created_at, updated_at) VALUES (?1, ?2, ?3, 100, 100)",
                &[T("bob"), T("$argon2id$two"), I(2)],
            ),
            ok(
                "UPDATE users SET password_hash = ?2, credentials_epoch = ?3, updated_at = 200 WHERE name = ?1",
                &[T("alice"), T("$argon2id$three"), I(42)],
            ),
            ok(
                "INSERT INTO api_tokens (user_id, name, secret_hash, scopes, created_at, expires_at)
                 VALUES ((SELECT id FROM users WHERE name = ?1), ?2, ?3, ?4, 100, ?5)",
                &[T("alice"), T("ci"), T("hash1"), T("[]"), NullI],
            ),
            // A live token's name is taken.
            refused(
                "INSERT INTO api_tokens (user_id, name, secret_hash, scopes, created_at, expires_at)
                 VALUES ((SELECT id FROM users WHERE name = ?1), ?2, ?3, ?4, 100, ?5)",
                &[T("alice"), T("ci"), T("hash2"), T("[]"), I(5000)],
            ),
            ok("UPDATE api_tokens SET last_used_at = ?2 WHERE secret_hash = ?1", &[T("hash1"), I(300)]),
        ],
        expect: &[(AUTH, "3")],
    },
    Step {
        name: "a token revoked, its name reused, the user removed",
        stmts: &[
            ok("UPDATE api_tokens SET revoked_at = ?2 WHERE secret_hash = ?1", &[T("hash1"), I(400)]),
            ok(
                "INSERT INTO api_tokens (user_id, name, secret_hash, scopes, created_at, expires_at)
                 VALUES ((SELECT id FROM users WHERE name = ?1), ?2, ?3, ?4, 100, ?5)",
                &[T("alice"), T("ci"), T("hash2"), T("[]"), I(5000)],
            ),
            ok(
                "INSERT INTO audit_log (at, action, repository, tag, digest, actor, token_id, token_name, client, request_id, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, (SELECT id FROM api_tokens WHERE secret_hash = ?7), ?8, ?9, ?10, ?11)",
                &[
                    I(1000),
                    T("manifest.push"),
                    T("team/app"),
                    T("latest"),
                    T("sha256:m1"),
                    T("alice"),
                    T("hash2"),
                    T("ci"),
                    T("127.0.0.1"),
                    T("req-1"),
                    T("{}"),
                ],
            ),
        ],
        expect: &[(AUTH, "5"), ("SELECT count(*) FROM api_tokens", "2")],
    },
    Step {
        name: "a user removed, cascading to their tokens",
        stmts: &[ok("DELETE FROM users WHERE name = ?1", &[T("alice")])],
        expect: &[(AUTH, "8"), ("SELECT count(*) FROM api_tokens", "0"), ("SELECT count(*) FROM audit_log", "1")],
    },
    Step {
        name: "upload sessions",
        stmts: &[
            ok(
                "INSERT INTO uploads (id, repo, algorithm, \"offset\", hash_state, staging, created_at, updated_at, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 100, 100, ?7)",
                &[T("u1"), T("team/app"), T("sha256"), I(0), B(b"\x00\xff"), T("{}"), NullT],
            ),
            refused(
                "INSERT INTO uploads (id, repo, algorithm, \"offset\", hash_state, staging, created_at, updated_at, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 100, 100, ?7)",
                &[T("u2"), T("team/app"), T("sha256"), I(-5), B(b""), T("{}"), T("alice")],
            ),
            ok(
                "UPDATE uploads SET \"offset\" = ?2, hash_state = ?3, updated_at = 200 WHERE id = ?1",
                &[T("u1"), I(1024), B(b"\x01\x02")],
            ),
        ],
        expect: &[("SELECT id, \"offset\", hash_state FROM uploads", "u1,1024,x'0102'")],
    },
    Step {
        name: "failed logins shared by replicas: counted and blocked (a clock behind moves nothing back)",
        stmts: &[
            ok(RECORD_FAILURE, &[B(b"\x02pair"), I(1000), I(-59_000)]),
            ok(RECORD_FAILURE, &[B(b"\x01addr"), I(1000), I(-59_000)]),
            ok(RECORD_FAILURE, &[B(b"\x02pair"), I(2000), I(-58_000)]),
            ok(SET_BLOCK, &[B(b"\x02pair"), I(3000)]),
            ok(RECORD_FAILURE, &[B(b"\x02pair"), I(1500), I(-58_500)]),
            ok(RECORD_FAILURE, &[B(b"\x01old"), I(10), I(-59_990)]),
            refused(
                "INSERT INTO login_throttle (key, failures, blocked_until_ms, last_failure_ms) VALUES (?1, 0, 0, 0)",
                &[B(b"\x01zero")],
            ),
        ],
        expect: &[(
            THROTTLE,
            "x'0161646472',1,0,1000 | x'016f6c64',1,0,10 | x'0270616972',3,3000,2000",
        )],
    },
    Step {
        name: "failed logins: expired rows pruned or started again, a blocked one kept",
        stmts: &[
            ok(PRUNE, &[I(100), I(5000), I(16)]),
            ok(RECORD_FAILURE, &[B(b"\x01addr"), I(70_000), I(10_000)]),
            ok(RECORD_FAILURE, &[B(b"\x02pair"), I(2500), I(2100)]),
        ],
        expect: &[(THROTTLE, "x'0161646472',1,0,70000 | x'0270616972',4,3000,2500")],
    },
    Step {
        name: "failed logins: a success clears its pair",
        stmts: &[ok(CLEAR, &[B(b"\x02pair")])],
        expect: &[(THROTTLE, "x'0161646472',1,0,70000")],
    },
    Step {
        name: "Spack: one manifest under two spec tags, both live when their repository goes",
        stmts: &[
            ok(
                PUT_MANIFEST,
                &[I(2), T("sha256:m8"), T("application/vnd.oci.image.manifest.v1+json"), I(120), B(b"8"), NullT, NullT, NullT, I(800), NullT],
            ),
            ok(PUT_TAG, &[I(2), T(CURL_A), T("sha256:m8"), I(800)]),
            ok(CLEAR_SPEC, &[I(2), T(CURL_A)]),
            ok(
                PUT_NODE,
                &[I(2), T("eeee"), T("curl"), T("8.5"), T("linux"), T("debian12"), T("x86_64"), T("gcc@12.2.0"), I(0), T("{\"name\":\"curl\"}")],
            ),
            ok(PUT_DEP, &[I(2), T("eeee"), T("cccc"), T("[\"link\"]")]),
            ok(
                PUT_SPEC,
                &[I(2), T(CURL_A), T("eeee"), T("sha256:m8"), I(3), T("curl"), T("8.5"), T("linux"), T("debian12"), T("x86_64"), T("gcc@12.2.0")],
            ),
            ok(PUT_CLOSURE, &[I(2), T(CURL_A), T("eeee")]),
            ok(PUT_CLOSURE, &[I(2), T(CURL_A), T("cccc")]),
            ok(PUT_TAG, &[I(2), T(CURL_B), T("sha256:m8"), I(810)]),
            ok(CLEAR_SPEC, &[I(2), T(CURL_B)]),
            ok(
                PUT_NODE,
                &[I(2), T("eeee"), T("curl"), T("8.5"), T("linux"), T("debian12"), T("x86_64"), T("gcc@12.2.0"), I(0), T("{\"name\":\"curl\"}")],
            ),
            ok(
                PUT_SPEC,
                &[I(2), T(CURL_B), T("eeee"), T("sha256:m8"), I(3), T("curl"), T("8.5"), T("linux"), T("debian12"), T("x86_64"), T("gcc@12.2.0")],
            ),
            ok(PUT_CLOSURE, &[I(2), T(CURL_B), T("eeee")]),
            ok(PUT_CLOSURE, &[I(2), T(CURL_B), T("cccc")]),
        ],
        expect: &[(NODES, "aaaa,0,0,0 | bbbb,0,0,0 | cccc,2,0,1 | dddd,0,0,0 | qqqq,0,0,0 | pppp,0,0,0 | rrrr,0,0,0 | eeee,2,2,0"), (INDEX, "8,6,sha256:idx1,2,0"), ("SELECT count(*) FROM spack_closure", "4")],
    },
    Step {
        name: "a repository deleted, cascading to everything in it",
        stmts: &[ok("DELETE FROM repositories WHERE name = ?1", &[T("spack")])],
        expect: &[
            (REPOS, "mirror,0,1000,0 | team/app,0,1300,500"),
            ("SELECT count(*) FROM spack_nodes", "0"),
            ("SELECT count(*) FROM spack_deps", "0"),
            ("SELECT count(*) FROM spack_specs", "0"),
            ("SELECT count(*) FROM spack_closure", "0"),
            ("SELECT count(*) FROM spack_index_dirty", "0"),
            ("SELECT count(*) FROM spack_index", "0"),
            ("SELECT count(*) FROM spack_keep_hashes", "0"),
            ("SELECT count(*) FROM gc_superseded", "0"),
            ("SELECT count(*) FROM manifests", "1"),
        ],
    },
];

/// Tables whose `id` is a surrogate key, and the columns elsewhere that hold one of them.
const ID_TABLES: &[&str] = &[
    "repositories",
    "manifests",
    "users",
    "api_tokens",
    "audit_log",
    "spack_nodes",
];
const ID_REFS: &[(&str, &str)] = &[
    ("repo_id", "repositories"),
    ("manifest_id", "manifests"),
    ("user_id", "users"),
    ("token_id", "api_tokens"),
];
/// Times the triggers write ("now"); the scenario's own are small numbers.
const TRIGGER_TIMES: &[(&str, &str)] = &[("repo_blobs", "linked_at"), ("manifests", "touched_at")];

/// PostgreSQL triggers that fire once per statement over a transition table (every other one,
/// and every SQLite trigger, fires per row).
const STATEMENT_TRIGGERS: &[&str] = &["spack_figures_closure_added", "spack_figures_closure_removed"];

/// Columns whose values each engine chooses itself, compared for presence only: a Spack
/// segment's dirty mark is only ever compared for equality with a value a build read, and
/// SQLite counts changes where PostgreSQL writes the changing transaction's id (see
/// `migrations/postgres/0018_spack_index_composite.sql`).
const ENGINE_OWN_VALUES: &[(&str, &str)] = &[("spack_index_dirty", "mark")];

/// Every table's rows, ids replaced by their rank among the table's ids (see the module doc).
fn snapshot(engine: &mut dyn Engine, tables: &[(String, Vec<String>)]) -> BTreeMap<String, Rows> {
    let mut ranks: HashMap<&str, HashMap<i64, i64>> = HashMap::new();
    for table in ID_TABLES {
        let rows = engine.query(&format!("SELECT id FROM {table} ORDER BY id"), &[]);
        let map = rows
            .iter()
            .enumerate()
            .map(|(rank, r)| match r[0] {
                Cell::Int(id) => (id, rank as i64 + 1),
                ref other => panic!("{table}.id is {other:?}"),
            })
            .collect();
        ranks.insert(table, map);
    }
    let mut out = BTreeMap::new();
    for (table, columns) in tables {
        let select: Vec<String> = columns
            .iter()
            .map(|c| {
                let quoted = format!("\"{c}\"");
                if ENGINE_OWN_VALUES.contains(&(table.as_str(), c.as_str())) {
                    format!("CASE WHEN {quoted} IS NULL THEN NULL ELSE 0 END")
                } else if TRIGGER_TIMES.contains(&(table.as_str(), c.as_str())) {
                    format!(
                        "CASE WHEN abs({quoted} - NOW_UNIX) <= NOW_SLACK THEN -1
                              WHEN {quoted} > 1000000000 THEN -2 ELSE {quoted} END"
                    )
                } else {
                    quoted
                }
            })
            .collect();
        let order: Vec<String> = (1..=columns.len()).map(|i| format!("{i} NULLS FIRST")).collect();
        let sql = format!(
            "SELECT {} FROM {table} ORDER BY {}",
            select.join(", "),
            order.join(", ")
        );
        let mut rows = engine.query(&at_now(&sql), &[]);
        for row in &mut rows {
            for (cell, column) in row.iter_mut().zip(columns) {
                assert!(
                    !(*cell == Cell::Int(-2) && TRIGGER_TIMES.contains(&(table.as_str(), column.as_str()))),
                    "{}: {table}.{column} is not the current unix time",
                    engine.name()
                );
                let target = if column == "id" && ID_TABLES.contains(&table.as_str()) {
                    Some(table.as_str())
                } else {
                    ID_REFS.iter().find(|(c, _)| c == column).map(|(_, t)| *t)
                };
                if let (Some(target), Cell::Int(id)) = (target, &*cell) {
                    *cell = match ranks[target].get(id) {
                        Some(rank) => Cell::Text(format!("{target}#{rank}")),
                        None => Cell::Text(format!("{target}#gone")),
                    };
                }
            }
        }
        out.insert(table.clone(), rows);
    }
    out
}

#[test]
fn same_rows() {
    let (_sdir, sqlite) = sqlite_catalog();
    let tables: Vec<(String, Vec<String>)> = sqlite_tables(&sqlite)
        .into_iter()
        .map(|t| {
            let columns = sqlite_columns(&sqlite, &t)
                .into_iter()
                .map(|(name, _, _)| name)
                .collect();
            (t, columns)
        })
        .collect();
    let (_pg, pg) = pg_catalog();
    let mut engines: [Box<dyn Engine>; 2] = [Box::new(Sqlite(sqlite)), Box::new(Pg(pg))];

    // Tables the scenario leaves empty throughout would prove nothing about their triggers.
    let mut ever_filled: BTreeSet<String> = BTreeSet::new();
    for step in SCENARIO {
        for engine in engines.iter_mut() {
            for stmt in step.stmts {
                let outcome = engine.exec(stmt.sql, stmt.params);
                match (stmt.fails, outcome) {
                    (false, Err(e)) => panic!("{}: step {:?}: {}: {e}", engine.name(), step.name, stmt.sql),
                    (true, Ok(_)) => panic!("{}: step {:?}: accepted {}", engine.name(), step.name, stmt.sql),
                    _ => {}
                }
            }
            for (sql, expected) in step.expect {
                let got = render(&engine.query(&at_now(sql), &[]));
                assert_eq!(&got, expected, "{}: after step {:?}: {sql}", engine.name(), step.name);
            }
        }
        let [a, b] = &mut engines;
        let left = snapshot(a.as_mut(), &tables);
        let right = snapshot(b.as_mut(), &tables);
        for (table, rows) in &left {
            assert_eq!(
                Some(rows),
                right.get(table),
                "table {table} differs after step {:?}",
                step.name
            );
            if !rows.is_empty() {
                ever_filled.insert(table.clone());
            }
        }
    }
    let all: BTreeSet<String> = tables.iter().map(|(t, _)| t.clone()).collect();
    let never: Vec<&String> = all.difference(&ever_filled).collect();
    assert!(never.is_empty(), "tables the scenario never fills: {never:?}");
}
