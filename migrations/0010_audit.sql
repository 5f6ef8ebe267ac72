-- Audit trail (schema version 10): who changed what, and which policy refusals happened.
-- A change is recorded in the same transaction as the change itself (a rolled-back push leaves
-- no row); refusals arrive in batches from a bounded in-memory queue (see src/catalog/audit.rs).
-- Rows are never updated; they are deleted only when older than `audit.retention_days`.

CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY,
    -- Unix seconds.
    at          INTEGER NOT NULL,
    -- `manifest.push`, `tag.delete`, `token.revoke`, `denied.push`, `login.failed`, …
    action      TEXT NOT NULL,
    repository  TEXT,
    tag         TEXT,
    digest      TEXT,
    -- A user name, `anonymous`, or a system actor (`gc`, `retention`, `cli`).
    actor       TEXT NOT NULL,
    -- The API token the actor used, if any (its name copied: tokens are revoked, not kept).
    token_id    INTEGER,
    token_name  TEXT,
    -- Client address, as the server resolved it (trusted proxies honoured).
    client      TEXT,
    request_id  TEXT,
    -- A small JSON object with what else matters for the action; never a secret.
    detail      TEXT
) STRICT;

CREATE INDEX audit_log_by_at ON audit_log (at);
CREATE INDEX audit_log_by_repository ON audit_log (repository, id);
CREATE INDEX audit_log_by_actor ON audit_log (actor, id);
