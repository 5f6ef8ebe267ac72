-- Stowage catalog, schema version 3: upload sessions that survive a restart.
-- One row per open upload session (`POST /v2/<name>/blobs/uploads/`), checkpointed as its data
-- becomes durable in the object store. After a restart a client asks for the session's status
-- and resumes from `offset`; the staged bytes past it, if any, are discarded.

CREATE TABLE uploads (
    id          TEXT    PRIMARY KEY,          -- session uuid, simple (32 hex digits) form
    repo        TEXT    NOT NULL,             -- the repository the session was opened in
    algorithm   TEXT    NOT NULL,             -- hash algorithm of hash_state ("sha256")
    offset      INTEGER NOT NULL CHECK (offset >= 0), -- bytes durably staged
    hash_state  BLOB    NOT NULL,             -- serialised hasher state after `offset` bytes
    staging     TEXT    NOT NULL,             -- the backend's staging state, JSON (storage::Staging)
    created_at  INTEGER NOT NULL,             -- unix seconds
    updated_at  INTEGER NOT NULL              -- last request or checkpoint; expiry counts from it
) STRICT;
CREATE INDEX uploads_by_updated ON uploads(updated_at);
