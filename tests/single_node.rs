//! The single-node lock: a server with its blobs on the fs backend and its catalog on
//! PostgreSQL must be that catalog's only server (its blobs and upload sessions are on its own
//! disk), so it holds a session-level advisory lock (`catalog::postgres::hold_single_node`).
//!
//! - a second server on the same database is refused at start, with the reason;
//! - the lock lives as long as its session: when the session is lost (here: terminated, as a
//!   PostgreSQL restart or failover would), the server takes the lock again, and a second
//!   server is still refused;
//! - if another session took the lock in between, the server exits (status 75) rather than go
//!   on serving beside a process it cannot exclude; restarted once the other is gone, it serves
//!   what it had acknowledged;
//! - a session of the server's own that stopped answering but still holds the lock (here: its
//!   backend stopped with SIGSTOP, as a half-open connection looks) is recognised as its own,
//!   terminated, and the lock taken again: the server does not exit.
//!
//! They run on the fs backend and the PostgreSQL catalog whatever `STOWAGE_TEST_BACKEND` and
//! `STOWAGE_TEST_CATALOG` say, and fail, never skip, without PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::sql::{CatalogSql, Value};
use common::{Backend, Catalog, STDERR_FILE_ENV, TestServer, get_blob};
use stowage::catalog::postgres::SINGLE_NODE_LOCK;

/// The exit status of a server that lost the lock to another process (`EX_TEMPFAIL`).
const LOST_EXIT: i32 = 75;

fn start() -> TestServer {
    TestServer::start_on_backend_and_catalog(Backend::Fs, Catalog::Postgres, &[])
}

/// The sessions holding the single-node lock on `sql`'s database: (pid, application name).
fn holders(sql: &CatalogSql) -> Vec<(i64, String)> {
    // A bigint advisory key shows as its high and low 32 bits.
    let (high, low) = (SINGLE_NODE_LOCK >> 32 & 0xffff_ffff, SINGLE_NODE_LOCK & 0xffff_ffff);
    sql.query_rows(
        "SELECT l.pid::bigint, coalesce(a.application_name, '')
           FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND l.classid::bigint = ?1 AND l.objid::bigint = ?2",
        &[high.into(), low.into()],
    )
    .into_iter()
    .map(|row| (row[0].int(), row[1].text().to_owned()))
    .collect()
}

/// The one session holding the lock, which must be a Stowage server's.
fn holder(sql: &CatalogSql) -> i64 {
    match holders(sql).as_slice() {
        [(pid, app)] => {
            assert_eq!(app, "stowage", "the lock's holder is a stowage session");
            *pid
        }
        other => panic!("one holder of the single-node lock, found {other:?}"),
    }
}

/// Runs a second `stowage serve` on `first`'s database with a data directory and port of its
/// own; it must exit, refused. Its standard error.
fn second_server_refused(first: &TestServer) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = common::tools::output_within_for(
        first
            .stowage_command(&["serve"])
            .env("STOWAGE_DATA_DIR", dir.path().join("data"))
            .env("STOWAGE_LISTEN", "127.0.0.1:0"),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a second server must not start: {stderr}");
    assert!(
        stderr.contains("another stowage process uses this PostgreSQL catalog with the fs blob backend"),
        "the refusal says why: {stderr}"
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_is_refused_while_the_first_runs() {
    let server = start();
    let digest = common::push_blob(&server, "single/node", b"held").await;
    let sql = server.catalog_sql();
    tokio::task::block_in_place(|| {
        holder(&sql);
        second_server_refused(&server);
    });
    assert_eq!(get_blob(&server, "single/node", &digest).await, (200, b"held".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_is_taken_again_after_its_session_is_lost() {
    let server = start();
    let digest = common::push_blob(&server, "single/node", b"before").await;
    let sql = server.catalog_sql();
    let first = tokio::task::block_in_place(|| holder(&sql));
    let ended = tokio::task::block_in_place(|| {
        sql.query_rows("SELECT pg_terminate_backend(?1::int, 10000)::int", &[first.into()])
    });
    assert_eq!(ended, [[Value::Int(1)]], "the lock's session ended");

    let mut again = None;
    common::wait_until("the server holds the lock again", || {
        again = tokio::task::block_in_place(|| match holders(&sql).as_slice() {
            [(pid, _)] if *pid != first => Some(holder(&sql)),
            _ => None,
        });
        std::future::ready(again.is_some())
    })
    .await;
    tokio::task::block_in_place(|| {
        second_server_refused(&server);
    });
    // Still the same holder: the refused server took nothing.
    assert_eq!(tokio::task::block_in_place(|| holder(&sql)), again.expect("a holder"));

    assert_eq!(
        get_blob(&server, "single/node", &digest).await,
        (200, b"before".to_vec())
    );
    let after = common::push_blob(&server, "single/node", b"after").await;
    assert_eq!(get_blob(&server, "single/node", &after).await, (200, b"after".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_finds_the_lock_taken_exits() {
    let mut server = start();
    let digest = common::push_blob(&server, "single/node", b"acknowledged").await;
    let sql = server.catalog_sql();
    let first = tokio::task::block_in_place(|| holder(&sql));

    // Another session takes the lock the moment the server's session is gone: terminate waits
    // for the backend to exit, and the lock is free from then until the server, which checks
    // every two seconds, connects again.
    let taken = tokio::task::block_in_place(|| {
        sql.query_rows(
            "SELECT pg_terminate_backend(?1::int, 10000)::int, pg_try_advisory_lock(?2)::int",
            &[first.into(), SINGLE_NODE_LOCK.into()],
        )
    });
    assert_eq!(
        taken,
        [[Value::Int(1), Value::Int(1)]],
        "the test's session took the lock"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = server.try_exit_status() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server must exit once it finds the lock taken"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(LOST_EXIT), "exit status {status:?}");

    // With the other holder gone, the server starts again and serves what it acknowledged.
    drop(sql);
    server.crash_and_restart();
    assert_eq!(
        get_blob(&server, "single/node", &digest).await,
        (200, b"acknowledged".to_vec())
    );
    let sql = server.catalog_sql();
    tokio::task::block_in_place(|| holder(&sql));
}

/// Sends SIGCONT to a stopped process when dropped, so that a failing test leaves the shared
/// PostgreSQL server's backend running.
struct Stopped(i32);

impl Stopped {
    fn stop(pid: i64) -> Stopped {
        let pid = i32::try_from(pid).expect("a pid");
        // SAFETY: kill(2) with a valid signal has no memory effects.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP {pid}");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_of_its_own_that_stopped_answering_is_ended_not_taken_for_another_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("stowage.log");
    let mut server = TestServer::start_on_backend_and_catalog(
        Backend::Fs,
        Catalog::Postgres,
        &[(STDERR_FILE_ENV, log.to_str().expect("utf-8"))],
    );
    let digest = common::push_blob(&server, "single/node", b"kept").await;
    let sql = server.catalog_sql();
    let first = tokio::task::block_in_place(|| holder(&sql));

    // The lock's backend stops answering but keeps the lock: the server's check times out, a
    // new connection finds the lock held, and the holder is the server's own earlier session.
    let stopped = Stopped::stop(first);
    common::wait_until("the server ends its own unanswering session", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        std::future::ready(text.contains("ending this process's earlier session"))
    })
    .await;
    assert!(server.try_exit_status().is_none(), "the server must not exit");
    // The termination it asked for takes effect once the backend runs again.
    drop(stopped);
    common::wait_until("the server holds the lock again", || {
        let again = tokio::task::block_in_place(|| matches!(holders(&sql).as_slice(), [(pid, _)] if *pid != first));
        std::future::ready(again)
    })
    .await;
    tokio::task::block_in_place(|| holder(&sql));
    assert!(server.try_exit_status().is_none(), "the server still runs");
    assert_eq!(get_blob(&server, "single/node", &digest).await, (200, b"kept".to_vec()));
}
