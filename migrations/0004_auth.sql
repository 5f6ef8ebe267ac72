-- Users and API tokens (schema version 4).
-- Passwords are argon2id PHC strings; API token secrets are stored only as their SHA-256.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    admin         INTEGER NOT NULL DEFAULT 0 CHECK (admin IN (0, 1)),
    created_at    INTEGER NOT NULL,             -- unix seconds
    updated_at    INTEGER NOT NULL
) STRICT;

CREATE TABLE api_tokens (
    id            INTEGER PRIMARY KEY,
    user_id       INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name          TEXT    NOT NULL,
    secret_hash   TEXT    NOT NULL UNIQUE,      -- hex SHA-256 of the secret
    scopes        TEXT    NOT NULL,             -- JSON: [{"repositories":"spack/**","actions":["pull"]}]
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER,                      -- NULL: never
    last_used_at  INTEGER,
    revoked_at    INTEGER
) STRICT;
-- A name is unique among a user's live tokens; revoked ones stay listed.
CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens(user_id, name) WHERE revoked_at IS NULL;
CREATE INDEX api_tokens_by_user ON api_tokens(user_id);
