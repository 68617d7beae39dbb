//! `pgrelay demo`: a local leader and followers started from the installed Postgres binaries,
//! pgrelay in front of them, and the config it runs with written next to the servers, so
//! `pgrelay run --config DIR/pgrelay.toml` reproduces it.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::backend::BackendConn;
use crate::cluster::{ClusterError, ClusterOptions, FollowerKind, LocalCluster};
use crate::config::{Config, ConfigError, NodeConfig, ReplicationMode, Role};
use crate::server::Server;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub mode: ReplicationMode,
    pub followers: usize,
    pub listen: SocketAddr,
    pub dir: Option<PathBuf>,
    /// Make the first follower lag by this much on purpose.
    pub lag: Option<std::time::Duration>,
    /// Where to serve `/metrics` (None: nowhere).
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot prepare the demo database: {0}")]
    Setup(String),
}

/// The role and database the demo creates for applications.
pub const DEMO_USER: &str = "app";
pub const DEMO_PASSWORD: &str = "app";
pub const DEMO_DATABASE: &str = "app";
/// The cluster's superuser (also used for replication).
pub const DEMO_SUPERUSER: &str = "relay_admin";

/// Starts the demo and serves until Ctrl-C or SIGTERM; then stops pgrelay and the servers.
pub fn run(opts: DemoOptions) -> Result<(), DemoError> {
    if opts.mode != ReplicationMode::Physical && opts.lag.is_some() {
        return Err(DemoError::Setup(
            "--lag delays a streaming standby's replay, so it needs --mode physical".to_owned(),
        ));
    }
    let follower_kind = match opts.mode {
        ReplicationMode::Physical => FollowerKind::Standby,
        // Empty writable servers: pgrelay copies the leader onto them and applies changes.
        _ => FollowerKind::Empty,
    };
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("pgrelay-demo-{}", std::process::id())),
    };
    let superuser_password = format!("{:x}", rand::random::<u64>());
    println!(
        "starting a leader and {} followers in {} ...",
        opts.followers,
        dir.display()
    );
    let cluster = LocalCluster::start(ClusterOptions {
        dir: dir.clone(),
        followers: opts.followers,
        superuser: DEMO_SUPERUSER.to_owned(),
        password: superuser_password.clone(),
        follower_kind,
        extra_conf: Vec::new(),
        remove_dir_on_drop: false,
    })?;
    if let (Some(lag), Some(first)) = (opts.lag, cluster.followers().first()) {
        // A standby applies WAL only once it is this old: a follower that lags on purpose.
        cluster.set_setting(
            &first.name,
            "recovery_min_apply_delay",
            &format!("{}ms", lag.as_millis()),
        )?;
    }
    let runtime = crate::server::runtime(crate::config::DEFAULT_WORKER_THREADS)?;
    let result = runtime.block_on(serve(&opts, &cluster, &dir, &superuser_password));
    drop(runtime);
    let mut cluster = cluster;
    cluster.shutdown();
    println!("stopped; the servers' data stays in {}", dir.display());
    result
}

/// The config the demo runs with.
pub fn demo_config_text(
    opts: &DemoOptions,
    cluster: &LocalCluster,
    superuser_password: &str,
) -> String {
    let metrics = opts
        .metrics_listen
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut text = format!(
        "# Written by `pgrelay demo`; run it again with `pgrelay run --config <this file>`.\n\
         [proxy]\nlisten = \"{}\"\n\n[replication]\nmode = \"{}\"\nuser = \"{DEMO_SUPERUSER}\"\n\n[routing]\nconsistency = \"session\"\n\n\
         [metrics]\nlisten = \"{metrics}\"\n\n",
        opts.listen,
        opts.mode.name()
    );
    let mut node = |name: &str, role: &str, host: &str, port: u16| {
        text.push_str(&format!(
            "[[nodes]]\nname = \"{name}\"\nrole = \"{role}\"\nhost = \"{host}\"\nport = {port}\n\n"
        ));
    };
    let leader = cluster.leader();
    node(&leader.name, "leader", &leader.host, leader.port);
    for f in cluster.followers() {
        node(&f.name, "follower", &f.host, f.port);
    }
    text.push_str(&format!(
        "[[users]]\nname = \"{DEMO_USER}\"\npassword = \"{DEMO_PASSWORD}\"\n\n\
         [[users]]\nname = \"{DEMO_SUPERUSER}\"\npassword = \"{superuser_password}\"\nadmin = true\n"
    ));
    text
}

async fn serve(
    opts: &DemoOptions,
    cluster: &LocalCluster,
    dir: &std::path::Path,
    superuser_password: &str,
) -> Result<(), DemoError> {
    let leader = cluster.leader();
    let node_config = |n: &crate::cluster::NodeInfo, role| NodeConfig {
        name: n.name.clone(),
        role,
        host: n.host.clone(),
        port: n.port,
    };
    create_demo_database(&node_config(leader, Role::Leader), superuser_password, true).await?;
    for f in cluster.followers() {
        if opts.mode == ReplicationMode::Physical {
            wait_for_database(f, superuser_password).await?;
        } else {
            // Roles live outside databases: row mode copies databases, so the application's
            // role is created on each follower too. pgrelay copies the database itself.
            create_demo_database(&node_config(f, Role::Follower), superuser_password, false)
                .await?;
        }
    }
    let text = demo_config_text(opts, cluster, superuser_password);
    let config_path = dir.join("pgrelay.toml");
    write_private(&config_path, &text)?;
    let config = Config::parse(&text)?;
    let server = Server::bind(config).await?;
    // SIGHUP and the console's RELOAD read the file the demo wrote.
    server.shared().control.set_config_path(&config_path);
    let addr = server.local_addr()?;
    println!();
    println!("pgrelay is listening on {addr} ({} mode)", opts.mode.name());
    println!("  leader     {}:{}", leader.host, leader.port);
    for (i, f) in cluster.followers().iter().enumerate() {
        let lag = match opts.lag {
            Some(lag) if i == 0 => format!(", lagging {lag:?} on purpose"),
            _ => String::new(),
        };
        let kind = match opts.mode {
            ReplicationMode::Physical => "streaming standby",
            _ => "writable follower, filled by pgrelay",
        };
        println!("  {:<10} {}:{} ({kind}{lag})", f.name, f.host, f.port);
    }
    println!("  config     {}", config_path.display());
    if let Some(addr) = server.metrics_addr() {
        println!("  status     http://{addr}/ (lag charts and nodes, in a browser)");
        println!("  metrics    http://{addr}/metrics");
    }
    println!();
    println!(
        "connect:  psql \"postgres://{DEMO_USER}:{DEMO_PASSWORD}@{}:{}/{DEMO_DATABASE}\"",
        addr.ip(),
        addr.port()
    );
    println!(
        "console:  psql -h {} -p {} -U {DEMO_SUPERUSER} pgrelay   (password in {}; try SHOW NODES, and RELOAD after editing it)",
        addr.ip(),
        addr.port(),
        config_path.display()
    );
    println!("press Ctrl-C to stop");
    let stop = CancellationToken::new();
    tokio::spawn(cancel_on_signal(stop.clone()));
    server.run(stop).await;
    Ok(())
}

/// Creates the demo's application role and database on the leader (idempotent).
async fn create_demo_database(
    leader: &NodeConfig,
    superuser_password: &str,
    with_database: bool,
) -> Result<(), DemoError> {
    let params = vec![("database".to_owned(), "postgres".to_owned())];
    let mut conn = BackendConn::connect(
        0,
        leader,
        &params,
        DEMO_SUPERUSER,
        superuser_password,
        std::time::Duration::from_secs(10),
    )
    .await
    .map_err(|e| DemoError::Setup(e.to_string()))?;
    let exists = conn
        .simple_query(&format!(
            "SELECT 1 FROM pg_roles WHERE rolname = '{DEMO_USER}'"
        ))
        .await
        .map_err(DemoError::Setup)?;
    if exists.is_empty() {
        conn.simple_query(&format!(
            "CREATE ROLE {DEMO_USER} LOGIN CREATEDB PASSWORD '{DEMO_PASSWORD}'"
        ))
        .await
        .map_err(DemoError::Setup)?;
    }
    let exists = conn
        .simple_query(&format!(
            "SELECT 1 FROM pg_database WHERE datname = '{DEMO_DATABASE}'"
        ))
        .await
        .map_err(DemoError::Setup)?;
    if exists.is_empty() && with_database {
        conn.simple_query(&format!(
            "CREATE DATABASE {DEMO_DATABASE} OWNER {DEMO_USER}"
        ))
        .await
        .map_err(DemoError::Setup)?;
    }
    conn.terminate().await;
    Ok(())
}

/// Waits until a standby has replayed the demo database's creation, so the first reads
/// through pgrelay find it there.
async fn wait_for_database(
    node: &crate::cluster::NodeInfo,
    superuser_password: &str,
) -> Result<(), DemoError> {
    let cfg = NodeConfig {
        name: node.name.clone(),
        role: Role::Follower,
        host: node.host.clone(),
        port: node.port,
    };
    let params = vec![("database".to_owned(), DEMO_DATABASE.to_owned())];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let attempt = BackendConn::connect(
            0,
            &cfg,
            &params,
            DEMO_SUPERUSER,
            superuser_password,
            std::time::Duration::from_secs(10),
        )
        .await;
        match attempt {
            Ok(conn) => {
                conn.terminate().await;
                return Ok(());
            }
            Err(err) if std::time::Instant::now() > deadline => {
                return Err(DemoError::Setup(format!(
                    "{} does not have database {DEMO_DATABASE}: {err}",
                    node.name
                )))
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// Cancels `stop` on Ctrl-C (SIGINT) or SIGTERM.
pub async fn cancel_on_signal(stop: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted; shutting down"),
        _ = term.recv() => info!("terminated; shutting down"),
    }
    stop.cancel();
}
