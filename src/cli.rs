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
    /// redirect_expiry_secs,public_endpoint,max_copy_size},
    /// registry.{delete_enabled,max_manifest_size,upload_timeout_secs,catalog_page_size},
    /// auth.{enabled,anonymous_pull,rules,…}, gc.{enabled,interval_secs,grace_secs,
    /// keep_list_max_secs,retention},
    /// log.format. See stowage.example.toml for every setting with its default.
    Serve(ServeArgs),
    /// Print the configuration that `serve` would use, then exit.
    CheckConfig(ServeArgs),
    /// Manage users (passwords are read from a prompt, or from stdin when it is not a terminal).
    #[command(subcommand)]
    User(UserCommand),
    /// Manage API tokens (robot/CI credentials, used as the password).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage the keys that sign registry tokens.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Verify every stored blob: its object exists, has the recorded size and hashes to its
    /// digest. Prints each bad blob and a summary; exits 1 when any is bad.
    ///
    /// Verifying may run beside a live server. With --repair, each bad blob's object is moved
    /// to quarantine/<algorithm>/<hex>.<unix time> in the store and the catalog forgets the
    /// blob, so that its next push stores fresh bytes; --repair needs the server stopped.
    Fsck(FsckArgs),
    /// Spack build cache maintenance.
    #[command(subcommand)]
    Spack(SpackCommand),
    /// Print the audit trail, newest first: who pushed, deleted, or changed users and tokens,
    /// and the refused pushes, deletes and logins. One tab-separated line per row (time,
    /// action, actor, token, client, repository:tag@digest, request id, detail), or JSON lines
    /// with --json. Only reads the catalog: safe beside a running server.
    Audit(AuditArgs),
    /// Apply pending catalog migrations, print each, and exit. Needs the server stopped (it
    /// takes the data directory's lock); `serve` also applies them when it starts.
    Migrate(ServeArgs),
    /// Run one garbage collection pass (retention, unneeded manifests and blobs, orphaned
    /// objects, superseded Spack index blobs) with the server's own collector, printing one
    /// line per item removed. Needs the server stopped; with --dry-run, nothing is deleted,
    /// the server may run, and the lines are what a real pass would remove.
    Gc(GcArgs),
    /// GET the server's /livez (or --url) and exit 0 on a 2xx answer, 1 otherwise: the
    /// container image's HEALTHCHECK, which has no curl. Without --url, the address comes from
    /// the same configuration as `serve` (0.0.0.0 and :: become loopback; https with [tls], the
    /// certificate not verified).
    Healthcheck(HealthcheckArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct HealthcheckArgs {
    #[command(flatten)]
    pub at: ServeArgs,
    /// The URL to GET, e.g. http://127.0.0.1:5000/livez.
    #[arg(long)]
    pub url: Option<String>,
    /// Seconds the whole check may take.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub at: ServeArgs,
    /// Only this repository.
    #[arg(long)]
    pub repo: Option<String>,
    /// Only this actor (a user name, `anonymous`, `cli`, `gc`, `retention`).
    #[arg(long)]
    pub user: Option<String>,
    /// Only rows from this time on: RFC 3339 (2026-11-30T12:00:00Z) or a period back from now
    /// (24h, 7d, 90m).
    #[arg(long)]
    pub since: Option<String>,
    /// Most rows printed.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub limit: u64,
    /// One JSON object per line, as `GET /stowage/v1/audit` gives them.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub at: ServeArgs,
    /// List what a pass would remove, deleting nothing (safe beside a running server).
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Subcommand)]
pub enum SpackCommand {
    /// Show what the configured retention rules (`[[gc.retention]]`) would delete now: one line
    /// per tag, `<repository> TAB <tag> TAB <digest> TAB <rule and reason>`, then a count on
    /// stderr. Evaluated by the same code as the collector, honouring live Spack keep-lists.
    /// Only reads the catalog: safe beside a running server. Pulls the server recorded in the
    /// last minute may not be written yet, so a tag pulled just now can be listed and then kept.
    Prune {
        #[command(flatten)]
        at: ServeArgs,
        /// Only show, delete nothing (required: deletion is the collector's job).
        #[arg(long, required = true)]
        dry_run: bool,
        /// Only this repository.
        #[arg(long)]
        repo: Option<String>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct FsckArgs {
    #[command(flatten)]
    pub at: ServeArgs,
    /// Quarantine each bad blob's object and make the catalog forget the blob (the server must
    /// be stopped: this takes the data directory's lock).
    #[arg(long)]
    pub repair: bool,
    /// Blobs verified at once (each reads its object in pieces of about 1 MiB).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user.
    Add {
        #[command(flatten)]
        at: ServeArgs,
        name: String,
        /// Make the user an admin (may do everything, deleting included).
        #[arg(long)]
        admin: bool,
    },
    /// Change a user's password.
    Passwd {
        #[command(flatten)]
        at: ServeArgs,
        name: String,
    },
    /// Make a user an admin, or (with --revoke) an ordinary user again. Takes effect at once,
    /// for the user's API tokens and registry tokens too.
    Admin {
        #[command(flatten)]
        at: ServeArgs,
        name: String,
        /// Take the admin role away instead.
        #[arg(long)]
        revoke: bool,
    },
    /// Remove a user and their API tokens.
    Remove {
        #[command(flatten)]
        at: ServeArgs,
        name: String,
    },
    /// List users.
    List {
        #[command(flatten)]
        at: ServeArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token for a user and print its secret (shown this once only).
    Create {
        #[command(flatten)]
        at: ServeArgs,
        /// The user the token acts for.
        #[arg(long)]
        user: String,
        /// A name for the token, unique among the user's live tokens.
        #[arg(long)]
        name: String,
        /// What the token may do: `<repository pattern>:<actions>`, e.g. `spack/**:pull,push`.
        /// Actions: pull, push, delete, overwrite (move or delete immutable tags), `*` for all.
        /// Repeatable. The user's own permissions still apply.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Days until the token expires (default: never).
        #[arg(long)]
        expires_in_days: Option<u64>,
    },
    /// List API tokens (never their secrets).
    List {
        #[command(flatten)]
        at: ServeArgs,
        /// Only this user's tokens.
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke an API token, by id or name; effective at once.
    Revoke {
        #[command(flatten)]
        at: ServeArgs,
        /// The token's id or name.
        token: String,
        /// The user whose token it is (needed when several users have tokens of that name).
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Add a new signing key in `<data_dir>/auth/keys/`; the server signs with it after its next
    /// start, and still accepts tokens signed with the previous keys until they expire.
    Rotate {
        #[command(flatten)]
        at: ServeArgs,
    },
}

#[derive(Debug, Clone, clap::Args)]
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
