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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[actix_web::main]
async fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = load(&args);
            init_tracing(config.log.format);
            if let Err(e) = stowage::server::serve(config).await {
                tracing::error!(error = %e, "stowage failed");
                eprintln!("stowage: {e}");
                std::process::exit(1);
            }
        }
        Command::CheckConfig(args) => match toml::to_string(&load(&args)) {
            Ok(s) => print!("{s}"),
            Err(e) => {
                eprintln!("stowage: {e}");
                std::process::exit(1);
            }
        },
    }
}
