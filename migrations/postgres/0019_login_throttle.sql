-- SQLite 0019: the failed-login limiter's shared state (what each column means, and why times
-- are in milliseconds, is written there). This is the engine that uses it: every replica of
-- the catalog reads and writes it (`auth::limiter::shared`).
CREATE TABLE login_throttle (
    key              BYTEA  NOT NULL PRIMARY KEY,
    failures         BIGINT NOT NULL CHECK (failures > 0),
    blocked_until_ms BIGINT NOT NULL,
    last_failure_ms  BIGINT NOT NULL
);
-- SQLite's implicit suffix (the WITHOUT ROWID table's key) written out.
CREATE INDEX login_throttle_by_last_failure ON login_throttle(last_failure_ms, key);
