//! Command line: run modes of the one `stowage` binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Stowage: an OCI registry built to be a package manager's binary cache.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the registry.
    ///
    /// Every setting has a default; a TOML file and STOWAGE_* environment variables override
    /// them (nested keys joined by "__", e.g. STOWAGE_REGISTRY__DELETE_ENABLED=false), and the
    /// flags below override both. Settings: listen, data_dir, storage.{backend,path,part_size},
    /// storage.s3.{bucket,prefix,region,endpoint,path_style,credentials_file,profile,redirect,
    /// redirect_expiry_secs,public_endpoint},
    /// registry.{delete_enabled,max_manifest_size,upload_timeout_secs,catalog_page_size},
    /// log.format. See stowage.example.toml for every setting with its default.
    Serve(ServeArgs),
    /// Print the configuration that `serve` would use, then exit.
    CheckConfig(ServeArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "STOWAGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:5000].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Data directory [default: ./stowage-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}
