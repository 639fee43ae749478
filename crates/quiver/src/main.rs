//! The `quiver` binary: the CLI over the crates. `anyhow` lives here and nowhere else.

#[macro_use]
mod demo;
mod history;
mod logcmd;
mod predict;
mod push;
mod security_cmd;
mod tabular;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use quiver_core::Config;

#[derive(Parser)]
#[command(
    name = "quiver",
    version,
    about = "Real-time feature and inference server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Send events from a JSONL or CSV file to a running server.
    Push(push::PushArgs),
    /// Ask a running server for one prediction.
    Predict(predict::PredictArgs),
    /// Inspect or verify a log directory offline.
    Log {
        #[command(subcommand)]
        command: logcmd::LogCommand,
    },
    /// Training data: each feature as of each entity row's timestamp (CSV or Parquet).
    History(history::HistoryArgs),
    /// Measure Quiver (and its peers) on this machine.
    Bench(quiver_bench::BenchArgs),
    /// Run the fraud example live: three upstream services, predictions, a terminal view.
    Demo(demo::DemoArgs),
    /// API keys: create, list, revoke (the keys file holds hashes, never keys).
    Keys {
        #[command(subcommand)]
        command: security_cmd::KeysCommand,
    },
    /// The audit trail: verify its hash chain.
    Audit {
        #[command(subcommand)]
        command: security_cmd::AuditCommand,
    },
    /// Keys for data at rest (`[storage] encryption_key_file`).
    Storage {
        #[command(subcommand)]
        command: security_cmd::StorageCommand,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config (DESIGN.md §3). Without one, Quiver starts on defaults with no views.
    #[arg(long, env = "QUIVER_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `server.data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `server.listen` (use port 0 for any free port; the bound address is logged).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides `server.grpc_listen`: KServe V2 over gRPC (port 0: any free port).
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
}

/// Loads the config: defaults < file < `QUIVER_*` env < flags.
pub fn load_config(
    path: Option<&std::path::Path>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
) -> Result<Config> {
    let text = match path {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?
        }
        None => String::new(),
    };
    let mut config = Config::from_toml_with_env(&text, std::env::vars())?;
    if let Some(d) = data_dir {
        config.server.data_dir = d;
    }
    if let Some(l) = listen {
        config.server.listen = l;
    }
    config.validate()?;
    Ok(config)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The demo's terminal view is the output: only warnings in the way of it.
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs sent to a file or a journal stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Push(args) => push::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Log { command } => logcmd::run(command),
        Command::History(args) => history::run(args),
        Command::Bench(args) => quiver_bench::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Keys { command } => security_cmd::keys(command),
        Command::Audit { command } => security_cmd::audit(command),
        Command::Storage { command } => security_cmd::storage(command),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let config_path = args.config.clone();
    let mut config = load_config(args.config.as_deref(), args.data_dir, args.listen)?;
    if let Some(g) = args.grpc_listen {
        config.server.grpc_listen = Some(g);
    }
    security_cmd::warn_if_open(&config)?;
    let scheme = if config.tls.cert.is_some() {
        "https"
    } else {
        "http"
    };
    let metrics = quiver_server::install_metrics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listen = config.server.listen;
        let grpc_listen = config.server.grpc_listen;
        let data_dir = config.server.data_dir.clone();
        let views = config.views.len();
        let node = tokio::task::spawn_blocking(move || quiver_server::Node::open(config)).await??;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, data_dir = %data_dir.display(), views, "quiver listening");
        // A line on stdout that scripts and tests can wait for.
        let grpc = match grpc_listen {
            Some(g) => {
                let l = tokio::net::TcpListener::bind(g)
                    .await
                    .with_context(|| format!("binding {g} (server.grpc_listen)"))?;
                let gaddr = l.local_addr()?;
                tracing::info!(addr = %gaddr, "quiver gRPC listening");
                println!("quiver grpc listening on {gaddr}");
                Some(l)
            }
            None => None,
        };
        println!("quiver listening on {scheme}://{addr}");
        let node = Arc::new(node);
        if node.cluster.is_some() {
            tokio::spawn(reload_on_sighup(node.clone(), config_path));
        }
        quiver_server::serve_with(node, listener, grpc, metrics, shutdown_signal()).await?;
        tracing::info!("stopped cleanly");
        Ok(())
    })
}

/// SIGHUP rereads the config file and applies its `[cluster]` (members added or removed; no
/// restart): partitions gained are served once caught up, partitions lost once their new
/// owners serve them. Anything else in the file needs a restart.
async fn reload_on_sighup(node: Arc<quiver_server::Node>, path: Option<PathBuf>) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::error!("cannot install the SIGHUP handler: no config reload");
            return;
        };
        while hup.recv().await.is_some() {
            let node = node.clone();
            let path = path.clone();
            let applied = tokio::task::spawn_blocking(move || -> Result<String> {
                let text = match &path {
                    Some(p) => std::fs::read_to_string(p)
                        .with_context(|| format!("reading config {}", p.display()))?,
                    None => anyhow::bail!("no --config file to reread"),
                };
                let config = Config::from_toml_with_env(&text, std::env::vars())?;
                config.validate()?;
                let cluster = config.cluster.context("the config has no [cluster]")?;
                let change = node.reload_cluster(&cluster)?;
                Ok(format!(
                    "gained {:?}, lost {:?}, {} partitions moved",
                    change.gained, change.lost, change.moved
                ))
            })
            .await;
            match applied {
                Ok(Ok(what)) => tracing::info!(%what, "cluster config reloaded"),
                Ok(Err(e)) => tracing::error!(error = %e, "config reload refused"),
                Err(e) => tracing::error!(error = %e, "config reload failed"),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (node, path);
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
