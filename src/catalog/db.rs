//! One SQL interface over the catalog's two engines, SQLite and PostgreSQL.
//!
//! The catalog's queries are written once, against [`Connection`], whose methods have the
//! shape of rusqlite's (`execute`, `query_row`, `prepare_cached`, `query_map`, `optional`), so
//! that the SQLite engine keeps its speed: on SQLite each call goes straight to rusqlite, with
//! the statement cache, planner stability and bindings it had before (a parameter is handed to
//! SQLite as a borrowed value, nothing is copied).
//!
//! On PostgreSQL the same text runs through the synchronous `postgres` client, owned by one
//! catalog thread like a SQLite connection is:
//! - placeholders are rewritten once per statement (`?N` → `$N`, a bare `?` numbered as SQLite
//!   numbers it), and the prepared statement is cached per connection;
//! - parameters take the type the server inferred for them ([`Value`] → `INT8`, `INT4`, `BOOL`,
//!   `TEXT`, `BYTEA`), and a column is read by what it holds (an `i64` from any integer or a
//!   boolean, since `EXISTS` and comparisons are booleans there and integers in SQLite);
//! - rows are fetched whole before a result is iterated, so a job may run other statements
//!   while it walks them, as it may on SQLite.
//!
//! What the two dialects do not share (a handful of statements) is chosen with
//! [`Connection::engine`]; `docs/postgres.md` lists the differences a query must mind.

use std::cell::RefCell;
use std::collections::HashMap;

/// Which database a [`Connection`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// A catalog query's failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", pg_message(.0))]
    Postgres(#[from] postgres::Error),
    #[error("query returned no rows")]
    NoRows,
    /// A column held something its reader cannot take.
    #[error("column {column}: {source}")]
    Conversion {
        column: usize,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A PostgreSQL error with what the server said (the client's own text is just "db error").
fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            if let Some(at) = db.where_() {
                text.push_str(" at ");
                text.push_str(at);
            }
            text
        }
        // The client's errors name their cause only as a source ("error performing TLS
        // handshake" says nothing of the certificate it refused).
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !text.ends_with(&cause_text) {
                    text.push_str(": ");
                    text.push_str(&cause_text);
                }
                source = cause.source();
            }
            text
        }
    }
}

impl Error {
    /// A conversion failure of column `column`.
    pub fn conversion(column: usize, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::Conversion {
            column,
            source: source.into(),
        }
    }

    /// Whether the database's disk is full (SQLite's `SQLITE_FULL`, PostgreSQL's `53100`).
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Sqlite(e) => e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
            Error::Postgres(e) => e.code() == Some(&postgres::error::SqlState::DISK_FULL),
            _ => false,
        }
    }

    /// Whether the database cannot be reached or is not accepting work now, so that the same
    /// request may succeed later: PostgreSQL's lost or refused connections (no server error,
    /// SQLSTATE class 08), a server shutting down or starting (57P01–57P03), or out of
    /// connections (53300).
    pub fn is_unavailable(&self) -> bool {
        match self {
            // Without a SQLSTATE: a closed session, or the socket's own failure (refused,
            // reset, timed out). A value that could not be bound or read has neither, and is
            // a fault of the query, not a reason to retry.
            Error::Postgres(e) => match e.code() {
                None => {
                    e.is_closed()
                        || std::error::Error::source(e).is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some())
                }
                Some(code) => {
                    let code = code.code();
                    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
                }
            },
            _ => false,
        }
    }

    /// PostgreSQL's SQLSTATE, if this is a PostgreSQL error reported by the server.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Postgres(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `Ok(None)` for a query that found no row, as rusqlite's `OptionalExtension` does.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(Error::NoRows) | Err(Error::Sqlite(rusqlite::Error::QueryReturnedNoRows)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A bound value, as both engines take it.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// Something that can be bound to a placeholder.
pub trait ToParam {
    fn value(&self) -> Value<'_>;
}

macro_rules! int_param {
    ($($t:ty),*) => {$(
        impl ToParam for $t {
            fn value(&self) -> Value<'_> {
                Value::Int(i64::from(*self))
            }
        }
    )*};
}
int_param!(i64, i32, u32, i16, u16, u8, bool);

impl ToParam for f64 {
    fn value(&self) -> Value<'_> {
        Value::Real(*self)
    }
}
impl ToParam for str {
    fn value(&self) -> Value<'_> {
        Value::Text(self)
    }
}
impl ToParam for String {
    fn value(&self) -> Value<'_> {
        Value::Text(self)
    }
}
impl ToParam for [u8] {
    fn value(&self) -> Value<'_> {
        Value::Blob(self)
    }
}
impl ToParam for Vec<u8> {
    fn value(&self) -> Value<'_> {
        Value::Blob(self)
    }
}
impl<T: ToParam> ToParam for Option<T> {
    fn value(&self) -> Value<'_> {
        match self {
            Some(v) => v.value(),
            None => Value::Null,
        }
    }
}
impl<T: ToParam + ?Sized> ToParam for &T {
    fn value(&self) -> Value<'_> {
        (**self).value()
    }
}
impl<T: ToParam + ?Sized> ToParam for Box<T> {
    fn value(&self) -> Value<'_> {
        (**self).value()
    }
}

/// A statement's parameters: `params![a, b]`, `[a]`, or `[]`.
pub trait Params {
    fn with<R>(self, f: impl FnOnce(&[&dyn ToParam]) -> R) -> R;
}

impl Params for &[&dyn ToParam] {
    fn with<R>(self, f: impl FnOnce(&[&dyn ToParam]) -> R) -> R {
        f(self)
    }
}

impl Params for &Vec<&dyn ToParam> {
    fn with<R>(self, f: impl FnOnce(&[&dyn ToParam]) -> R) -> R {
        f(self)
    }
}

impl Params for [&dyn ToParam; 0] {
    fn with<R>(self, f: impl FnOnce(&[&dyn ToParam]) -> R) -> R {
        f(&[])
    }
}

macro_rules! array_params {
    ($($n:literal),*) => {$(
        impl<T: ToParam> Params for [T; $n] {
            fn with<R>(self, f: impl FnOnce(&[&dyn ToParam]) -> R) -> R {
                let refs: [&dyn ToParam; $n] = self.each_ref().map(|p| p as &dyn ToParam);
                f(&refs)
            }
        }
        impl<T: ToParam> Params for &[T; $n] {
            fn with<R>(self, f: impl FnOnce(&[&dyn ToParam]) -> R) -> R {
                let refs: [&dyn ToParam; $n] = self.each_ref().map(|p| p as &dyn ToParam);
                f(&refs)
            }
        }
    )*};
}
array_params!(1, 2, 3, 4, 5, 6, 7, 8);

/// `params![a, b, …]`: a statement's parameters, of any [`ToParam`] types.
macro_rules! params {
    () => {
        (&[] as &[&dyn $crate::catalog::db::ToParam])
    };
    ($($p:expr),+ $(,)?) => {
        (&[$(&$p as &dyn $crate::catalog::db::ToParam),+] as &[&dyn $crate::catalog::db::ToParam])
    };
}
pub(crate) use params;

/// A parameter handed to SQLite: borrowed, as rusqlite's own bindings are.
struct LiteParam<'a>(&'a dyn ToParam);

impl rusqlite::ToSql for LiteParam<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self.0.value() {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(i),
            Value::Real(f) => ValueRef::Real(f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn lite_params<'a>(params: &'a [&'a dyn ToParam]) -> rusqlite::ParamsFromIter<impl Iterator<Item = LiteParam<'a>>> {
    rusqlite::params_from_iter(params.iter().map(|p| LiteParam(*p)))
}

/// A parameter handed to PostgreSQL, encoded as the type the server inferred for it.
#[derive(Debug)]
struct PgParam<'a>(Value<'a>);

impl postgres::types::ToSql for PgParam<'_> {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::{IsNull, Type};
        let mismatch = || -> Box<dyn std::error::Error + Sync + Send> {
            format!("cannot bind {:?} to a parameter of type {ty}", self.0).into()
        };
        match self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(i)?.to_sql(ty, out),
                Type::BOOL => (i != 0).to_sql(ty, out),
                Type::FLOAT8 => (i as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => i.to_string().as_str().to_sql(ty, out),
                _ => Err(mismatch()),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (f as f32).to_sql(ty, out),
                _ => Err(mismatch()),
            },
            Value::Text(s) => match *ty {
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => s.to_sql(ty, out),
                Type::BYTEA => s.as_bytes().to_sql(ty, out),
                _ => Err(mismatch()),
            },
            Value::Blob(b) => match *ty {
                Type::BYTEA => b.to_sql(ty, out),
                _ => Err(mismatch()),
            },
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// A column's value read from a row of either engine.
pub trait FromColumn: Sized {
    fn lite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self>;
    fn pg(row: &postgres::Row, i: usize) -> Result<Self>;
}

/// An integer column on PostgreSQL: any integer width, a boolean (what a comparison or
/// `EXISTS` yields there, an integer in SQLite), or a whole `NUMERIC` (what `sum` of a
/// `BIGINT` column yields there).
struct PgInt(i64);

/// A whole number from PostgreSQL's binary `NUMERIC`: digit count, weight, sign and display
/// scale (each 16 bits), then base-10,000 digits, the first one weighted 10,000^weight.
fn numeric_to_i64(raw: &[u8]) -> std::result::Result<i64, Box<dyn std::error::Error + Sync + Send>> {
    let word = |i: usize| -> std::result::Result<i16, Box<dyn std::error::Error + Sync + Send>> {
        raw.get(i * 2..i * 2 + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated NUMERIC".into())
    };
    let (ndigits, weight, sign) = (word(0)?, word(1)?, word(2)? as u16);
    if sign == 0xC000 {
        return Err("NUMERIC NaN is not an integer".into());
    }
    let mut value: i128 = 0;
    for i in 0..usize::try_from(ndigits).unwrap_or(0) {
        let digit = i128::from(word(4 + i)?);
        let power = i32::from(weight) - i as i32;
        if power < 0 {
            if digit != 0 {
                return Err("NUMERIC with a fraction is not an integer".into());
            }
            continue;
        }
        value = 10_000i128
            .checked_pow(power as u32)
            .and_then(|p| p.checked_mul(digit))
            .and_then(|d| value.checked_add(d))
            .ok_or("NUMERIC out of range")?;
    }
    if sign == 0x4000 {
        value = -value;
    }
    Ok(i64::try_from(value)?)
}

impl<'a> postgres::types::FromSql<'a> for PgInt {
    fn from_sql(
        ty: &postgres::types::Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        Ok(PgInt(match *ty {
            Type::INT8 => i64::from_sql(ty, raw)?,
            Type::INT4 => i64::from(i32::from_sql(ty, raw)?),
            Type::INT2 => i64::from(i16::from_sql(ty, raw)?),
            Type::BOOL => i64::from(bool::from_sql(ty, raw)?),
            Type::NUMERIC => numeric_to_i64(raw)?,
            _ => return Err(format!("an integer column cannot be read from type {ty}").into()),
        }))
    }

    fn accepts(ty: &postgres::types::Type) -> bool {
        use postgres::types::Type;
        matches!(*ty, Type::INT8 | Type::INT4 | Type::INT2 | Type::BOOL | Type::NUMERIC)
    }
}

fn pg_get<'a, T: postgres::types::FromSql<'a>>(row: &'a postgres::Row, i: usize) -> Result<T> {
    row.try_get(i).map_err(Error::from)
}

impl FromColumn for i64 {
    fn lite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self> {
        Ok(pg_get::<PgInt>(row, i)?.0)
    }
}

impl FromColumn for bool {
    fn lite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self> {
        Ok(pg_get::<PgInt>(row, i)?.0 != 0)
    }
}

impl FromColumn for f64 {
    fn lite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self> {
        pg_get(row, i)
    }
}

impl FromColumn for String {
    fn lite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self> {
        pg_get(row, i)
    }
}

impl FromColumn for Vec<u8> {
    fn lite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self> {
        pg_get(row, i)
    }
}

impl<T: FromColumn> FromColumn for Option<T> {
    fn lite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self> {
        match row.get_ref(i)? {
            rusqlite::types::ValueRef::Null => Ok(None),
            _ => T::lite(row, i).map(Some),
        }
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self> {
        // Any type: only whether the value is NULL is looked at here.
        struct IsNull;
        impl<'a> postgres::types::FromSql<'a> for IsNull {
            fn from_sql(
                _: &postgres::types::Type,
                _: &'a [u8],
            ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
                Ok(IsNull)
            }
            fn accepts(_: &postgres::types::Type) -> bool {
                true
            }
        }
        match pg_get::<Option<IsNull>>(row, i)? {
            None => Ok(None),
            Some(IsNull) => T::pg(row, i).map(Some),
        }
    }
}

/// A column's position (only `usize`, so that a literal index needs no suffix).
pub trait ColumnIndex {
    fn index(self) -> usize;
}

impl ColumnIndex for usize {
    fn index(self) -> usize {
        self
    }
}

/// One row of a result.
pub enum Row<'r> {
    Sqlite(&'r rusqlite::Row<'r>),
    Postgres(&'r postgres::Row),
}

impl Row<'_> {
    /// Column `i`, as a `T`. (The index's type parameter mirrors rusqlite's `get::<_, T>`.)
    pub fn get<I: ColumnIndex, T: FromColumn>(&self, i: I) -> Result<T> {
        let i = i.index();
        match self {
            Row::Sqlite(r) => T::lite(r, i),
            Row::Postgres(r) => T::pg(r, i),
        }
    }

    /// Column `i` as text, borrowed from the row.
    pub fn get_str(&self, i: usize) -> Result<&str> {
        match self {
            Row::Sqlite(r) => Ok(r.get_ref(i)?.as_str().map_err(rusqlite::Error::from)?),
            Row::Postgres(r) => pg_get(r, i),
        }
    }

    /// Column `i` as bytes (a blob, or a text's UTF-8), borrowed from the row.
    pub fn get_bytes(&self, i: usize) -> Result<&[u8]> {
        match self {
            Row::Sqlite(r) => Ok(r.get_ref(i)?.as_bytes().map_err(rusqlite::Error::from)?),
            Row::Postgres(r) => {
                if *r.columns()[i].type_() == postgres::types::Type::BYTEA {
                    pg_get(r, i)
                } else {
                    pg_get::<&str>(r, i).map(str::as_bytes)
                }
            }
        }
    }
}

/// The rows of a query, walked with [`Rows::next`].
pub struct Rows<'s> {
    inner: RowsInner<'s>,
}

enum RowsInner<'s> {
    Sqlite(rusqlite::Rows<'s>),
    Postgres {
        rows: std::vec::IntoIter<postgres::Row>,
        current: Option<postgres::Row>,
    },
}

impl<'s> Rows<'s> {
    /// The next row, or `None` after the last.
    pub fn next(&mut self) -> Result<Option<Row<'_>>> {
        match &mut self.inner {
            RowsInner::Sqlite(rows) => Ok(rows.next()?.map(Row::Sqlite)),
            RowsInner::Postgres { rows, current } => {
                *current = rows.next();
                Ok(current.as_ref().map(Row::Postgres))
            }
        }
    }

    /// Maps each row through `f`.
    pub fn mapped<T, F: FnMut(&Row<'_>) -> Result<T>>(self, f: F) -> MappedRows<'s, F> {
        MappedRows { rows: self, f }
    }
}

/// The iterator [`Statement::query_map`] returns.
pub struct MappedRows<'s, F> {
    rows: Rows<'s>,
    f: F,
}

impl<T, F: FnMut(&Row<'_>) -> Result<T>> Iterator for MappedRows<'_, F> {
    type Item = Result<T>;
    fn next(&mut self) -> Option<Result<T>> {
        let f = &mut self.f;
        match self.rows.next() {
            Ok(Some(row)) => Some(f(&row)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// A prepared statement.
pub struct Statement<'c> {
    inner: StatementInner<'c>,
}

enum StatementInner<'c> {
    SqliteCached(rusqlite::CachedStatement<'c>),
    Sqlite(rusqlite::Statement<'c>),
    Postgres { pg: &'c Pg, stmt: postgres::Statement },
}

impl Statement<'_> {
    /// Runs the statement; returns the number of rows it changed.
    pub fn execute<P: Params>(&mut self, params: P) -> Result<usize> {
        match &mut self.inner {
            StatementInner::SqliteCached(s) => Ok(params.with(|p| s.execute(lite_params(p)))?),
            StatementInner::Sqlite(s) => Ok(params.with(|p| s.execute(lite_params(p)))?),
            StatementInner::Postgres { pg, stmt } => {
                let n = params.with(|p| pg.with_params(p, |p| pg.client.borrow_mut().execute(&*stmt, p)))?;
                Ok(usize::try_from(n).unwrap_or(usize::MAX))
            }
        }
    }

    /// Runs the query; returns its rows.
    pub fn query<P: Params>(&mut self, params: P) -> Result<Rows<'_>> {
        let inner = match &mut self.inner {
            StatementInner::SqliteCached(s) => RowsInner::Sqlite(params.with(|p| s.query(lite_params(p)))?),
            StatementInner::Sqlite(s) => RowsInner::Sqlite(params.with(|p| s.query(lite_params(p)))?),
            StatementInner::Postgres { pg, stmt } => {
                let rows = params.with(|p| pg.with_params(p, |p| pg.client.borrow_mut().query(&*stmt, p)))?;
                RowsInner::Postgres {
                    rows: rows.into_iter(),
                    current: None,
                }
            }
        };
        Ok(Rows { inner })
    }

    /// Runs the query and maps each row through `f`.
    pub fn query_map<T, P: Params, F: FnMut(&Row<'_>) -> Result<T>>(
        &mut self,
        params: P,
        f: F,
    ) -> Result<MappedRows<'_, F>> {
        Ok(self.query(params)?.mapped(f))
    }

    /// The first row through `f`; [`Error::NoRows`] when there is none.
    pub fn query_row<T, P: Params, F: FnOnce(&Row<'_>) -> Result<T>>(&mut self, params: P, f: F) -> Result<T> {
        let mut rows = self.query(params)?;
        match rows.next()? {
            Some(row) => f(&row),
            None => Err(Error::NoRows),
        }
    }

    /// Whether the query returns a row.
    pub fn exists<P: Params>(&mut self, params: P) -> Result<bool> {
        Ok(self.query(params)?.next()?.is_some())
    }
}

/// Statements a PostgreSQL connection keeps prepared, at most; past it the cache starts over
/// (the catalog's statements are a few hundred fixed texts; this bounds the rare built ones).
const PG_STATEMENT_CACHE: usize = 1024;

/// A PostgreSQL connection with its prepared statements.
pub struct Pg {
    client: RefCell<postgres::Client>,
    statements: RefCell<HashMap<String, postgres::Statement>>,
}

impl Pg {
    fn prepare(&self, sql: &str) -> Result<postgres::Statement> {
        if let Some(s) = self.statements.borrow().get(sql) {
            return Ok(s.clone());
        }
        let stmt = self.client.borrow_mut().prepare(&pg_sql(sql))?;
        let mut cache = self.statements.borrow_mut();
        if cache.len() >= PG_STATEMENT_CACHE {
            cache.clear();
        }
        cache.insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }

    fn with_params<R>(
        &self,
        params: &[&dyn ToParam],
        f: impl FnOnce(&[&(dyn postgres::types::ToSql + Sync)]) -> R,
    ) -> R {
        let values: Vec<PgParam<'_>> = params.iter().map(|p| PgParam(p.value())).collect();
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = values
            .iter()
            .map(|v| v as &(dyn postgres::types::ToSql + Sync))
            .collect();
        f(&refs)
    }
}

/// A connection to the catalog's database, used by one thread.
pub struct Connection {
    inner: ConnInner,
}

enum ConnInner {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
}

impl From<rusqlite::Connection> for Connection {
    fn from(c: rusqlite::Connection) -> Self {
        Connection {
            inner: ConnInner::Sqlite(c),
        }
    }
}

impl From<postgres::Client> for Connection {
    fn from(c: postgres::Client) -> Self {
        Connection {
            inner: ConnInner::Postgres(Box::new(Pg {
                client: RefCell::new(c),
                statements: RefCell::new(HashMap::new()),
            })),
        }
    }
}

impl Connection {
    /// Which database this is.
    pub fn engine(&self) -> Engine {
        match self.inner {
            ConnInner::Sqlite(_) => Engine::Sqlite,
            ConnInner::Postgres(_) => Engine::Postgres,
        }
    }

    /// Whether the connection is gone for good (PostgreSQL's closed session); its thread then
    /// opens another.
    pub fn is_broken(&self) -> bool {
        match &self.inner {
            ConnInner::Sqlite(_) => false,
            ConnInner::Postgres(pg) => pg.client.try_borrow().is_ok_and(|c| c.is_closed()),
        }
    }

    /// The SQLite connection, for what only SQLite has (pragmas, statement counters).
    pub fn sqlite(&self) -> Option<&rusqlite::Connection> {
        match &self.inner {
            ConnInner::Sqlite(c) => Some(c),
            ConnInner::Postgres(_) => None,
        }
    }

    /// The SQLite connection, mutably (for its own transactions).
    pub fn sqlite_mut(&mut self) -> Option<&mut rusqlite::Connection> {
        match &mut self.inner {
            ConnInner::Sqlite(c) => Some(c),
            ConnInner::Postgres(_) => None,
        }
    }

    /// The PostgreSQL client, for what only PostgreSQL has.
    pub fn postgres(&self) -> Option<std::cell::RefMut<'_, postgres::Client>> {
        match &self.inner {
            ConnInner::Sqlite(_) => None,
            ConnInner::Postgres(pg) => Some(pg.client.borrow_mut()),
        }
    }

    /// Prepares `sql`, or takes it from the connection's cache.
    pub fn prepare_cached(&self, sql: &str) -> Result<Statement<'_>> {
        let inner = match &self.inner {
            ConnInner::Sqlite(c) => StatementInner::SqliteCached(c.prepare_cached(sql)?),
            ConnInner::Postgres(pg) => StatementInner::Postgres {
                pg,
                stmt: pg.prepare(sql)?,
            },
        };
        Ok(Statement { inner })
    }

    /// Prepares `sql` for this use only (SQLite; PostgreSQL caches every statement).
    pub fn prepare(&self, sql: &str) -> Result<Statement<'_>> {
        let inner = match &self.inner {
            ConnInner::Sqlite(c) => StatementInner::Sqlite(c.prepare(sql)?),
            ConnInner::Postgres(pg) => StatementInner::Postgres {
                pg,
                stmt: pg.prepare(sql)?,
            },
        };
        Ok(Statement { inner })
    }

    /// Runs one statement; returns the number of rows it changed.
    pub fn execute<P: Params>(&self, sql: &str, params: P) -> Result<usize> {
        match &self.inner {
            ConnInner::Sqlite(c) => Ok(params.with(|p| c.execute(sql, lite_params(p)))?),
            ConnInner::Postgres(_) => self.prepare_cached(sql)?.execute(params),
        }
    }

    /// The first row of `sql` through `f`; [`Error::NoRows`] when there is none.
    pub fn query_row<T, P: Params, F: FnOnce(&Row<'_>) -> Result<T>>(&self, sql: &str, params: P, f: F) -> Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }

    /// Begins a transaction that rolls back unless committed: on a reader, one snapshot for
    /// several statements (on PostgreSQL `REPEATABLE READ`, which is a snapshot there too).
    /// Not for a write job, which already runs inside the writer's transaction.
    pub fn unchecked_transaction(&self) -> Result<Transaction<'_>> {
        self.execute_batch(match self.engine() {
            Engine::Sqlite => "BEGIN DEFERRED",
            Engine::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ",
        })?;
        Ok(Transaction {
            conn: self,
            done: false,
        })
    }

    /// Runs several statements without parameters (`;`-separated).
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match &self.inner {
            ConnInner::Sqlite(c) => Ok(c.execute_batch(sql)?),
            ConnInner::Postgres(pg) => Ok(pg.client.borrow_mut().batch_execute(sql)?),
        }
    }
}

/// A transaction begun by [`Connection::unchecked_transaction`]; rolled back when dropped
/// uncommitted.
pub struct Transaction<'c> {
    conn: &'c Connection,
    done: bool,
}

impl Transaction<'_> {
    pub fn commit(mut self) -> Result<()> {
        // A failed COMMIT leaves `done` unset, so that the drop rolls back.
        self.conn.execute_batch("COMMIT")?;
        self.done = true;
        Ok(())
    }
}

impl std::ops::Deref for Transaction<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = self.conn.execute_batch("ROLLBACK")
        {
            tracing::warn!(error = %e, "catalog: rolling back a read transaction failed");
        }
    }
}

/// `sql` in PostgreSQL's dialect, for the few SQLite spellings the catalog's queries use:
/// - placeholders: `?N` becomes `$N`, and a bare `?` takes the number after the largest used
///   so far (SQLite's rule);
/// - `INDEXED BY <index>`, a SQLite planner hint, is dropped (PostgreSQL plans by statistics),
///   and so is the `CROSS` of `CROSS JOIN … ON`, SQLite's way to fix the join order (an inner
///   join; the catalog writes no true cross join);
/// - the scalar `max(a, b, …)` and `min(a, b, …)` (two arguments or more; one is the
///   aggregate) become `greatest` and `least`; `instr(s, t)` becomes `strpos(s, t)`.
///
/// Quoted strings, quoted identifiers and comments are left alone.
pub fn pg_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.char_indices().peekable();
    let mut largest = 0u32;
    while let Some((at, c)) = chars.next() {
        if c.is_ascii_alphabetic() || c == '_' {
            let mut end = at + c.len_utf8();
            while let Some(&(i, d)) = chars.peek() {
                if d.is_ascii_alphanumeric() || d == '_' {
                    end = i + d.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let word = &sql[at..end];
            let rest = &sql[end..];
            if word.eq_ignore_ascii_case("CROSS")
                && rest
                    .trim_start()
                    .get(..4)
                    .is_some_and(|w| w.eq_ignore_ascii_case("JOIN"))
            {
                // The whitespace after it stays.
                continue;
            }
            if word.eq_ignore_ascii_case("INDEXED") {
                let after = rest.trim_start();
                if let Some(tail) = after.strip_prefix("BY").or_else(|| after.strip_prefix("by")) {
                    let tail = tail.trim_start();
                    let name_len = tail
                        .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                        .unwrap_or(tail.len());
                    let skip = rest.len() - tail.len() + name_len;
                    for _ in 0..rest[..skip].chars().count() {
                        chars.next();
                    }
                    continue;
                }
            }
            let renamed = if rest.starts_with('(') {
                match word.to_ascii_lowercase().as_str() {
                    "max" if top_level_commas(rest) > 0 => "greatest",
                    "min" if top_level_commas(rest) > 0 => "least",
                    "instr" => "strpos",
                    _ => word,
                }
            } else {
                word
            };
            out.push_str(renamed);
            continue;
        }
        match c {
            '\'' | '"' => {
                out.push(c);
                for (_, d) in chars.by_ref() {
                    out.push(d);
                    if d == c {
                        break;
                    }
                }
            }
            '-' if chars.peek().map(|&(_, d)| d) == Some('-') => {
                out.push(c);
                for (_, d) in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            '?' => {
                let mut digits = String::new();
                while let Some(&(_, d)) = chars.peek() {
                    if d.is_ascii_digit() {
                        digits.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                let n = match digits.parse::<u32>() {
                    Ok(n) => n,
                    Err(_) => largest + 1,
                };
                largest = largest.max(n);
                out.push('$');
                out.push_str(&n.to_string());
            }
            _ => out.push(c),
        }
    }
    out
}

/// Commas at the top level of the parenthesised list `s` starts with.
fn top_level_commas(s: &str) -> usize {
    let (mut depth, mut commas, mut quote) = (0usize, 0usize, None::<char>);
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    break;
                }
            }
            (None, ',') if depth == 1 => commas += 1,
            _ => {}
        }
    }
    commas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numerics_are_integers() {
        // 123,456,789 = 1·10,000² + 2345·10,000 + 6789; weight 2.
        let n = |ndigits: i16, weight: i16, sign: u16, digits: &[i16]| {
            let mut raw = Vec::new();
            for w in [ndigits, weight, sign as i16, 0] {
                raw.extend_from_slice(&w.to_be_bytes());
            }
            for d in digits {
                raw.extend_from_slice(&d.to_be_bytes());
            }
            numeric_to_i64(&raw)
        };
        assert_eq!(n(3, 2, 0, &[1, 2345, 6789]).unwrap(), 123_456_789);
        assert_eq!(n(1, 1, 0x4000, &[5]).unwrap(), -50_000);
        assert_eq!(n(0, 0, 0, &[]).unwrap(), 0);
        assert!(n(2, 0, 0, &[1, 5]).is_err(), "1.0005 is not whole");
        assert!(n(1, 5, 0, &[1]).is_err(), "10^20 does not fit");
    }

    #[test]
    fn sqlite_spellings_become_postgresql_ones() {
        assert_eq!(
            pg_sql("SELECT max(a, coalesce(b, 0)), max(c), min(x,y) FROM t INDEXED BY t_by_a WHERE instr(n, ?1) > 0"),
            "SELECT greatest(a, coalesce(b, 0)), max(c), least(x,y) FROM t  WHERE strpos(n, $1) > 0"
        );
        assert_eq!(
            pg_sql("SELECT max_size, indexed FROM t"),
            "SELECT max_size, indexed FROM t"
        );
        assert_eq!(
            pg_sql("FROM a c CROSS JOIN b n ON n.x = c.x, crossings"),
            "FROM a c  JOIN b n ON n.x = c.x, crossings"
        );
    }

    #[test]
    fn placeholders_are_numbered_as_sqlite_numbers_them() {
        assert_eq!(pg_sql("SELECT ?1, ?2, ?1"), "SELECT $1, $2, $1");
        assert_eq!(pg_sql("SELECT ?, ?, ?"), "SELECT $1, $2, $3");
        assert_eq!(pg_sql("SELECT ?3, ?"), "SELECT $3, $4");
        assert_eq!(
            pg_sql("SELECT '?1', \"a?\" -- ?\n, ?2"),
            "SELECT '?1', \"a?\" -- ?\n, $2"
        );
    }

    #[test]
    fn sqlite_reads_and_binds_through_the_interface() {
        let c = Connection::from(rusqlite::Connection::open_in_memory().unwrap());
        c.execute_batch("CREATE TABLE t (a INTEGER, b TEXT, c BLOB)").unwrap();
        assert_eq!(
            c.execute("INSERT INTO t VALUES (?1, ?2, ?3)", params![7i64, "x", vec![1u8, 2]])
                .unwrap(),
            1
        );
        c.execute("INSERT INTO t VALUES (?1, ?2, NULL)", [Some(1i64), None])
            .unwrap();
        let rows: Vec<(i64, String, Option<Vec<u8>>)> = c
            .prepare_cached("SELECT a, b, c FROM t ORDER BY a DESC")
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get::<_, Option<String>>(1)?.unwrap_or_default(), r.get(2)?))
            })
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(rows, vec![(7, "x".into(), Some(vec![1, 2])), (1, String::new(), None)]);
        assert!(
            c.query_row("SELECT a FROM t WHERE a = 99", [], |r| r.get::<_, i64>(0))
                .optional()
                .unwrap()
                .is_none()
        );
    }
}
