//! Failed-login throttling, in memory, that an attacker cannot turn against a user.
//!
//! Password attempts are tracked under two keys: the client address (IPv6 addresses by their
//! /64, the block one host usually holds), and the pair (user name, client address). Nothing
//! is kept per user name alone, so failures sent from one address never block that user at
//! another address. API token secrets never pass through here (see `Auth::login`): guessing a
//! 256-bit secret is hopeless, and checking one costs a SHA-256 and one indexed lookup.
//!
//! Per key (its allowance `free` is `auth.max_failed_logins` for a (user, address) pair and
//! three times that for an address, so that one client trying many names is stopped too):
//!
//! - The first `free` failures cost nothing. The failure that reaches `free` blocks the key
//!   for `backoff`, and each further one doubles the block, up to `backoff_max`; an attempt
//!   while blocked is refused before any password is checked (429 with `Retry-After`).
//! - Attempts in progress count: a key has `free - failures` attempts in flight at most (one,
//!   once its allowance is spent), so a burst of concurrent attempts cannot run more password
//!   checks than the allowance. An attempt that is dropped before it has an outcome (the
//!   client went away) counts as a failure.
//! - A success clears its (user, address) pair; the address's count stays (so that an account
//!   of one's own cannot be used to reset it between guesses at others).
//! - A key with nothing in flight and no failure for `forget_after` (and no block left) is
//!   forgotten.
//!
//! Memory is bounded: at most `max_entries` keys (each a fixed-size key: the user name is kept
//! as a 128-bit hash, never as sent). When full, forgotten keys are swept, then keys that are
//! neither blocked nor in flight are dropped (forgetting them gives back at most an allowance);
//! if every key is blocked, a new key's attempt is refused (429) rather than a blocked key
//! released, and a warning is logged. A full sweep runs at most once a second.
//!
//! Behind a reverse proxy the client address is what `auth.trusted_proxies` lets the server
//! believe (see `http::auth::client_ip`): behind a proxy not listed there, every client has the
//! proxy's address and shares its allowance.
//!
//! # Replicas of a PostgreSQL catalog
//!
//! Replicas behind one load balancer would each give an attacker a whole allowance, and a block
//! made on one would not refuse the attempts sent to another. With a PostgreSQL catalog the
//! limiter therefore has a second layer, [`shared`]: the keys' failures and blocks in the
//! catalog's `login_throttle` table, which every replica reads before it checks a password and
//! writes after a failure (the rules are the same; [`shared`] says exactly what is read and
//! written, and what happens when the catalog fails: each replica carries on with its own
//! counts, with a warning). The in-memory limiter stays the first line on every replica: it
//! refuses a key that is blocked or busy here without asking the catalog, bounds the attempts
//! in flight per key and its own memory, and adopts the blocks the shared layer reports, so
//! that an attacker's further attempts at a replica cost that replica nothing.
//!
//! The two layers only ever add refusals: an attempt goes ahead when neither refuses it. A
//! replica's own count of a key is at most the shared count (it saw fewer of its failures),
//! except for failures the catalog did not record (an attempt whose client went away before its
//! outcome, a catalog error), and after a success at another replica, which clears the pair's
//! shared row but not this replica's count of it (cleared here by a success here, or forgotten
//! after `forget_after`).
//!
//! SQLite (one process, the default) has no shared layer: [`Limiter::admit`] is the in-memory
//! check alone, and a login costs no catalog work.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::Digest as _;

use crate::catalog::Catalog;

pub mod shared;

/// How the limiter is tuned.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Failures a (user, address) pair may have before backoff starts (an address: three times).
    pub free: u32,
    /// The first block.
    pub backoff: Duration,
    /// The longest block.
    pub backoff_max: Duration,
    /// A key without a failure (and without a block) for this long is forgotten.
    pub forget_after: Duration,
    /// Most keys tracked.
    pub max_entries: usize,
}

impl Settings {
    /// How long a key with allowance `free` is blocked after its `failures`-th failure: not at
    /// all before the allowance is spent, then `backoff`, doubled by each further failure, up
    /// to `backoff_max`. The one rule of both layers.
    pub fn block_after(&self, failures: u32, free: u32) -> Option<Duration> {
        (failures >= free).then(|| {
            let doublings = (failures - free).min(31);
            self.backoff.saturating_mul(1u32 << doublings).min(self.backoff_max)
        })
    }
}

/// Most keys tracked by default (about 100 bytes each).
pub const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Client(IpAddr),
    /// The first 128 bits of SHA-256 of the user name, and the address.
    User([u8; 16], IpAddr),
}

impl Key {
    /// The key as the shared layer stores it: a kind byte (1: an address, 2: a pair), the
    /// user name's hash for a pair, and the address as 16 bytes (IPv4 mapped into IPv6).
    fn to_bytes(self) -> Vec<u8> {
        let v6 = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        match self {
            Key::Client(ip) => [&[1u8][..], &v6(ip)].concat(),
            Key::User(name, ip) => [&[2u8][..], &name, &v6(ip)].concat(),
        }
    }
}

#[derive(Debug)]
struct Entry {
    failures: u32,
    in_flight: u32,
    blocked_until: Option<Instant>,
    last_failure: Instant,
}

impl Entry {
    fn blocked_at(&self, now: Instant) -> Option<Duration> {
        self.blocked_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    fn forgotten_at(&self, now: Instant, forget_after: Duration) -> bool {
        self.in_flight == 0
            && self.blocked_at(now).is_none()
            && now.saturating_duration_since(self.last_failure) >= forget_after
    }
}

/// The keys of one password attempt.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    client: Key,
    user: Key,
}

/// The address a client is tracked under: IPv4 as is, IPv6 by its /64.
fn client_block(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

impl Attempt {
    pub fn new(client: IpAddr, user: &str) -> Attempt {
        let client = client_block(client);
        let digest = sha2::Sha256::digest(user.as_bytes());
        let mut name = [0u8; 16];
        name.copy_from_slice(&digest[..16]);
        Attempt {
            client: Key::Client(client),
            user: Key::User(name, client),
        }
    }

    fn keys(&self) -> [Key; 2] {
        [self.user, self.client]
    }
}

pub struct Limiter {
    settings: Settings,
    state: Mutex<State>,
    /// The shared layer, on a PostgreSQL catalog.
    shared: Option<shared::Shared>,
}

struct State {
    entries: HashMap<Key, Entry>,
    /// When a sweep last failed to make room.
    full_since: Option<Instant>,
}

/// An attempt in flight; report its outcome with [`Pending::succeed`], [`Pending::fail`] or
/// [`Pending::release`]. Dropped without an outcome, it counts as a failure.
pub struct Pending<'a> {
    limiter: &'a Limiter,
    attempt: Attempt,
    done: bool,
}

impl Pending<'_> {
    /// The password was right.
    pub fn succeed(mut self) {
        self.done = true;
        self.limiter.finish(&self.attempt, Outcome::Success, Instant::now());
    }

    /// The password (or user name) was wrong.
    pub fn fail(mut self) {
        self.done = true;
        self.limiter.finish(&self.attempt, Outcome::Failure, Instant::now());
    }

    /// No password was checked (the server was busy or failed): the attempt does not count.
    pub fn release(mut self) {
        self.done = true;
        self.limiter.finish(&self.attempt, Outcome::None, Instant::now());
    }
}

impl Pending<'_> {
    /// Extends the blocks of the attempt's keys (in [`Attempt::keys`] order) to what the shared
    /// layer says, while the attempt still holds them.
    fn adopt_blocks(&self, until: [Option<Instant>; 2]) {
        let mut state = self.limiter.state.lock().unwrap_or_else(|p| p.into_inner());
        for (key, until) in self.attempt.keys().into_iter().zip(until) {
            if let (Some(until), Some(entry)) = (until, state.entries.get_mut(&key)) {
                entry.blocked_until = Some(entry.blocked_until.map_or(until, |b| b.max(until)));
            }
        }
    }
}

/// An attempt admitted by [`Limiter::admit`]: report its outcome with [`Admitted::succeed`],
/// [`Admitted::fail`] or [`Admitted::release`]. Dropped without an outcome (even while one is
/// being recorded), it counts as a failure here.
pub struct Admitted<'a> {
    pending: Pending<'a>,
    /// The shared layer holds a row of the attempt's (user, address) pair, for a success to
    /// clear.
    pair_row: bool,
}

impl Admitted<'_> {
    /// The password was right: clears the pair here, and in the shared layer if it has a row.
    pub async fn succeed(self) {
        let Admitted { pending, pair_row } = self;
        let (limiter, attempt) = (pending.limiter, pending.attempt);
        pending.succeed();
        if let (true, Some(shared)) = (pair_row, &limiter.shared) {
            shared.clear(attempt.user).await;
        }
    }

    /// The password (or user name) was wrong: recorded in the shared layer first (the attempt
    /// keeps its place in flight meanwhile), then here, with the shared layer's blocks adopted.
    pub async fn fail(self) {
        let Admitted { pending, .. } = self;
        if let Some(shared) = &pending.limiter.shared
            && let Some(blocks) = shared.record_failure(&pending.limiter.settings, &pending.attempt).await
        {
            pending.adopt_blocks(blocks);
        }
        pending.fail();
    }

    /// No password was checked: the attempt does not count.
    pub fn release(self) {
        self.pending.release();
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.finish(&self.attempt, Outcome::Failure, Instant::now());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
    None,
}

/// Whole seconds to wait for `d`, at least one.
fn retry_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0)).max(1)
}

impl Limiter {
    pub fn new(mut settings: Settings) -> Limiter {
        settings.free = settings.free.max(1);
        settings.backoff_max = settings.backoff_max.max(settings.backoff);
        settings.max_entries = settings.max_entries.max(2);
        Limiter {
            settings,
            state: Mutex::new(State {
                entries: HashMap::new(),
                full_since: None,
            }),
            shared: None,
        }
    }

    /// This limiter with the shared layer on `catalog` (a PostgreSQL one: see [`shared`]).
    pub fn shared_through(mut self, catalog: Catalog) -> Limiter {
        self.shared = Some(shared::Shared::new(catalog));
        self
    }

    /// Starts an attempt now: the in-memory check ([`Limiter::begin`]), then the shared layer's
    /// (when there is one), or `Err(seconds to wait)`.
    pub async fn admit(&self, attempt: Attempt) -> Result<Admitted<'_>, u64> {
        let pending = self.begin(attempt, Instant::now())?;
        let Some(shared) = &self.shared else {
            return Ok(Admitted {
                pending,
                pair_row: false,
            });
        };
        match shared.check(&attempt).await {
            shared::Verdict::Open { pair_row } => Ok(Admitted { pending, pair_row }),
            shared::Verdict::Blocked { until, retry_after } => {
                pending.adopt_blocks(until);
                pending.release();
                Err(retry_after)
            }
        }
    }

    fn free(&self, key: &Key) -> u32 {
        match key {
            Key::User(..) => self.settings.free,
            Key::Client(_) => self.settings.free.saturating_mul(3),
        }
    }

    /// Starts an attempt at `now`, or `Err(seconds to wait)` when one of its keys is blocked or
    /// has as many attempts in flight as it may.
    pub fn begin(&self, attempt: Attempt, now: Instant) -> Result<Pending<'_>, u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut missing = 0;
        for key in attempt.keys() {
            let Some(entry) = state.entries.get(&key) else {
                missing += 1;
                continue;
            };
            if let Some(left) = entry.blocked_at(now) {
                return Err(retry_secs(left));
            }
            if entry.forgotten_at(now, self.settings.forget_after) {
                state.entries.remove(&key);
                missing += 1;
                continue;
            }
            let slots = self.free(&key).saturating_sub(entry.failures).max(1);
            if entry.in_flight >= slots {
                // Another attempt under this key is being checked; it takes well under a second.
                return Err(1);
            }
        }
        if state.entries.len() + missing > self.settings.max_entries && !self.make_room(&mut state, missing, now) {
            return Err(1);
        }
        for key in attempt.keys() {
            let entry = state.entries.entry(key).or_insert(Entry {
                failures: 0,
                in_flight: 0,
                blocked_until: None,
                last_failure: now,
            });
            entry.in_flight = entry.in_flight.saturating_add(1);
        }
        Ok(Pending {
            limiter: self,
            attempt,
            done: false,
        })
    }

    /// Frees room for `needed` keys; false when every key is blocked or in flight.
    fn make_room(&self, state: &mut State, needed: usize, now: Instant) -> bool {
        let max = self.settings.max_entries;
        if state
            .full_since
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1))
        {
            return false;
        }
        let forget_after = self.settings.forget_after;
        state.entries.retain(|_, e| !e.forgotten_at(now, forget_after));
        if state.entries.len() + needed > max {
            state
                .entries
                .retain(|_, e| e.in_flight > 0 || e.blocked_at(now).is_some());
        }
        if state.entries.len() + needed > max {
            state.full_since = Some(now);
            tracing::warn!(
                keys = state.entries.len(),
                "the failed-login limiter is full of blocked addresses; refusing logins from new ones"
            );
            return false;
        }
        state.full_since = None;
        true
    }

    fn finish(&self, attempt: &Attempt, outcome: Outcome, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for key in attempt.keys() {
            let free = self.free(&key);
            let Some(entry) = state.entries.get_mut(&key) else {
                continue;
            };
            entry.in_flight = entry.in_flight.saturating_sub(1);
            match outcome {
                Outcome::Failure => {
                    entry.failures = entry.failures.saturating_add(1);
                    entry.last_failure = now;
                    if let Some(block) = self.settings.block_after(entry.failures, free) {
                        // Never shorter than a block the shared layer reported.
                        let until = now + block;
                        entry.blocked_until = Some(entry.blocked_until.map_or(until, |b| b.max(until)));
                    }
                }
                Outcome::Success if matches!(key, Key::User(..)) => {
                    entry.failures = 0;
                    entry.blocked_until = None;
                }
                Outcome::Success | Outcome::None => {}
            }
            // A key with a block adopted from the shared layer stays until the block ends.
            if entry.failures == 0 && entry.in_flight == 0 && entry.blocked_at(now).is_none() {
                state.entries.remove(&key);
            }
        }
    }

    /// Keys tracked now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().map(|s| s.entries.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(free: u32, max_entries: usize) -> Limiter {
        Limiter::new(Settings {
            free,
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            forget_after: Duration::from_secs(600),
            max_entries,
        })
    }

    fn ip(last: u8) -> IpAddr {
        [10, 0, 0, last].into()
    }

    /// Fails one attempt at `now`; panics if it is refused.
    fn fail(l: &Limiter, a: Attempt, now: Instant) {
        let mut p = l.begin(a, now).expect("attempt allowed");
        p.done = true;
        l.finish(&a, Outcome::Failure, now);
    }

    /// `Ok` if an attempt would be allowed at `now` (the attempt is then released), else the
    /// seconds to wait.
    fn check(l: &Limiter, a: Attempt, now: Instant) -> Result<(), u64> {
        l.begin(a, now).map(Pending::release)
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let l = limiter(3, 100);
        let a = Attempt::new(ip(1), "bob");
        let mut now = Instant::now();
        for _ in 0..2 {
            fail(&l, a, now);
            assert_eq!(check(&l, a, now), Ok(()));
        }
        // The third failure spends the allowance: 1 s, then 2, 4, 8, … up to 60.
        let mut expected = 1;
        for _ in 0..10 {
            fail(&l, a, now);
            assert_eq!(check(&l, a, now), Err(expected), "blocked for {expected} s");
            let almost = now + Duration::from_secs(expected) - Duration::from_millis(1);
            assert_eq!(check(&l, a, almost), Err(1));
            now += Duration::from_secs(expected);
            expected = (expected * 2).min(60);
        }
        assert_eq!(expected, 60);
        assert_eq!(check(&l, a, now), Ok(()));
    }

    #[test]
    fn other_addresses_and_users_are_not_blocked() {
        let l = limiter(2, 100);
        let now = Instant::now();
        let attacker = Attempt::new(ip(66), "bob");
        fail(&l, attacker, now);
        fail(&l, attacker, now);
        assert!(check(&l, attacker, now).is_err());
        // Bob from another address, and another user from the attacker's address.
        assert_eq!(check(&l, Attempt::new(ip(7), "bob"), now), Ok(()));
        assert_eq!(check(&l, Attempt::new(ip(66), "carol"), now), Ok(()));
    }

    #[test]
    fn an_address_trying_many_names_is_blocked() {
        let l = limiter(2, 100);
        let now = Instant::now();
        for n in 0..6 {
            fail(&l, Attempt::new(ip(66), &format!("user{n}")), now);
        }
        assert_eq!(check(&l, Attempt::new(ip(66), "fresh"), now), Err(1));
        assert_eq!(check(&l, Attempt::new(ip(67), "fresh"), now), Ok(()));
    }

    #[test]
    fn ipv6_clients_are_tracked_by_their_64() {
        let l = limiter(1, 100);
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        fail(&l, Attempt::new(a, "bob"), now);
        assert!(check(&l, Attempt::new(b, "bob"), now).is_err());
        assert_eq!(check(&l, Attempt::new(c, "bob"), now), Ok(()));
    }

    #[test]
    fn attempts_in_flight_count() {
        let l = limiter(3, 100);
        let a = Attempt::new(ip(1), "bob");
        let held: Vec<_> = (0..3)
            .map(|_| l.begin(a, Instant::now()).expect("within allowance"))
            .collect();
        assert_eq!(check(&l, a, Instant::now()), Err(1), "a fourth concurrent attempt");
        drop(held); // dropped without an outcome: three failures
        let now = Instant::now();
        assert!(check(&l, a, now).is_err(), "blocked after the allowance");
        // Once the allowance is spent, one attempt at a time.
        let later = now + Duration::from_secs(2);
        let one = l.begin(a, later).expect("after the block");
        assert_eq!(check(&l, a, later), Err(1));
        one.release();
        assert_eq!(check(&l, a, later), Ok(()));
    }

    #[test]
    fn success_clears_the_pair_but_not_the_address() {
        let l = limiter(2, 100);
        let now = Instant::now();
        let bob = Attempt::new(ip(1), "bob");
        fail(&l, bob, now);
        l.begin(bob, now).expect("allowed").succeed();
        fail(&l, bob, now);
        assert_eq!(check(&l, bob, now), Ok(()), "the pair's count restarted");
        // The address keeps its two failures: four more (across names) block it.
        for n in 0..4 {
            fail(&l, Attempt::new(ip(1), &format!("u{n}")), now);
        }
        assert!(check(&l, Attempt::new(ip(1), "someone"), now).is_err());
    }

    #[test]
    fn keys_are_bounded() {
        let l = limiter(5, 10);
        let now = Instant::now();
        // Five addresses with one failure each: ten keys, the table is full.
        for n in 0..5 {
            fail(&l, Attempt::new(ip(n), "bob"), now);
        }
        assert_eq!(l.len(), 10);
        // A new address fits by dropping keys that are neither blocked nor in flight.
        fail(&l, Attempt::new(ip(100), "bob"), now);
        assert!(l.len() <= 10);
    }

    #[test]
    fn blocked_keys_are_never_dropped_to_make_room() {
        // Two addresses, each blocked (three names failed) with its three pairs: eight keys.
        let l = limiter(1, 8);
        let now = Instant::now();
        for n in 0..2 {
            for user in ["a", "b", "c"] {
                fail(&l, Attempt::new(ip(n), user), now);
            }
        }
        assert_eq!(l.len(), 8);
        assert_eq!(check(&l, Attempt::new(ip(100), "bob"), now), Err(1), "full");
        assert!(check(&l, Attempt::new(ip(0), "d"), now).is_err(), "still blocked");
        assert_eq!(l.len(), 8);
        // Once the blocks end and the keys are forgotten, there is room again.
        let later = now + Duration::from_secs(601);
        assert_eq!(check(&l, Attempt::new(ip(100), "bob"), later), Ok(()));
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn adopted_blocks_refuse_until_they_end_and_are_never_shortened() {
        let l = limiter(3, 100);
        let now = Instant::now();
        let a = Attempt::new(ip(1), "bob");
        let mut p = l.begin(a, now).expect("allowed");
        p.adopt_blocks([Some(now + Duration::from_secs(5)), None]);
        p.done = true;
        l.finish(&a, Outcome::None, now);
        assert_eq!(check(&l, a, now), Err(5), "the pair is blocked here too");
        assert_eq!(check(&l, Attempt::new(ip(1), "carol"), now), Ok(()), "not the address");
        let later = now + Duration::from_secs(5);
        let mut p = l.begin(a, later).expect("the block is over");
        p.done = true;
        l.finish(&a, Outcome::Success, later);
        assert_eq!(l.len(), 0, "nothing left behind");

        // A failure counted here (the first of three) keeps a longer block reported.
        let b = Attempt::new(ip(2), "bob");
        let mut p = l.begin(b, now).expect("allowed");
        p.adopt_blocks([None, Some(now + Duration::from_secs(60))]);
        p.done = true;
        l.finish(&b, Outcome::Failure, now);
        assert_eq!(check(&l, Attempt::new(ip(2), "carol"), now), Err(60), "the address");
    }

    #[test]
    fn shared_keys_are_fixed_size_and_hold_no_user_name() {
        let name = "a-rather-long-user-name";
        let a = Attempt::new("2001:db8:1:2::1".parse().unwrap(), name);
        let [user, client] = a.keys().map(Key::to_bytes);
        assert_eq!((user.len(), client.len()), (33, 17));
        assert!(!user.windows(6).any(|w| w == b"rather"));
        // The same /64, the same keys; another name, another pair.
        let b = Attempt::new("2001:db8:1:2::ffff".parse().unwrap(), name);
        assert_eq!(b.keys().map(Key::to_bytes), [user.clone(), client.clone()]);
        let c = Attempt::new("2001:db8:1:2::1".parse().unwrap(), "another");
        assert_ne!(c.keys().map(Key::to_bytes)[0], user);
        // IPv4, as is or mapped, is one address.
        let v4 = Attempt::new(ip(1), name).keys().map(Key::to_bytes);
        let mapped = Attempt::new("::ffff:10.0.0.1".parse().unwrap(), name)
            .keys()
            .map(Key::to_bytes);
        assert_eq!(v4, mapped);
        assert_ne!(v4[1], client);
    }

    #[test]
    fn successes_leave_nothing_behind() {
        let l = limiter(5, 10);
        let now = Instant::now();
        for n in 0..50 {
            l.begin(Attempt::new(ip(n), "bob"), now).expect("allowed").succeed();
        }
        assert_eq!(l.len(), 0);
    }
}
