use clap::Parser;
use stowage::cli::{Cli, Command, ServeArgs};
use stowage::config::{CliOverrides, Config, LogFormat};

fn load(args: &ServeArgs) -> Config {
    let cli = CliOverrides {
        listen: args.listen,
        data_dir: args.data_dir.clone(),
    };
    match Config::load(args.config.as_deref(), cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stowage: invalid configuration: {e}");
            std::process::exit(2);
        }
    }
}

fn init_tracing(format: LogFormat) {
    stowage::logging::init(format);
}

/// Makes glibc serve allocations of 1 MiB and more with `mmap`, so the part buffers uploads
/// stream through are returned to the system when freed. By default glibc raises this threshold
/// dynamically up to 32 MiB after the first large free, and then keeps freed 8 MiB parts in its
/// heap: peak memory grew with every upload in flight instead of staying at a few parts each.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called once, before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Passes `config` on, noting its data directory.
fn noting_data_dir(config: Config, noted: &std::sync::Mutex<Option<std::path::PathBuf>>) -> Config {
    if let Ok(mut n) = noted.lock() {
        *n = Some(config.data_dir.clone());
    }
    config
}

/// After a user or token command that succeeded: lets a running server see the change first.
async fn settle(succeeded: bool, data_dir: std::sync::Mutex<Option<std::path::PathBuf>>) {
    if let Some(dir) = data_dir.into_inner().ok().flatten().filter(|_| succeeded) {
        stowage::admin::settle_credentials(dir).await;
    }
}

/// Ends an admin command: errors on stderr, exit status 1.
fn admin_exit(outcome: Result<(), Box<dyn std::error::Error>>) {
    if let Err(e) = outcome {
        stowage::logging::flush();
        eprintln!("stowage: {e}");
        std::process::exit(1);
    }
}

#[actix_web::main]
async fn main() {
    tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = load(&args);
            init_tracing(config.log.format);
            let served = stowage::server::serve(config).await;
            if let Err(e) = &served {
                tracing::error!(error = %e, "stowage failed");
            }
            stowage::logging::flush();
            if let Err(e) = served {
                eprintln!("stowage: {e}");
                std::process::exit(1);
            }
        }
        Command::User(cmd) => {
            let data_dir = std::sync::Mutex::new(None);
            let outcome = stowage::admin::user(cmd, |at| noting_data_dir(load(at), &data_dir)).await;
            settle(outcome.is_ok(), data_dir).await;
            admin_exit(outcome);
        }
        Command::Token(cmd) => {
            let data_dir = std::sync::Mutex::new(None);
            let outcome = stowage::admin::token(cmd, |at| noting_data_dir(load(at), &data_dir)).await;
            settle(outcome.is_ok(), data_dir).await;
            admin_exit(outcome);
        }
        Command::Key(cmd) => admin_exit(stowage::admin::key(cmd, load).await),
        Command::Spack(cmd) => admin_exit(stowage::admin::spack(cmd, load).await),
        Command::Fsck(args) => {
            let config = load(&args.at);
            init_tracing(config.log.format);
            let checked = stowage::admin::fsck(&config, args.repair, usize::from(args.jobs)).await;
            stowage::logging::flush();
            match checked {
                Ok(report) if report.is_clean() => {}
                Ok(_) => std::process::exit(1),
                Err(e) => {
                    eprintln!("stowage: {e}");
                    std::process::exit(2);
                }
            }
        }
        Command::Audit(args) => {
            let config = load(&args.at);
            admin_exit(stowage::runmodes::audit(args, &config).await);
        }
        Command::Migrate(args) => {
            let config = load(&args);
            init_tracing(config.log.format);
            admin_exit(stowage::runmodes::migrate(&config).await);
        }
        Command::Gc(args) => {
            let config = load(&args.at);
            init_tracing(config.log.format);
            admin_exit(stowage::runmodes::gc(args, &config).await);
        }
        Command::Healthcheck(args) => healthcheck(&args),
        Command::CheckConfig(args) => match toml::to_string(&load(&args)) {
            Ok(s) => print!("{s}"),
            Err(e) => {
                eprintln!("stowage: {e}");
                std::process::exit(1);
            }
        },
    }
    stowage::logging::flush();
}

/// `stowage healthcheck`: exit 0 when the server answers 2xx, 1 otherwise.
fn healthcheck(args: &stowage::cli::HealthcheckArgs) {
    use stowage::healthcheck::{Target, check};
    let target = match &args.url {
        Some(url) => Target::parse(url),
        // Exit 1, not 2, on a bad configuration too: Docker reserves status 2 of a health check.
        None => {
            let cli = CliOverrides {
                listen: args.at.listen,
                data_dir: args.at.data_dir.clone(),
            };
            Config::load(args.at.config.as_deref(), cli)
                .map(|c| Target::for_config(&c))
                .map_err(|e| format!("invalid configuration: {e}"))
        }
    };
    let outcome = target
        .and_then(|t| check(&t, std::time::Duration::from_secs(args.timeout_secs)).map(|status| (t.url(), status)));
    match outcome {
        Ok((_, status)) if (200..300).contains(&status) => {}
        Ok((url, status)) => {
            eprintln!("stowage healthcheck: {url} answered {status}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("stowage healthcheck: {e}");
            std::process::exit(1);
        }
    }
}
