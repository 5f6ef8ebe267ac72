-- Pull-through cache size caps (schema version 17): when a cached manifest of a proxied
-- repository was last pulled from the cache, for least-recently-pulled eviction.

-- Unix seconds of the last GET or HEAD of the manifest (by tag or digest), or of a GET of one
-- of its config or layer blobs, served from the local copy; NULL: never since it was fetched
-- (the request that fetched it does not count: `created_at` is its fetch time). Only
-- proxied repositories' manifests are written, lazily and in batches, at most about once a
-- minute per manifest (see registry::proxy::lru).
ALTER TABLE manifests ADD COLUMN proxy_pulled_at INTEGER;
