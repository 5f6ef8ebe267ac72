-- Credentials generation (schema version 11).
-- One counter that every change to who may sign in, or with what, moves forward: a user
-- added, changed (password, admin role) or removed; an API token added, revoked, re-scoped,
-- given another expiry or removed. Recording an API token's last use does not move it.
-- Servers cache verified tokens and identities tagged with the value they saw, and drop
-- every entry tagged with an older one (auth::cache); triggers keep it, so every writer
-- (the server, the CLI, another replica) moves it in the transaction that makes the change.
CREATE TABLE auth_epoch (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
) STRICT;
INSERT INTO auth_epoch (id, value) VALUES (1, 0);

CREATE TRIGGER users_added_auth_epoch AFTER INSERT ON users BEGIN
    UPDATE auth_epoch SET value = value + 1 WHERE id = 1;
END;
CREATE TRIGGER users_changed_auth_epoch AFTER UPDATE ON users BEGIN
    UPDATE auth_epoch SET value = value + 1 WHERE id = 1;
END;
CREATE TRIGGER users_removed_auth_epoch AFTER DELETE ON users BEGIN
    UPDATE auth_epoch SET value = value + 1 WHERE id = 1;
END;
CREATE TRIGGER api_tokens_added_auth_epoch AFTER INSERT ON api_tokens BEGIN
    UPDATE auth_epoch SET value = value + 1 WHERE id = 1;
END;
CREATE TRIGGER api_tokens_changed_auth_epoch
    AFTER UPDATE OF user_id, name, secret_hash, scopes, expires_at, revoked_at ON api_tokens BEGIN
    UPDATE auth_epoch SET value = value + 1 WHERE id = 1;
END;
CREATE TRIGGER api_tokens_removed_auth_epoch AFTER DELETE ON api_tokens BEGIN
    UPDATE auth_epoch SET value = value + 1 WHERE id = 1;
END;
