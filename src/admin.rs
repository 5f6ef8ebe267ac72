//! The admin run modes: `stowage user …`, `stowage token …`, `stowage key rotate`,
//! `stowage fsck`, `stowage spack prune --dry-run`.
//!
//! They work on the catalog and key directory of the configured data directory, beside a
//! running server or without one (SQLite takes the concurrent writer). Passwords are read from
//! a prompt with echo off, or from stdin's first line when stdin is not a terminal; never from
//! the command line. An API token's secret is printed once, on stdout; only its hash is kept.
//! The rules (names, passwords, scopes, expiry) and the changes are the accounts service's
//! (`auth::accounts`), which the web UI's admin pages call too.
//! Every user and token change is recorded in the audit trail with actor `cli` and the Unix
//! user who ran the command (`catalog::audit::Actor::cli`).
//!
//! `stowage fsck` reads every blob the catalog records, a few at a time ([`fsck`]'s `jobs`),
//! each streamed from the store and hashed on the blocking pool: the object must exist, have
//! the recorded size and hash to the digest. Verifying only reads, so it may run beside a live
//! server; a blob that looks missing is checked against the catalog again before it is reported,
//! since garbage collection may have removed it meanwhile. `--repair` takes the data
//! directory's lock (see `server::DataDirLock`: no server may run), moves each bad object to
//! `quarantine/` in the store (`BlobStore::quarantine`), and only then makes the catalog forget
//! the blob (`Catalog::forget_blob`): in that order, a crash in between leaves a catalog row
//! without an object, which the next run reports and forgets, never an unrecorded corrupt object
//! in `blobs/` that an upload of the same digest would trust. Objects that cannot be read (a
//! storage error, not a mismatch) are reported and left alone.
//!
//! Then it recounts the per-repository figures the catalog keeps for the web UI (tag count,
//! linked blob bytes, manifest bytes; `Catalog::check_repo_figures`) and reports each repository
//! whose kept figures differ; `--repair` sets them to the recount (`Catalog::repair_repo_figures`).
//! The same for the figures each Spack build cache's index is built from
//! (`Catalog::check_spack_figures`, `Catalog::repair_spack_figures`).

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use futures_util::StreamExt as _;

use crate::auth::accounts::{self, AccountError, Accounts, Caller, TokenStatus};
use crate::auth::password::Hasher;
use crate::auth::{Grant, keys};
use crate::catalog::Catalog;
use crate::cli::{KeyCommand, SpackCommand, TokenCommand, UserCommand};
use crate::config::Config;
use crate::oci::Digest;
use crate::storage::BlobStore;

type Outcome = Result<(), Box<dyn std::error::Error>>;

/// After the CLI changed users or API tokens: when a server runs on `data_dir`, waits until
/// it has certainly seen the change (its catalog reads the credentials generation every
/// [`crate::catalog::CHECKPOINT_EVERY`]), so that a revoked token or a removed user is refused
/// by the server from the moment the command returns.
pub async fn settle_credentials(data_dir: std::path::PathBuf) {
    let running = crate::metrics::spawn_blocking(move || crate::server::DataDirLock::held_elsewhere(&data_dir))
        .await
        .unwrap_or(true);
    if running {
        tokio::time::sleep(crate::catalog::CHECKPOINT_EVERY * 3).await;
    }
}

async fn open_catalog(config: &Config) -> Result<Catalog, Box<dyn std::error::Error>> {
    let config = config.clone();
    crate::metrics::spawn_blocking(move || crate::catalog::open_configured(&config, false))
        .await?
        .map_err(|e| e as Box<dyn std::error::Error>)
}

/// Reads a line from the terminal with echo off.
fn prompt_hidden(prompt: &str) -> std::io::Result<String> {
    let mut err = std::io::stderr();
    write!(err, "{prompt}")?;
    err.flush()?;
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain data; tcgetattr fills it or fails, and we restore what we read.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    let have_tty = unsafe { libc::tcgetattr(fd, &mut saved) } == 0;
    if have_tty {
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: as above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if have_tty {
        // SAFETY: restores the settings read above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    }
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// A new password: prompted twice on a terminal, else the first line of stdin; checked by
/// the accounts service's rule.
fn read_new_password() -> Result<String, Box<dyn std::error::Error>> {
    let (pw, again) = if std::io::stdin().is_terminal() {
        let a = prompt_hidden("Password: ")?;
        let b = prompt_hidden("Again: ")?;
        (a, Some(b))
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        (line.trim_end_matches(['\n', '\r']).to_owned(), None)
    };
    accounts::check_new_password(&pw, again.as_deref())?;
    Ok(pw)
}

/// The accounts service for the command line: a hasher of its own, one hash at a time.
fn accounts_of(catalog: &Catalog) -> Accounts {
    Accounts::new(catalog.clone(), Hasher::new(1, std::time::Duration::from_secs(60)))
}

/// A unix time as `YYYY-MM-DD HH:MM:SS` (UTC).
fn time(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Civil-from-days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

pub async fn user(cmd: UserCommand, config: impl Fn(&crate::cli::ServeArgs) -> Config) -> Outcome {
    let caller = Caller::cli();
    match cmd {
        UserCommand::Add { at, name, admin } => {
            if !accounts::valid_user_name(&name) {
                return Err(AccountError::InvalidUserName.into());
            }
            let catalog = open_catalog(&config(&at)).await?;
            let added = accounts_of(&catalog)
                .add_user(&caller, &name, read_new_password()?, admin)
                .await;
            catalog.close();
            match added {
                Err(AccountError::UserExists(_)) => {
                    return Err(format!("user {name} exists (use `stowage user passwd`)").into());
                }
                other => other?,
            }
            eprintln!("added user {name}{}", if admin { " (admin)" } else { "" });
        }
        UserCommand::Passwd { at, name } => {
            let catalog = open_catalog(&config(&at)).await?;
            let accounts = accounts_of(&catalog);
            if !accounts.user_exists(&name).await? {
                return Err(AccountError::NoUser(name).into());
            }
            let changed = accounts.set_password(&caller, &name, read_new_password()?).await;
            catalog.close();
            changed?;
            eprintln!("changed the password of {name}");
        }
        UserCommand::Admin { at, name, revoke } => {
            let catalog = open_catalog(&config(&at)).await?;
            let changed = accounts_of(&catalog).set_admin(&caller, &name, !revoke).await;
            catalog.close();
            changed?;
            if revoke {
                eprintln!("{name} is no longer an admin");
            } else {
                eprintln!("{name} is an admin");
            }
        }
        UserCommand::Remove { at, name } => {
            let catalog = open_catalog(&config(&at)).await?;
            let removed = accounts_of(&catalog).remove_user(&caller, &name).await;
            catalog.close();
            removed?;
            eprintln!("removed user {name} and their API tokens");
        }
        UserCommand::List { at } => {
            let catalog = open_catalog(&config(&at)).await?;
            let users = accounts_of(&catalog).users().await;
            catalog.close();
            println!("{:<24} {:<6} {:<20} TOKENS", "NAME", "ADMIN", "CREATED");
            for u in users? {
                println!(
                    "{:<24} {:<6} {:<20} {}",
                    u.name,
                    if u.admin { "yes" } else { "no" },
                    time(u.created_at),
                    u.live_tokens
                );
            }
        }
    }
    Ok(())
}

pub async fn token(cmd: TokenCommand, config: impl Fn(&crate::cli::ServeArgs) -> Config) -> Outcome {
    let caller = Caller::cli();
    match cmd {
        TokenCommand::Create {
            at,
            user,
            name,
            scopes,
            expires_in_days,
        } => {
            let catalog = open_catalog(&config(&at)).await?;
            let created = accounts_of(&catalog)
                .create_token(&caller, &user, &name, &scopes, expires_in_days)
                .await;
            catalog.close();
            let token = created?;
            let scopes: Vec<String> = token.grants.iter().map(Grant::to_string).collect();
            eprintln!(
                "created token {} ({name}) for {user}, scopes {}, {}; the secret is shown only now:",
                token.id,
                scopes.join(" "),
                token
                    .expires_at
                    .map_or("no expiry".to_owned(), |e| format!("expires {}", time(e)))
            );
            println!("{}", token.secret);
        }
        TokenCommand::List { at, user } => {
            let catalog = open_catalog(&config(&at)).await?;
            let tokens = accounts_of(&catalog).list_tokens(user.as_deref()).await;
            catalog.close();
            println!(
                "{:<6} {:<16} {:<20} {:<20} {:<20} {:<20} SCOPES",
                "ID", "USER", "NAME", "EXPIRES", "LAST USED", "STATUS"
            );
            let now = crate::catalog::now();
            for t in tokens? {
                let status = match TokenStatus::of(&t, now) {
                    TokenStatus::Revoked(r) => format!("revoked {}", time(r)),
                    other => other.as_str().to_owned(),
                };
                println!(
                    "{:<6} {:<16} {:<20} {:<20} {:<20} {:<20} {}",
                    t.id,
                    t.user,
                    t.name,
                    t.expires_at.map_or("never".into(), time),
                    t.last_used_at.map_or("never".into(), time),
                    status,
                    accounts::scopes_text(&t).join(" ")
                );
            }
        }
        TokenCommand::Revoke { at, token, user } => {
            let catalog = open_catalog(&config(&at)).await?;
            let revoked = accounts_of(&catalog)
                .revoke_token(&caller, user.as_deref(), &token)
                .await;
            catalog.close();
            match revoked {
                Err(AccountError::NoToken(_)) => {
                    return Err(format!("no single live token {token} (give its id, or --user)").into());
                }
                other => other?,
            }
            eprintln!("revoked token {token}");
        }
    }
    Ok(())
}

pub async fn key(cmd: KeyCommand, config: impl Fn(&crate::cli::ServeArgs) -> Config) -> Outcome {
    match cmd {
        KeyCommand::Rotate { at } => {
            let config = config(&at);
            if config.auth.signing_key.is_some() {
                return Err(
                    "auth.signing_key is set: rotate by pointing it at a new key and listing the old one in \
                            auth.verify_keys"
                        .into(),
                );
            }
            let dir = keys::key_dir(&config.data_dir);
            let now = jsonwebtoken::get_current_timestamp();
            let retain = config.auth.token_ttl_secs.max(config.auth.refresh_token_ttl_secs);
            let kid = keys::add_key(&dir, now).map_err(|e| e.to_string())?;
            let pruned = keys::prune(&dir, now, retain).map_err(|e| e.to_string())?;
            eprintln!(
                "new signing key {kid} in {}; restart the server to sign with it ({pruned} retired key(s) removed)",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Blobs listed from the catalog per query by `fsck`.
const FSCK_PAGE: usize = 500;

/// What `stowage fsck` found (and, with `--repair`, did).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsckReport {
    /// Blobs the catalog records that were checked.
    pub checked: u64,
    /// Bytes read and hashed.
    pub bytes: u64,
    /// Blobs without an object.
    pub missing: u64,
    /// Blobs whose object's size differs from the recorded size.
    pub wrong_size: u64,
    /// Blobs whose object's bytes hash to another digest.
    pub wrong_digest: u64,
    /// Blobs whose object could not be read (left alone).
    pub unreadable: u64,
    /// Objects moved to quarantine.
    pub quarantined: u64,
    /// Blobs the catalog forgot.
    pub forgotten: u64,
    /// Repairs that failed (the blob stays as it was).
    pub repair_failed: u64,
    /// Repositories whose figures were recounted.
    pub repositories: u64,
    /// Repositories whose kept figures differed from the recount.
    pub repo_figures_wrong: u64,
    /// Repositories whose figures were set to the recount.
    pub repo_figures_repaired: u64,
    /// Spack build caches whose index figures were recounted.
    pub spack_caches: u64,
    /// Spack build caches whose kept index figures differed from the recount.
    pub spack_figures_wrong: u64,
    /// Spack build caches whose index figures were set to the recount.
    pub spack_figures_repaired: u64,
}

impl FsckReport {
    /// Missing, wrong-size and wrong-digest blobs.
    pub fn bad(&self) -> u64 {
        self.missing + self.wrong_size + self.wrong_digest
    }

    /// Nothing bad and nothing unreadable.
    pub fn is_clean(&self) -> bool {
        self.bad() == 0
            && self.unreadable == 0
            && self.repair_failed == 0
            && self.repo_figures_wrong == 0
            && self.spack_figures_wrong == 0
    }
}

/// One blob's state.
enum Verdict {
    Good { size: u64 },
    Missing,
    WrongSize { stored: u64 },
    WrongDigest { size: u64, actual: Digest },
    Unreadable(String),
}

async fn check_blob(store: &BlobStore, digest: &str, recorded: u64) -> Verdict {
    let Ok(parsed) = digest.parse::<Digest>() else {
        return Verdict::Unreadable("the catalog records an invalid digest".into());
    };
    match store.hash_blob(&parsed).await {
        Ok(None) => Verdict::Missing,
        Ok(Some((size, _))) if size != recorded => Verdict::WrongSize { stored: size },
        Ok(Some((size, actual))) if actual != parsed => Verdict::WrongDigest { size, actual },
        Ok(Some((size, _))) => Verdict::Good { size },
        Err(e) => Verdict::Unreadable(e.to_string()),
    }
}

/// A composite blob's state: its pieces read back in order and hashed (see
/// `storage::composite`). A piece without an object makes it unreadable: the piece itself is
/// reported missing, and its repair forgets the composite with it.
async fn check_composite(catalog: &Catalog, store: &BlobStore, digest: &str, recorded: u64) -> Verdict {
    let Ok(parsed) = digest.parse::<Digest>() else {
        return Verdict::Unreadable("the catalog records an invalid digest".into());
    };
    let pieces = match catalog.blob_pieces(&parsed).await {
        Ok(p) => p,
        Err(e) => return Verdict::Unreadable(e.to_string()),
    };
    match crate::storage::composite::hash(store, &pieces, parsed.algorithm()).await {
        Ok((size, _)) if size != recorded => Verdict::WrongSize { stored: size },
        Ok((size, actual)) if actual != parsed => Verdict::WrongDigest { size, actual },
        Ok((size, _)) => Verdict::Good { size },
        Err(e) => Verdict::Unreadable(format!("a piece of this composite blob cannot be read: {e}")),
    }
}

/// Checks the blobs of one page (`(digest, recorded size, composite)`), `jobs` at a time,
/// printing each bad one; with `repair`, quarantines and forgets it.
async fn check_blobs(
    catalog: &Catalog,
    store: &BlobStore,
    page: Vec<(String, u64, bool)>,
    repair: bool,
    jobs: usize,
    report: &mut FsckReport,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut checks = futures_util::stream::iter(page)
        .map(|(digest, recorded, composite)| {
            let store = store.clone();
            async move {
                let verdict = if composite {
                    check_composite(catalog, &store, &digest, recorded).await
                } else {
                    check_blob(&store, &digest, recorded).await
                };
                (digest, recorded, verdict)
            }
        })
        .buffer_unordered(jobs.max(1));
    while let Some((digest, recorded, verdict)) = checks.next().await {
        report.checked += 1;
        let problem = match verdict {
            Verdict::Good { size } => {
                report.bytes += size;
                continue;
            }
            Verdict::Unreadable(e) => {
                // Forgotten since the listing: collected by a live server, or a composite
                // forgotten with the bad piece it was made of (a repair earlier in this run).
                if !catalog.blob_known(&digest).await? {
                    continue;
                }
                report.unreadable += 1;
                println!("{digest}: unreadable, left alone: {e}");
                continue;
            }
            Verdict::Missing => {
                // Garbage collection in a live server may have removed it since the listing.
                if !repair && !catalog.blob_known(&digest).await? {
                    continue;
                }
                report.missing += 1;
                "missing: no object in the store".to_owned()
            }
            Verdict::WrongSize { stored } => {
                report.bytes += stored;
                report.wrong_size += 1;
                format!("wrong size: {recorded} bytes recorded, {stored} stored")
            }
            Verdict::WrongDigest { size, actual } => {
                report.bytes += size;
                report.wrong_digest += 1;
                format!("wrong digest: the stored bytes hash to {actual}")
            }
        };
        println!("{digest}: {problem}");
        if repair {
            repair_blob(catalog, store, &digest, report).await;
        }
    }
    Ok(())
}

/// `stowage fsck`: verifies every blob the catalog records, `jobs` at a time, printing each bad
/// one and a summary on stdout; with `repair`, quarantines and forgets the bad ones (see the
/// module doc). Fails only when the check itself cannot run.
pub async fn fsck(config: &Config, repair: bool, jobs: usize) -> Result<FsckReport, Box<dyn std::error::Error>> {
    let _lock = if repair {
        let dir = config.data_dir.clone();
        Some(crate::metrics::spawn_blocking(move || crate::server::DataDirLock::acquire(&dir, "fsck")).await??)
    } else {
        None
    };
    let catalog = open_catalog(config).await?;
    let outcome = fsck_with(&catalog, config, repair, jobs).await;
    let closing = catalog.clone();
    crate::metrics::spawn_blocking(move || closing.close()).await?;
    outcome
}

async fn fsck_with(
    catalog: &Catalog,
    config: &Config,
    repair: bool,
    jobs: usize,
) -> Result<FsckReport, Box<dyn std::error::Error>> {
    let store = crate::server::open_store(config).await?;
    let started = std::time::Instant::now();
    let mut report = FsckReport::default();
    // Composite blobs (Spack indexes made of stored runs) are checked after every plain blob,
    // so that a damaged piece is reported and, with `repair`, forgotten with the composites
    // made of it before those are read.
    let mut composites = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = catalog.blobs_after(after.clone(), FSCK_PAGE).await?;
        let Some((last, _, _)) = page.last() else { break };
        after = Some(last.clone());
        let (deferred, plain): (Vec<_>, Vec<_>) = page.into_iter().partition(|(_, _, composite)| *composite);
        composites.extend(deferred);
        check_blobs(catalog, &store, plain, repair, jobs, &mut report).await?;
    }
    for page in composites.chunks(FSCK_PAGE) {
        check_blobs(catalog, &store, page.to_vec(), repair, jobs, &mut report).await?;
    }
    check_repo_figures(catalog, repair, &mut report).await?;
    check_spack_figures(catalog, repair, &mut report).await?;
    let repaired = if repair {
        format!(
            "; {} quarantined, {} forgotten, {} repairs failed",
            report.quarantined, report.forgotten, report.repair_failed
        )
    } else {
        String::new()
    };
    println!(
        "fsck: {} blobs, {} bytes checked in {:.1} s: {} bad ({} missing, {} wrong size, {} wrong digest), {} unreadable{repaired}",
        report.checked,
        report.bytes,
        started.elapsed().as_secs_f64(),
        report.bad(),
        report.missing,
        report.wrong_size,
        report.wrong_digest,
        report.unreadable,
    );
    if !repair && report.bad() > 0 {
        println!("fsck: stop the server and run `stowage fsck --repair` to quarantine the bad blobs");
    }
    println!(
        "fsck: {} repositories' figures recounted: {} wrong{}",
        report.repositories,
        report.repo_figures_wrong,
        if repair {
            format!(", {} repaired", report.repo_figures_repaired)
        } else if report.repo_figures_wrong > 0 {
            "; stop the server and run `stowage fsck --repair` to set them to the recount".to_owned()
        } else {
            String::new()
        }
    );
    println!(
        "fsck: {} Spack build caches' index figures recounted: {} wrong{}",
        report.spack_caches,
        report.spack_figures_wrong,
        if repair {
            format!(", {} repaired", report.spack_figures_repaired)
        } else if report.spack_figures_wrong > 0 {
            "; stop the server and run `stowage fsck --repair` to set them to the recount".to_owned()
        } else {
            String::new()
        }
    );
    Ok(report)
}

/// Recounts every Spack build cache's index figures (see `catalog::fsck`), printing each cache
/// whose kept figures differ; with `repair`, sets them to the recount.
async fn check_spack_figures(
    catalog: &Catalog,
    repair: bool,
    report: &mut FsckReport,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut after = 0;
    loop {
        let page = catalog.check_spack_figures(after, FSCK_PAGE).await?;
        report.spack_caches += page.checked;
        for m in page.mismatches {
            report.spack_figures_wrong += 1;
            println!(
                "spack cache {}: {} nodes' index figures differ from the recount; specs kept {} ({} of layout < 3), recounted {} ({})",
                m.repo, m.nodes_wrong, m.specs_kept.0, m.specs_kept.1, m.specs_counted.0, m.specs_counted.1
            );
            if repair {
                match catalog.repair_spack_figures(&m.repo).await {
                    Ok(Some(_)) => {
                        report.spack_figures_repaired += 1;
                        println!("spack cache {}: index figures set to the recount", m.repo);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        report.repair_failed += 1;
                        println!("spack cache {}: repairing its index figures failed: {e}", m.repo);
                    }
                }
            }
        }
        match page.next {
            Some(next) => after = next,
            None => return Ok(()),
        }
    }
}

/// Recounts every repository's kept figures (see the module doc), printing each that differs;
/// with `repair`, sets them to the recount.
async fn check_repo_figures(
    catalog: &Catalog,
    repair: bool,
    report: &mut FsckReport,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut after = 0;
    loop {
        let page = catalog.check_repo_figures(after, FSCK_PAGE).await?;
        report.repositories += page.checked;
        for m in page.mismatches {
            report.repo_figures_wrong += 1;
            let (k, c) = (m.kept, m.counted);
            println!(
                "repository {}: figures kept {} tags, {} blob bytes, {} manifest bytes; recounted {} tags, {} blob bytes, {} manifest bytes",
                m.repo, k.tags, k.blob_bytes, k.manifest_bytes, c.tags, c.blob_bytes, c.manifest_bytes
            );
            if repair {
                match catalog.repair_repo_figures(&m.repo).await {
                    Ok(Some(_)) => {
                        report.repo_figures_repaired += 1;
                        println!("repository {}: figures set to the recount", m.repo);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        report.repair_failed += 1;
                        println!("repository {}: repairing its figures failed: {e}", m.repo);
                    }
                }
            }
        }
        match page.next {
            Some(next) => after = next,
            None => return Ok(()),
        }
    }
}

/// Quarantines blob `digest`'s object, then makes the catalog forget the blob (this order: see
/// the module doc).
async fn repair_blob(catalog: &Catalog, store: &BlobStore, digest: &str, report: &mut FsckReport) {
    if let Ok(parsed) = digest.parse::<Digest>() {
        match store.quarantine(&parsed, crate::catalog::now()).await {
            Ok(Some(to)) => {
                report.quarantined += 1;
                println!("{digest}: quarantined to {to}");
            }
            Ok(None) => {}
            Err(e) => {
                report.repair_failed += 1;
                println!("{digest}: quarantining failed, left as it was: {e}");
                return;
            }
        }
    }
    match catalog.forget_blob(digest).await {
        Ok(Some(links)) => {
            report.forgotten += 1;
            println!("{digest}: forgotten by the catalog (was linked to {links} repositories); push it again");
        }
        Ok(None) => {}
        Err(e) => {
            report.repair_failed += 1;
            println!("{digest}: forgetting it failed: {e}");
        }
    }
}

/// `stowage spack prune --dry-run`: prints what the retention rules would delete (see
/// `registry::retention`); reads only.
pub async fn spack(cmd: SpackCommand, config: impl Fn(&crate::cli::ServeArgs) -> Config) -> Outcome {
    use crate::registry::retention::{Mode, plan};
    match cmd {
        SpackCommand::Prune { at, dry_run: _, repo } => {
            let config = config(&at);
            let repo = repo
                .map(|r| r.parse::<crate::oci::RepoName>())
                .transpose()
                .map_err(|_| "--repo is not a valid repository name")?;
            if config.gc.retention.is_empty() {
                eprintln!("no retention rules are configured ([[gc.retention]]): nothing would be deleted");
                return Ok(());
            }
            if let Some(repo) = &repo
                && crate::registry::retention::rule_for(&config.gc.retention, repo.as_str()).is_none()
            {
                eprintln!("no retention rule matches {repo}: nothing would be deleted there");
                return Ok(());
            }
            let catalog = open_catalog(&config).await?;
            let mut out = std::io::stdout().lock();
            let mut failed = None;
            let immutable = crate::auth::ImmutableTags::new(config.immutable_tags.clone());
            let report = plan(
                &catalog,
                &config.gc.retention,
                &immutable,
                repo.as_ref(),
                Mode::Preview,
                |r| {
                    if failed.is_none()
                        && let Err(e) = writeln!(out, "{}\t{}\t{}\trule {}: {}", r.repo, r.tag, r.digest, r.rule, r.why)
                    {
                        failed = Some(e);
                    }
                },
            )
            .await;
            drop(out);
            let closing = catalog.clone();
            crate::metrics::spawn_blocking(move || closing.close()).await?;
            if let Some(e) = failed {
                return Err(e.into());
            }
            eprintln!("{} tag(s) would be deleted", report?.would_delete);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_times() {
        assert_eq!(super::time(0), "1970-01-01 00:00:00");
        assert_eq!(super::time(1_700_000_000), "2023-11-14 22:13:20");
    }
}
