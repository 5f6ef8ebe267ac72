-- The failed-login limiter's shared state (schema version 19): what replicas of one PostgreSQL
-- catalog must agree on, so that an attacker gets one allowance across them all and a block
-- made on one replica refuses the attempts sent to the others (`auth::limiter::shared`).
--
-- One row per limiter key that has failed lately: a client address (IPv6 by its /64), or a
-- (user name, address) pair. `key` is the limiter's own fixed-size encoding (a kind byte, the
-- 128-bit SHA-256 prefix of the user name for a pair, the address as 16 bytes); the user name
-- is never stored as sent. Times are unix MILLISECONDS, unlike the rest of the catalog's unix
-- seconds: blocks start at one second and double, and whole seconds would shift each by up to
-- one.
--
-- - `failures`: failures since the key was last forgotten (or, for a pair, last succeeded).
-- - `blocked_until_ms`: an attempt before this time is refused before any password is checked
--   (0: not blocked).
-- - `last_failure_ms`: when the last failure was recorded. A row whose last failure is older
--   than `auth.failed_login_window_secs` and whose block is over counts as absent (its next
--   failure starts again at 1), and is deleted a few at a time by later failures
--   (`login_throttle_by_last_failure`), so the table holds about the keys that failed within
--   one window.
--
-- SQLite (one process, the default) never reads or writes this table: its limiter is in memory
-- only and a login costs no catalog work. The table is here so that both engines keep one
-- schema.
CREATE TABLE login_throttle (
    key              BLOB    NOT NULL PRIMARY KEY,
    failures         INTEGER NOT NULL CHECK (failures > 0),
    blocked_until_ms INTEGER NOT NULL,
    last_failure_ms  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX login_throttle_by_last_failure ON login_throttle(last_failure_ms);
