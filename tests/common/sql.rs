//! Plain SQL on a test server's catalog, whichever engine it runs on
//! ([`super::TestServer::catalog_sql`]): for tests that plant, age or spoil rows behind the
//! server's back, or read what it recorded.
//!
//! SQL is written once, in the dialect both engines share, with SQLite's `?N` placeholders
//! (turned into PostgreSQL's `$N` here, outside quoted strings and identifiers). Parameters are
//! typed ([`Param`]): on PostgreSQL the statement is prepared with the parameters' types (INT8,
//! TEXT, BYTEA), so a bare `?N` needs no cast. What differs between the engines stays the
//! test's to mind: PostgreSQL's `sum()` of a BIGINT is NUMERIC (cast it to BIGINT), its
//! `EXISTS` a boolean (read back as 0 or 1 here, as SQLite gives it), and a column named
//! `offset` must be quoted.
//!
//! On SQLite it is a connection to the data directory's `catalog.db`; on PostgreSQL a session,
//! as the superuser, on the server's own database, run by a thread of its own (the synchronous
//! client runs a runtime of its own, which must not start or stop inside an async test). The
//! session lasts as long as the [`CatalogSql`]: what it holds (a transaction, a session-level
//! advisory lock) is held until then.

use std::sync::mpsc;

use super::catalog::Catalog;
use super::postgres::shared;

/// A statement's parameter, bound as INT8, TEXT or BYTEA on PostgreSQL (a null keeps its type).
#[derive(Clone, Debug)]
pub enum Param {
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
    NullInt,
    NullText,
    NullBytes,
}

impl From<i64> for Param {
    fn from(v: i64) -> Param {
        Param::Int(v)
    }
}

impl From<&str> for Param {
    fn from(v: &str) -> Param {
        Param::Text(v.to_owned())
    }
}

impl From<String> for Param {
    fn from(v: String) -> Param {
        Param::Text(v)
    }
}

impl From<&String> for Param {
    fn from(v: &String) -> Param {
        Param::Text(v.clone())
    }
}

impl From<Vec<u8>> for Param {
    fn from(v: Vec<u8>) -> Param {
        Param::Bytes(v)
    }
}

impl From<&[u8]> for Param {
    fn from(v: &[u8]) -> Param {
        Param::Bytes(v.to_vec())
    }
}

impl From<Option<i64>> for Param {
    fn from(v: Option<i64>) -> Param {
        v.map_or(Param::NullInt, Param::Int)
    }
}

impl From<Option<&str>> for Param {
    fn from(v: Option<&str>) -> Param {
        v.map_or(Param::NullText, Param::from)
    }
}

impl From<Option<String>> for Param {
    fn from(v: Option<String>) -> Param {
        v.map_or(Param::NullText, Param::Text)
    }
}

/// A value read back, the same from either engine (a PostgreSQL boolean is 0 or 1, as SQLite
/// has it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl Value {
    /// The integer (panics on anything else).
    pub fn int(&self) -> i64 {
        match self {
            Value::Int(i) => *i,
            other => panic!("expected an integer, got {other:?}"),
        }
    }

    /// The integer, or `None` for NULL.
    pub fn opt_int(&self) -> Option<i64> {
        match self {
            Value::Null => None,
            other => Some(other.int()),
        }
    }

    /// A 0/1 integer (a flag column, or an `EXISTS`) as a boolean.
    pub fn flag(&self) -> bool {
        match self.int() {
            0 => false,
            1 => true,
            other => panic!("expected 0 or 1, got {other}"),
        }
    }

    /// The text (panics on anything else).
    pub fn text(&self) -> &str {
        match self {
            Value::Text(t) => t,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// One row read back.
pub type Row = Vec<Value>;

/// SQL on one test server's catalog (see the module doc).
pub struct CatalogSql {
    engine: Engine,
}

enum Engine {
    Sqlite(rusqlite::Connection),
    Postgres(PgSession),
}

impl CatalogSql {
    /// Opens the SQLite catalog in `data_dir`.
    pub fn sqlite(data_dir: &std::path::Path) -> CatalogSql {
        let path = data_dir.join("catalog.db");
        let conn = rusqlite::Connection::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        CatalogSql {
            engine: Engine::Sqlite(conn),
        }
    }

    /// A session on `database` of the shared PostgreSQL test server.
    pub fn postgres(database: &str) -> CatalogSql {
        CatalogSql {
            engine: Engine::Postgres(PgSession::connect(database)),
        }
    }

    /// The engine it runs on.
    pub fn catalog(&self) -> Catalog {
        match self.engine {
            Engine::Sqlite(_) => Catalog::Sqlite,
            Engine::Postgres(_) => Catalog::Postgres,
        }
    }

    /// Runs `sql` (statements separated by `;`, no parameters, results ignored).
    pub fn execute_batch(&self, sql: &str) {
        let result = match &self.engine {
            Engine::Sqlite(conn) => conn.execute_batch(sql).map_err(|e| e.to_string()),
            Engine::Postgres(pg) => {
                let sql = sql.to_owned();
                pg.run(move |client| client.batch_execute(&sql).map_err(describe))
            }
        };
        result.unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.name()));
    }

    /// Runs one statement; returns how many rows it changed (or returned).
    pub fn execute(&self, sql: &str, params: &[Param]) -> u64 {
        let result = match &self.engine {
            Engine::Sqlite(conn) => (|| -> rusqlite::Result<u64> {
                // Through `query`: `execute` refuses a statement that returns rows.
                let mut stmt = conn.prepare(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(params.iter().map(sqlite_value)))?;
                let mut returned = 0;
                while rows.next()?.is_some() {
                    returned += 1;
                }
                drop(rows);
                let changed = if stmt.readonly() { 0 } else { conn.changes() };
                Ok(returned.max(changed))
            })()
            .map_err(|e| e.to_string()),
            Engine::Postgres(pg) => {
                let (sql, params) = (to_pg(sql), params.to_vec());
                pg.run(move |client| {
                    let stmt = client.prepare_typed(&sql, &pg_types(&params)).map_err(describe)?;
                    client.execute(&stmt, &pg_refs(&pg_params(&params))).map_err(describe)
                })
            }
        };
        result.unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.name()))
    }

    /// The rows `sql` returns.
    pub fn query_rows(&self, sql: &str, params: &[Param]) -> Vec<Row> {
        let result = match &self.engine {
            Engine::Sqlite(conn) => (|| -> Result<Vec<Row>, String> {
                let mut stmt = conn.prepare(sql).map_err(|e| e.to_string())?;
                let n = stmt.column_count();
                let mut rows = stmt
                    .query(rusqlite::params_from_iter(params.iter().map(sqlite_value)))
                    .map_err(|e| e.to_string())?;
                let mut out = Vec::new();
                while let Some(row) = rows.next().map_err(|e| e.to_string())? {
                    let mut values = Vec::with_capacity(n);
                    for i in 0..n {
                        use rusqlite::types::ValueRef;
                        values.push(match row.get_ref(i).map_err(|e| e.to_string())? {
                            ValueRef::Null => Value::Null,
                            ValueRef::Integer(v) => Value::Int(v),
                            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                            ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
                            ValueRef::Real(r) => return Err(format!("column {i} is a real ({r})")),
                        });
                    }
                    out.push(values);
                }
                Ok(out)
            })(),
            Engine::Postgres(pg) => {
                let (sql, params) = (to_pg(sql), params.to_vec());
                pg.run(move |client| {
                    let stmt = client.prepare_typed(&sql, &pg_types(&params)).map_err(describe)?;
                    let rows = client.query(&stmt, &pg_refs(&pg_params(&params))).map_err(describe)?;
                    rows.iter().map(pg_row).collect()
                })
            }
        };
        result.unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.name()))
    }

    /// The one row `sql` returns (panics on none or more).
    pub fn query_row(&self, sql: &str, params: &[Param]) -> Row {
        let mut rows = self.query_rows(sql, params);
        assert_eq!(rows.len(), 1, "{}: {sql}: one row expected: {rows:?}", self.name());
        rows.pop().expect("one row")
    }

    /// The first column of the one row `sql` returns, an integer.
    pub fn query_i64(&self, sql: &str, params: &[Param]) -> i64 {
        self.query_row(sql, params)[0].int()
    }

    /// The first column of the one row `sql` returns, a text.
    pub fn query_string(&self, sql: &str, params: &[Param]) -> String {
        self.query_row(sql, params)[0].text().to_owned()
    }

    fn name(&self) -> &'static str {
        match self.engine {
            Engine::Sqlite(_) => "sqlite",
            Engine::Postgres(_) => "postgres",
        }
    }
}

fn sqlite_value(p: &Param) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match p {
        Param::Int(i) => V::Integer(*i),
        Param::Text(t) => V::Text(t.clone()),
        Param::Bytes(b) => V::Blob(b.clone()),
        Param::NullInt | Param::NullText | Param::NullBytes => V::Null,
    }
}

/// `sql` with each `?N` outside quotes (`'…'` strings, `"…"` identifiers, `--` comments)
/// written `$N`.
pub fn to_pg(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    // The quote being read (`'` or `"`; a doubled one inside is read as two quotes, which
    // leave and re-enter the quote at once), or `-` in a line comment.
    let mut inside: Option<char> = None;
    while let Some(c) = chars.next() {
        match inside {
            Some('-') => {
                if c == '\n' {
                    inside = None;
                }
            }
            Some(q) => {
                if c == q {
                    inside = None;
                }
            }
            None => match c {
                '\'' | '"' => inside = Some(c),
                '-' if chars.peek() == Some(&'-') => inside = Some('-'),
                '?' if chars.peek().is_some_and(|n| n.is_ascii_digit()) => {
                    out.push('$');
                    continue;
                }
                _ => {}
            },
        }
        out.push(c);
    }
    out
}

fn pg_types(params: &[Param]) -> Vec<::postgres::types::Type> {
    use ::postgres::types::Type;
    params
        .iter()
        .map(|p| match p {
            Param::Int(_) | Param::NullInt => Type::INT8,
            Param::Text(_) | Param::NullText => Type::TEXT,
            Param::Bytes(_) | Param::NullBytes => Type::BYTEA,
        })
        .collect()
}

type PgParam = Box<dyn ::postgres::types::ToSql + Sync + Send>;

fn pg_params(params: &[Param]) -> Vec<PgParam> {
    params
        .iter()
        .map(|p| -> PgParam {
            match p {
                Param::Int(i) => Box::new(*i),
                Param::Text(t) => Box::new(t.clone()),
                Param::Bytes(b) => Box::new(b.clone()),
                Param::NullInt => Box::new(None::<i64>),
                Param::NullText => Box::new(None::<String>),
                Param::NullBytes => Box::new(None::<Vec<u8>>),
            }
        })
        .collect()
}

fn pg_refs(params: &[PgParam]) -> Vec<&(dyn ::postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ::postgres::types::ToSql + Sync))
        .collect()
}

fn pg_row(row: &::postgres::Row) -> Result<Row, String> {
    use ::postgres::types::Type;
    row.columns()
        .iter()
        .enumerate()
        .map(|(i, col)| {
            let t = col.type_();
            let get_err = |e: ::postgres::Error| format!("column {}: {e}", col.name());
            let value = if *t == Type::INT8 {
                row.try_get::<_, Option<i64>>(i).map_err(get_err)?.map(Value::Int)
            } else if *t == Type::INT4 {
                row.try_get::<_, Option<i32>>(i)
                    .map_err(get_err)?
                    .map(|v| Value::Int(v.into()))
            } else if *t == Type::INT2 {
                row.try_get::<_, Option<i16>>(i)
                    .map_err(get_err)?
                    .map(|v| Value::Int(v.into()))
            } else if *t == Type::BOOL {
                row.try_get::<_, Option<bool>>(i)
                    .map_err(get_err)?
                    .map(|v| Value::Int(v.into()))
            } else if [Type::TEXT, Type::VARCHAR, Type::NAME, Type::BPCHAR].contains(t) {
                row.try_get::<_, Option<String>>(i).map_err(get_err)?.map(Value::Text)
            } else if *t == Type::BYTEA {
                row.try_get::<_, Option<Vec<u8>>>(i).map_err(get_err)?.map(Value::Bytes)
            } else if *t == Type::VOID {
                None
            } else if *t == Type::NUMERIC {
                return Err(format!(
                    "column {} is NUMERIC (a sum() of BIGINT is: CAST it AS BIGINT)",
                    col.name()
                ));
            } else {
                return Err(format!(
                    "column {} has type {t}, which the tests do not read",
                    col.name()
                ));
            };
            Ok(value.unwrap_or(Value::Null))
        })
        .collect()
}

/// A PostgreSQL error as text: the SQLSTATE and the server's message when it has them.
fn describe(e: ::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

type Job = Box<dyn FnOnce(&mut ::postgres::Client) + Send>;

/// A PostgreSQL session owned by a thread of its own, which runs each call to its end.
struct PgSession {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PgSession {
    fn connect(database: &str) -> PgSession {
        let mut config = shared().admin.clone();
        config.dbname(database);
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("catalog-sql".into())
            .spawn(move || {
                let mut client = match config.connect(::postgres::NoTls) {
                    Ok(client) => client,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                for job in queue {
                    job(&mut client);
                }
            })
            .expect("spawn the catalog SQL thread");
        ready
            .recv()
            .unwrap_or_else(|_| Err("its thread ended".into()))
            .unwrap_or_else(|e| panic!("connect to database {database}: {e}"));
        PgSession {
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    /// Runs `f` on the session and returns what it did.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut ::postgres::Client) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .expect("session open")
            .send(Box::new(move |client| {
                let _ = tx.send(f(client));
            }))
            .map_err(|_| "the session's thread ended".to_owned())?;
        rx.recv().map_err(|_| "the session's thread ended".to_owned())?
    }
}

impl Drop for PgSession {
    fn drop(&mut self) {
        // Its thread ends (closing the session) once the queue does.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
