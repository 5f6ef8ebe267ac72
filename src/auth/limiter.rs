//! Failed-login rate limiting, per client address and per user name, in memory.
//!
//! Each key counts failures in a fixed window that starts at its first failure. Once a key has
//! `max` failures in its window, logins under it are refused (429) until the window ends; a
//! successful login clears the user's count. A client address gets three times the user limit,
//! so that one client trying many names is stopped too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most keys kept; past this, expired windows are swept.
const MAX_KEYS: usize = 100_000;

pub struct Limiter {
    window: Duration,
    max_per_user: u32,
    max_per_client: u32,
    counts: Mutex<HashMap<String, (u32, Instant)>>,
}

/// Keys of one login attempt.
pub struct Attempt {
    client: String,
    user: Option<String>,
}

impl Attempt {
    pub fn new(client: std::net::IpAddr, user: Option<&str>) -> Attempt {
        Attempt {
            client: format!("client:{client}"),
            user: user.map(|u| format!("user:{u}")),
        }
    }
}

impl Limiter {
    pub fn new(window: Duration, max_per_user: u32) -> Limiter {
        Limiter {
            window,
            max_per_user: max_per_user.max(1),
            max_per_client: max_per_user.max(1).saturating_mul(3),
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(seconds to wait)` when a key of the attempt is over its limit.
    pub fn check(&self, a: &Attempt) -> Result<(), u64> {
        let Ok(counts) = self.counts.lock() else { return Ok(()) };
        let now = Instant::now();
        let over = |key: &str, max: u32| -> Option<u64> {
            let (n, start) = counts.get(key)?;
            let elapsed = now.duration_since(*start);
            (elapsed < self.window && *n >= max).then(|| (self.window - elapsed).as_secs().max(1))
        };
        let wait = over(&a.client, self.max_per_client)
            .into_iter()
            .chain(a.user.as_deref().and_then(|u| over(u, self.max_per_user)))
            .max();
        wait.map_or(Ok(()), Err)
    }

    /// Counts a failed attempt.
    pub fn fail(&self, a: &Attempt) {
        let Ok(mut counts) = self.counts.lock() else { return };
        let now = Instant::now();
        if counts.len() >= MAX_KEYS {
            counts.retain(|_, (_, start)| now.duration_since(*start) < self.window);
        }
        for key in std::iter::once(&a.client).chain(a.user.as_ref()) {
            let entry = counts.entry(key.clone()).or_insert((0, now));
            if now.duration_since(entry.1) >= self.window {
                *entry = (0, now);
            }
            entry.0 = entry.0.saturating_add(1);
        }
    }

    /// A successful login clears the user's failures.
    pub fn succeed(&self, a: &Attempt) {
        if let (Some(user), Ok(mut counts)) = (&a.user, self.counts.lock()) {
            counts.remove(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_user_and_client() {
        let l = Limiter::new(Duration::from_secs(60), 2);
        let ip: std::net::IpAddr = [10, 0, 0, 1].into();
        let a = Attempt::new(ip, Some("bob"));
        assert!(l.check(&a).is_ok());
        l.fail(&a);
        l.fail(&a);
        assert!(l.check(&a).is_err());
        // Another user from the same client is still allowed, up to the client's limit.
        let b = Attempt::new(ip, Some("carol"));
        assert!(l.check(&b).is_ok());
        for _ in 0..4 {
            l.fail(&b);
        }
        assert!(l.check(&Attempt::new(ip, Some("dave"))).is_err());
        let elsewhere = Attempt::new([10, 0, 0, 2].into(), Some("dave"));
        assert!(l.check(&elsewhere).is_ok());
        l.succeed(&a);
        assert!(l.check(&Attempt::new([10, 0, 0, 3].into(), Some("bob"))).is_ok());
    }
}
