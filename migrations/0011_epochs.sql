-- Generations of what servers cache (schema version 11): credentials, and manifests by tag
-- and by digest.
--
-- Credentials.
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

-- Manifests and tags. One counter that every change of what a manifest lookup (by tag or by
-- digest) answers moves forward: a tag added, moved or deleted; a manifest added, changed or
-- deleted (the collector's bookkeeping column, touched_at, does not count). Servers cache
-- lookups tagged with the value they saw (registry::manifest_cache), exactly as above.
CREATE TABLE content_epoch (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
) STRICT;
INSERT INTO content_epoch (id, value) VALUES (1, 0);

CREATE TRIGGER tags_added_content_epoch AFTER INSERT ON tags BEGIN
    UPDATE content_epoch SET value = value + 1 WHERE id = 1;
END;
CREATE TRIGGER tags_changed_content_epoch AFTER UPDATE OF repo_id, name, manifest_id ON tags BEGIN
    UPDATE content_epoch SET value = value + 1 WHERE id = 1;
END;
CREATE TRIGGER tags_removed_content_epoch AFTER DELETE ON tags BEGIN
    UPDATE content_epoch SET value = value + 1 WHERE id = 1;
END;
CREATE TRIGGER manifests_added_content_epoch AFTER INSERT ON manifests BEGIN
    UPDATE content_epoch SET value = value + 1 WHERE id = 1;
END;
CREATE TRIGGER manifests_changed_content_epoch
    AFTER UPDATE OF repo_id, digest, media_type, size, content ON manifests BEGIN
    UPDATE content_epoch SET value = value + 1 WHERE id = 1;
END;
CREATE TRIGGER manifests_removed_content_epoch AFTER DELETE ON manifests BEGIN
    UPDATE content_epoch SET value = value + 1 WHERE id = 1;
END;
