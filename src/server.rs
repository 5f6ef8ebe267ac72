//! Start-up and shutdown of `stowage serve`.

use std::time::Duration;

use actix_web::{App, HttpServer, middleware, web};

use crate::catalog::Catalog;
use crate::config::{Backend, Config};
use crate::registry::{Registry, Settings};
use crate::storage::BlobStore;

/// How often idle upload sessions are looked for.
const EXPIRY_SWEEP: Duration = Duration::from_secs(60);

/// Opens the catalog and the blob store described by `config`.
pub async fn open(config: &Config) -> Result<Registry, Box<dyn std::error::Error>> {
    let catalog_path = config.catalog_path();
    let catalog = tokio::task::spawn_blocking(move || Catalog::open(&catalog_path)).await??;
    let store = match config.storage.backend {
        Backend::Fs => {
            let path = config.storage_path();
            let part_size = config.storage.part_size;
            tokio::task::spawn_blocking(move || BlobStore::local(path, part_size)).await??
        }
    };
    let stale = store.discard_all_uploads().await?;
    if stale > 0 {
        tracing::info!(count = stale, "removed upload data left by a previous run");
    }
    let settings = Settings {
        delete_enabled: config.registry.delete_enabled,
        max_manifest_size: config.registry.max_manifest_size,
        upload_timeout: Duration::from_secs(config.registry.upload_timeout_secs),
        catalog_page_size: config.registry.catalog_page_size,
    };
    Ok(Registry::new(catalog, store, settings))
}

/// Serves until SIGINT/SIGTERM, then finishes in-flight requests and closes the catalog.
pub async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let registry = open(&config).await?;
    tracing::info!(
        data_dir = %config.data_dir.display(),
        storage = %config.storage_path().display(),
        delete_enabled = config.registry.delete_enabled,
        "registry opened"
    );

    let sweeper = {
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXPIRY_SWEEP);
            loop {
                tick.tick().await;
                registry.expire_uploads().await;
            }
        })
    };

    let data = web::Data::new(registry.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .wrap(middleware::from_fn(crate::http::log_requests))
            .wrap(crate::http::default_headers())
            .configure(crate::http::routes)
    })
    .shutdown_timeout(30)
    .bind(config.listen)?;
    for addr in server.addrs() {
        println!("stowage listening on http://{addr}");
        tracing::info!(%addr, "listening");
    }
    server.run().await?;

    sweeper.abort();
    let catalog = registry.catalog().clone();
    tokio::task::spawn_blocking(move || catalog.close()).await?;
    tracing::info!("stopped");
    Ok(())
}
