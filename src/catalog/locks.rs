//! Database locks shared by every replica of a PostgreSQL catalog: the per-digest lock between
//! publishing a blob and garbage collection deleting it, the Spack index build's single
//! flight, and garbage-collection leadership (`docs/postgres.md`, step 3). With SQLite there is
//! one process, whose in-process locks (`registry::locks`) are enough, and no [`LockService`].
//!
//! A [`LockService`] owns one dedicated PostgreSQL connection on a thread of its own and takes
//! session-level advisory locks on it for the whole replica: [`LockService::acquire`] (waits
//! until held), [`LockService::try_acquire`] (takes it only if free), and the [`LockGuard`]
//! they return, which releases the lock when dropped. Requests reach the thread through a
//! channel and are answered through oneshot channels, so async callers await without blocking
//! a worker.
//!
//! # Invariants
//!
//! 1. **The client lives on the lock thread only.** The synchronous `postgres::Client` is
//!    created, used and dropped on that thread (dropping one on an async worker panics); the
//!    service's handles and guards hold channel senders only, so they may be dropped anywhere.
//!    The connection is opened on the first request, so a process that never locks (an admin
//!    command) never opens it.
//! 2. **The connection never waits on a lock.** The thread runs only `pg_try_advisory_lock` and
//!    `pg_advisory_unlock`, each round one statement for every key due. An acquisition not
//!    granted is tried again after [`POLL`] (every pending key once per round), so a contended
//!    key never delays another key's acquisition or a release. A new request is tried at once:
//!    an uncontended acquisition costs one round trip.
//! 3. **A key is held by at most one guard in the whole deployment.** PostgreSQL excludes other
//!    sessions; within this session (where advisory locks are re-entrant) the thread keeps
//!    the keys its guards hold and grants none of them again before its guard releases it.
//! 4. **Every grant is released exactly once.** A grant whose caller gave up meanwhile (its
//!    future dropped) travels as a guard inside the reply, and dropping the unread reply drops
//!    the guard, which releases the key. A guard's release names the session that granted it,
//!    and a release of an older session is ignored (it must not unlock a key the new session
//!    took for someone else).
//! 5. **Bounded.** At most [`MAX_WAITING`] acquisitions wait at once; past that a request is
//!    refused with an error rather than queued.
//!
//! A request the service cannot serve (the connection down, too many waiting) fails with
//! `Internal::CatalogUnavailable`, which a client sees as 503 `UNAVAILABLE` and may retry.
//! Waiting costs the database one `pg_try_advisory_lock` statement per replica per [`POLL`]
//! while any of its keys is contended (all of them in one statement), nothing otherwise.
//!
//! # A broken connection loses the locks
//!
//! When the lock connection breaks (the server restarted, the network failed, the server
//! ended an idle session), PostgreSQL ends the session and releases every lock it held. The
//! thread notices at its next statement (a holder's guard makes it check the connection every
//! [`PING_EVERY`] while any lock is held), logs an error naming how many locks were lost,
//! answers the waiting requests with an error once reconnecting fails, and reconnects with a
//! growing backoff; requests arriving while it cannot connect are refused at once.
//!
//! What that means: from the break until the holder is done, the holder believes it holds a
//! lock that another replica may already have taken. [`LockGuard::is_lost`] tells a holder
//! that its session is gone (as far as this replica has noticed), and holders check it before
//! an irreversible step: garbage collection does not delete an object once its digest's lock
//! is lost (the object is left for the orphan sweep, which takes the lock afresh), and a Spack
//! index build does not record its layout (it fails, and the next reader builds again). Such a
//! check narrows the window to the time the thread takes to notice (at most about
//! [`PING_EVERY`]) plus the step itself; it does not close it. The Spack index build is the
//! one holder for which an overlap is not harmless (two incremental builds recording out of
//! order leave a layout older than the marks consumed, `docs/postgres.md`): the catalog
//! refusing a layout older than the one recorded would close that window for good.
//! Garbage-collection leadership lost mid-pass lets a second replica start a pass:
//! every step of a pass is safe beside another (each re-checks its candidates in its write
//! transaction, and deletes objects under the digests' locks), so leadership saves duplicate
//! work and is not what keeps data safe. The other way round, a connection that died without
//! the server noticing (a cut network) keeps its locks on the server until the server's TCP
//! keepalive ends the session: the keys stay taken that long, which is safe, only slow.
//!
//! # Keys
//!
//! One 64-bit advisory key space per database, shared with the fixed keys of `postgres`
//! ([`super::postgres::lock_key`], prefix "STOW"). A named lock's key ([`hashed_key`]) is the
//! first 8 bytes of the SHA-256 of `<namespace>:<name>` (`blob:<digest>`, `spack:<repo>`),
//! moved out of the fixed keys' prefix when it falls there. Two names sharing a key (about one
//! chance in 2^64 for a given pair) only wait for each other: every holder of several keys
//! takes them in ascending key order, each key once (`registry::locks::SharedLocks`), so a
//! collision cannot make a cycle.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use sha2::Digest as _;
use tokio::sync::oneshot;

use super::postgres::{self, Settings};
use crate::error::{Error, Internal, Result};

/// How long an acquisition that was not granted waits before the thread tries it again.
pub const POLL: Duration = Duration::from_millis(10);
/// How often the thread checks its connection while any lock is held.
pub const PING_EVERY: Duration = Duration::from_secs(1);
/// Longest a connection check may take.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Most acquisitions waiting at once (see the module doc).
pub const MAX_WAITING: usize = 10_000;
/// Longest wait between two connection attempts after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Garbage-collection leadership: held by the replica running a collection pass.
pub const GC_LEADER_KEY: i64 = postgres::GC_LEADER_LOCK;

/// The high 32 bits of every fixed key of `postgres` ("STOW").
const FIXED_PREFIX: i64 = postgres::lock_key(0) >> 32;

/// The key of lock `name` in `namespace` (see the module doc's "Keys").
pub fn hashed_key(namespace: &str, name: &str) -> i64 {
    let mut hasher = sha2::Sha256::new();
    hasher.update(namespace.as_bytes());
    hasher.update(b":");
    hasher.update(name.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    outside_fixed_keys(i64::from_be_bytes(first))
}

/// `raw`, or (when it carries the fixed keys' prefix) `raw` with the prefix's lowest bit
/// flipped, so that no named lock ever shares a key with a fixed one.
const fn outside_fixed_keys(raw: i64) -> i64 {
    if raw >> 32 == FIXED_PREFIX {
        raw ^ (1 << 32)
    } else {
        raw
    }
}

/// The lock of blob `digest` (`sha256:…`), taken by the publish of an already stored blob and
/// by garbage collection's deletion of it.
pub fn blob_key(digest: &str) -> i64 {
    hashed_key("blob", digest)
}

/// The lock of upload session `id` (its simple form), held by a request that changes the
/// session, so that one replica at a time moves it forward.
pub fn upload_key(id: &str) -> i64 {
    hashed_key("upload", id)
}

/// The lock of repository `repo`'s Spack index build.
pub fn spack_key(repo: &str) -> i64 {
    hashed_key("spack", repo)
}

const STOPPED: &str = "the database lock service stopped";
const DOWN: &str = "the database lock connection is down";
const TOO_MANY: &str = "too many database lock requests waiting";

/// Handle to the replica's database locks; cheap to clone. See the module doc.
#[derive(Clone)]
pub struct LockService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LockService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockService")
            .field("session", &self.shared.state.session.load(Ordering::Relaxed))
            .field("outstanding", &self.shared.state.outstanding.load(Ordering::Relaxed))
            .finish()
    }
}

struct Shared {
    requests: mpsc::Sender<Request>,
    state: Arc<State>,
}

/// What the lock thread and its callers share.
#[derive(Default)]
struct State {
    /// The number of the lock connection's current session: it moves on each time the
    /// connection breaks, and a guard granted in an older one is lost.
    session: AtomicU64,
    /// Acquisitions sent and not yet answered or given up ([`MAX_WAITING`]).
    outstanding: AtomicUsize,
}

enum Request {
    Acquire(Waiter),
    Release { key: i64, session: u64 },
}

/// A request to acquire a key, waiting on the lock thread.
struct Waiter {
    key: i64,
    /// `false`: answered at its first try, held or not.
    wait: bool,
    reply: oneshot::Sender<Result<Option<LockGuard>>>,
    /// For the guard granted: how it sends its release.
    service: Arc<Shared>,
    next_try: Instant,
    _counted: Outstanding,
}

impl Waiter {
    /// Answers the request, uncounted first so that the caller never sees it still counted.
    fn answer(self, answer: Result<Option<LockGuard>>) {
        let Waiter { reply, _counted, .. } = self;
        drop(_counted);
        // Should the caller have gone, an unread guard is dropped here and releases its key.
        let _ = reply.send(answer);
    }
}

/// One outstanding acquisition, uncounted when dropped (answered, given up, or never sent).
struct Outstanding(Arc<State>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A database lock held by this replica, released when dropped (the release is sent to the
/// lock thread; dropping never blocks).
pub struct LockGuard {
    key: i64,
    session: u64,
    service: Arc<Shared>,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .field("session", &self.session)
            .finish()
    }
}

impl LockGuard {
    /// The advisory key held.
    pub fn key(&self) -> i64 {
        self.key
    }

    /// Whether the lock connection broke since this lock was granted, so that PostgreSQL no
    /// longer holds it for this replica (see the module doc). As far as this replica has
    /// noticed: the thread sees a break at its next statement or check.
    pub fn is_lost(&self) -> bool {
        self.service.state.session.load(Ordering::Acquire) != self.session
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.service.requests.send(Request::Release {
            key: self.key,
            session: self.session,
        });
    }
}

impl LockService {
    /// Starts the lock thread for the database `settings` names. It connects on the first
    /// request (see the module doc).
    pub fn start(settings: Settings) -> Result<LockService> {
        let (tx, rx) = mpsc::channel::<Request>();
        let state = Arc::new(State::default());
        let worker = Worker::new(settings, Arc::clone(&state));
        std::thread::Builder::new()
            .name("catalog-locks".into())
            .spawn(move || worker.run(&rx))?;
        Ok(LockService {
            shared: Arc::new(Shared { requests: tx, state }),
        })
    }

    /// Waits until this replica holds `key`.
    pub async fn acquire(&self, key: i64) -> Result<LockGuard> {
        self.request(key, true)
            .await?
            .ok_or_else(|| Internal::Other("a database lock request was refused").into())
    }

    /// Takes `key` if no one holds it; `None` when someone (another replica, or another guard
    /// of this one) does.
    pub async fn try_acquire(&self, key: i64) -> Result<Option<LockGuard>> {
        self.request(key, false).await
    }

    async fn request(&self, key: i64, wait: bool) -> Result<Option<LockGuard>> {
        let state = &self.shared.state;
        if state.outstanding.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
            state.outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err(Internal::CatalogUnavailable(TOO_MANY).into());
        }
        let counted = Outstanding(Arc::clone(state));
        let (reply, answer) = oneshot::channel();
        self.shared
            .requests
            .send(Request::Acquire(Waiter {
                key,
                wait,
                reply,
                service: Arc::clone(&self.shared),
                next_try: Instant::now(),
                _counted: counted,
            }))
            .map_err(|_| Error::from(Internal::Other(STOPPED)))?;
        answer.await.map_err(|_| Error::from(Internal::Other(STOPPED)))?
    }
}

/// How long to wait before the next connection attempt after `failures` failures in a row:
/// none after the first (an idle connection the server closed is simply opened again), then
/// growing up to [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(100)
            .saturating_mul(1 << (n - 2).min(16))
            .min(MAX_BACKOFF),
    }
}

/// The lock thread's state: the connection and what it holds and waits for.
struct Worker {
    settings: Settings,
    state: Arc<State>,
    client: Option<::postgres::Client>,
    /// The current session's number (also in `state`).
    session: u64,
    /// Keys held by this replica's guards, in the current session.
    held: HashSet<i64>,
    /// Acquisitions waiting, in arrival order.
    waiting: Vec<Waiter>,
    /// Keys released, to unlock before the next round.
    unlocks: Vec<i64>,
    /// Connection failures (to connect, or of a statement) since the last statement that ran.
    failures: u32,
    /// No connection attempt before then.
    retry_at: Instant,
    /// When the connection last answered.
    last_used: Instant,
}

impl Worker {
    fn new(settings: Settings, state: Arc<State>) -> Worker {
        let now = Instant::now();
        Worker {
            settings,
            state,
            client: None,
            session: 0,
            held: HashSet::new(),
            waiting: Vec::new(),
            unlocks: Vec::new(),
            failures: 0,
            retry_at: now,
            last_used: now,
        }
    }

    /// Serves requests until every handle and guard is gone; the connection (and with it
    /// anything still held) closes with the thread.
    fn run(mut self, requests: &mpsc::Receiver<Request>) {
        loop {
            let first = match self.next_wake() {
                None => requests.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(wait) => requests.recv_timeout(wait),
            };
            match first {
                Ok(request) => self.take(request),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while let Ok(request) = requests.try_recv() {
                self.take(request);
            }
            // Those whose caller went away are not tried any more.
            self.waiting.retain(|w| !w.reply.is_closed());
            self.flush_unlocks();
            self.round();
            self.check_connection();
        }
    }

    /// When the loop must wake without a request: the next retry due, or the next check of a
    /// connection holding locks. `None`: only a request can change anything.
    fn next_wake(&self) -> Option<Duration> {
        let due = self
            .waiting
            .iter()
            .filter(|w| !self.held.contains(&w.key))
            .map(|w| w.next_try)
            .min();
        let check = (self.client.is_some() && !self.held.is_empty()).then_some(self.last_used + PING_EVERY);
        let now = Instant::now();
        due.into_iter()
            .chain(check)
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    fn take(&mut self, request: Request) {
        match request {
            Request::Acquire(waiter) => {
                if self.client.is_none() && Instant::now() < self.retry_at {
                    waiter.answer(Err(Internal::CatalogUnavailable(DOWN).into()));
                } else if self.waiting.len() >= MAX_WAITING {
                    waiter.answer(Err(Internal::CatalogUnavailable(TOO_MANY).into()));
                } else {
                    self.waiting.push(waiter);
                }
            }
            Request::Release { key, session } => {
                // A release of an older session: PostgreSQL released it with that session.
                if session == self.session && self.held.remove(&key) {
                    self.unlocks.push(key);
                    let now = Instant::now();
                    for w in self.waiting.iter_mut().filter(|w| w.key == key) {
                        w.next_try = now;
                    }
                }
            }
        }
    }

    fn flush_unlocks(&mut self) {
        if self.unlocks.is_empty() {
            return;
        }
        let keys = std::mem::take(&mut self.unlocks);
        let Some(client) = self.client.as_mut() else { return };
        match client.execute("SELECT pg_advisory_unlock(k) FROM unnest($1::int8[]) AS t(k)", &[&keys]) {
            Ok(_) => self.used(),
            Err(e) => self.broken(&e),
        }
    }

    /// Tries every key due once (one statement), and answers the requests it settles.
    fn round(&mut self) {
        let now = Instant::now();
        let mut keys: Vec<i64> = self
            .waiting
            .iter()
            .filter(|w| w.next_try <= now && !self.held.contains(&w.key))
            .map(|w| w.key)
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut granted = HashSet::new();
        if !keys.is_empty() {
            if !self.connect() {
                return;
            }
            let Some(client) = self.client.as_mut() else { return };
            match client.query(
                "SELECT k, pg_try_advisory_lock(k) FROM unnest($1::int8[]) AS t(k)",
                &[&keys],
            ) {
                Ok(rows) => {
                    granted = rows
                        .iter()
                        .filter(|r| r.get::<_, bool>(1))
                        .map(|r| r.get::<_, i64>(0))
                        .collect();
                    self.used();
                }
                Err(e) => {
                    // Whatever the statement took went with the session.
                    self.broken(&e);
                    return;
                }
            }
        }
        for w in std::mem::take(&mut self.waiting) {
            if self.held.contains(&w.key) {
                // Held here (maybe granted a moment ago to an earlier request).
                if w.wait {
                    self.waiting.push(w);
                } else {
                    w.answer(Ok(None));
                }
            } else if w.next_try > now {
                self.waiting.push(w);
            } else if granted.contains(&w.key) {
                self.held.insert(w.key);
                let guard = LockGuard {
                    key: w.key,
                    session: self.session,
                    service: Arc::clone(&w.service),
                };
                // Should the caller have gone meanwhile, the unread guard is dropped with the
                // reply and releases the key.
                w.answer(Ok(Some(guard)));
            } else if w.wait {
                self.waiting.push(Waiter {
                    next_try: now + POLL,
                    ..w
                });
            } else {
                w.answer(Ok(None));
            }
        }
    }

    /// While locks are held, makes sure the connection holding them still lives.
    fn check_connection(&mut self) {
        if self.held.is_empty() || self.last_used.elapsed() < PING_EVERY {
            return;
        }
        let Some(client) = self.client.as_mut() else { return };
        match client.is_valid(PING_TIMEOUT) {
            Ok(()) => self.used(),
            Err(e) => self.broken(&e),
        }
    }

    /// Connects unless connected; `false` (with every waiting request failed) when that is not
    /// possible now.
    fn connect(&mut self) -> bool {
        if self.client.is_some() {
            return true;
        }
        if Instant::now() >= self.retry_at {
            // `connect` logs its failures.
            match self.settings.connect() {
                Ok(client) => {
                    self.client = Some(client);
                    self.last_used = Instant::now();
                    return true;
                }
                Err(_) => self.failed(),
            }
        }
        self.fail_waiting();
        false
    }

    /// The connection answered.
    fn used(&mut self) {
        self.failures = 0;
        self.last_used = Instant::now();
    }

    /// The connection broke (or a statement on it failed): its session and every lock it held
    /// are gone (see the module doc).
    fn broken(&mut self, e: &::postgres::Error) {
        let lost = self.held.len();
        if lost > 0 {
            tracing::error!(
                error = %e, lost,
                "catalog locks: the lock connection broke; PostgreSQL released the locks this replica held, \
                 which another replica may now take"
            );
        } else {
            tracing::warn!(error = %e, "catalog locks: the lock connection broke; connecting again");
        }
        // Dropped here, on the lock thread.
        self.client = None;
        self.session += 1;
        self.state.session.store(self.session, Ordering::Release);
        self.held.clear();
        self.unlocks.clear();
        self.failed();
        // A connection the server closed while idle is opened again at once; a second failure
        // in a row fails the requests waiting.
        if self.failures >= 2 {
            self.fail_waiting();
        }
    }

    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Instant::now() + backoff(self.failures);
    }

    fn fail_waiting(&mut self) {
        for w in self.waiting.drain(..) {
            w.answer(Err(Internal::CatalogUnavailable(DOWN).into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys are part of the protocol between replicas (of different versions during a rolling
    /// upgrade): they must never change.
    #[test]
    fn keys_are_stable() {
        let digest = format!("sha256:{}", "0".repeat(64));
        assert_eq!(blob_key(&digest), hashed_key("blob", &digest));
        assert_eq!(
            blob_key(&digest),
            0x0643_8f12_71b1_e0ef_u64 as i64,
            "{:#x}",
            blob_key(&digest)
        );
        assert_eq!(
            spack_key("team/cache"),
            0x969a_3f00_6e75_e0ed_u64 as i64,
            "{:#x}",
            spack_key("team/cache")
        );
    }

    #[test]
    fn keys_are_namespaced() {
        assert_ne!(blob_key("x"), spack_key("x"));
        assert_ne!(blob_key("sha256:aa"), blob_key("sha256:ab"));
    }

    #[test]
    fn named_keys_avoid_the_fixed_keys() {
        for n in [1, 2, 3, 4, 5, 0xffff_ffff] {
            let fixed = postgres::lock_key(n);
            assert_eq!(fixed >> 32, FIXED_PREFIX);
            let moved = outside_fixed_keys(fixed);
            assert_ne!(moved >> 32, FIXED_PREFIX, "{fixed:#x} moved out");
            assert_eq!(moved & 0xffff_ffff, fixed & 0xffff_ffff, "only the prefix changes");
        }
        // Anything else is left as it is.
        assert_eq!(outside_fixed_keys(-1), -1);
        assert_eq!(outside_fixed_keys(42), 42);
        for name in ["a", "b", "c", "library/ubuntu"] {
            assert_ne!(spack_key(name) >> 32, FIXED_PREFIX);
            assert_ne!(blob_key(name) >> 32, FIXED_PREFIX);
        }
        assert!(![postgres::WRITE_LOCK, postgres::MIGRATE_LOCK, postgres::SINGLE_NODE_LOCK].contains(&GC_LEADER_KEY));
    }

    #[test]
    fn backoff_is_immediate_once_then_grows_to_a_bound() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(40), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    fn unreachable() -> Settings {
        // Nothing listens on port 1: connecting is refused at once.
        Settings::new("postgres://stowage@127.0.0.1:1/none?connect_timeout=2", None, None).unwrap()
    }

    /// Without a database, requests fail with an error (none hangs), and a later request is
    /// refused while the thread waits before connecting again.
    #[tokio::test]
    async fn requests_fail_when_the_database_is_unreachable() {
        let locks = LockService::start(unreachable()).unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), locks.acquire(1)).await;
        assert!(first.expect("answered").is_err());
        let second = tokio::time::timeout(Duration::from_secs(10), locks.try_acquire(2)).await;
        assert!(second.expect("answered").is_err());
        assert_eq!(
            locks.shared.state.outstanding.load(Ordering::Acquire),
            0,
            "nothing left counted"
        );
    }

    #[tokio::test]
    async fn requests_past_the_bound_are_refused() {
        let locks = LockService::start(unreachable()).unwrap();
        locks.shared.state.outstanding.store(MAX_WAITING, Ordering::Release);
        let refused = locks.acquire(1).await.unwrap_err();
        assert!(refused.to_string().contains("too many"), "{refused}");
        assert_eq!(locks.shared.state.outstanding.load(Ordering::Acquire), MAX_WAITING);
    }
}
