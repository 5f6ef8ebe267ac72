-- Credentials epoch (schema version 5).
-- Tokens signed in with a password carry their user's epoch; it is replaced by a new random
-- value whenever the password changes, and a re-created user gets a new one, so tokens issued
-- before stop being accepted. Users from before this migration keep 0 until their password
-- changes; tokens without the claim read as 0.
ALTER TABLE users ADD COLUMN credentials_epoch INTEGER NOT NULL DEFAULT 0;
