//! The `pgrelay` command: parses the command line, sets up logging, and calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use pgrelay::config::{Config, ReplicationMode};
use pgrelay::demo::{self, DemoOptions};
use pgrelay::server::Server;

#[derive(Parser)]
#[command(
    name = "pgrelay",
    version,
    about = "PostgreSQL replication proxy: writes to the leader, reads to followers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local leader and followers from the installed Postgres binaries, and pgrelay in front of them.
    Demo {
        /// Replication mode: physical, row or statement.
        #[arg(long, default_value = "physical")]
        mode: String,
        /// Number of followers.
        #[arg(long, default_value_t = 2)]
        followers: usize,
        /// Address pgrelay listens on.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: SocketAddr,
        /// Directory for the servers' data and the generated pgrelay.toml (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Make the first follower lag by this much on purpose (e.g. 300ms), to watch lag and routing.
        #[arg(long, value_parser = humantime::parse_duration)]
        lag: Option<std::time::Duration>,
        /// Address of the Prometheus metrics endpoint; "" for none.
        #[arg(long, default_value = "127.0.0.1:9930")]
        metrics_listen: String,
    },
    /// Run against servers that already exist.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the node table of a running pgrelay (its console's SHOW NODES), found through the config file.
    Status {
        #[arg(long)]
        config: PathBuf,
        /// The console user (default: the first user with admin = true in the config).
        #[arg(long)]
        user: Option<String>,
    },
    /// Validate a config file and print the effective config, passwords masked.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            for warning in config.warnings() {
                println!("# warning: {warning}");
            }
            print!("{}", config.to_masked_toml());
            Ok(())
        }
        Command::Status { config, user } => {
            let config = Config::load(&config)?;
            let runtime = pgrelay::server::runtime(1).context("cannot start the async runtime")?;
            let table = runtime.block_on(pgrelay::status::node_table(&config, user.as_deref()))?;
            print!("{table}");
            Ok(())
        }
        Command::Run { config: path } => {
            let config = Config::load(&path)?;
            let runtime = pgrelay::server::runtime(config.proxy.worker_threads)
                .context("cannot start the async runtime")?;
            runtime.block_on(async {
                let server = Server::bind(config.clone())
                    .await
                    .with_context(|| format!("cannot listen on {}", config.proxy.listen))?;
                server.shared().control.set_config_path(&path);
                let stop = CancellationToken::new();
                tokio::spawn(demo::cancel_on_signal(stop.clone()));
                server.run(stop).await;
                Ok(())
            })
        }
        Command::Demo {
            mode,
            followers,
            listen,
            dir,
            lag,
            metrics_listen,
        } => {
            let mode = ReplicationMode::parse(&mode)?;
            let metrics_listen = match metrics_listen.as_str() {
                "" => None,
                text => Some(
                    text.parse()
                        .with_context(|| format!("--metrics-listen {text:?}"))?,
                ),
            };
            demo::run(DemoOptions {
                mode,
                followers,
                listen,
                dir,
                lag,
                metrics_listen,
            })?;
            Ok(())
        }
    }
}
