-- Stowage catalog, schema version 7: who opened each upload session.
-- Only that identity may continue a session; after a restart the owner comes from here. NULL:
-- the session was opened without authentication (or before this version), usable by anyone
-- who may push to its repository.

ALTER TABLE uploads ADD COLUMN owner TEXT;
