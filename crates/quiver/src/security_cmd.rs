//! `quiver keys create|list|revoke` (the API keys file: hashes only, the key shown once) and
//! `quiver audit verify` (the audit trail's hash chain and head), `quiver storage keygen` (keys
//! for data at rest).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use quiver_auth::keys;

#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Creates a key and prints it (once: only its hash is stored).
    Create {
        /// Who or what the key is for (shown in logs and the audit trail).
        #[arg(long)]
        name: String,
        /// A grant: producer:VIEW, reader:VIEW, predictor:MODEL (or :*), admin, ops. Repeat.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Rate tier (`[[rate_tier]]` name).
        #[arg(long)]
        tier: Option<String>,
        #[command(flatten)]
        file: KeysFileArgs,
    },
    /// Lists keys (ids, names, grants, tiers, revoked or not).
    List {
        #[command(flatten)]
        file: KeysFileArgs,
    },
    /// Revokes a key (a running server refuses it within a second).
    Revoke {
        id: String,
        #[command(flatten)]
        file: KeysFileArgs,
    },
}

#[derive(clap::Args)]
pub struct KeysFileArgs {
    /// The keys file; default: the config's `auth.keys_file` (relative to its data_dir).
    #[arg(long)]
    keys_file: Option<PathBuf>,
    /// The server's config, to find the keys file.
    #[arg(long, env = "QUIVER_CONFIG")]
    config: Option<PathBuf>,
}

impl KeysFileArgs {
    fn path(&self) -> Result<PathBuf> {
        if let Some(p) = &self.keys_file {
            return Ok(p.clone());
        }
        let config = crate::load_config(self.config.as_deref(), None, None)?;
        let p = &config.auth.keys_file;
        Ok(if p.is_absolute() {
            p.clone()
        } else {
            config.server.data_dir.join(p)
        })
    }
}

#[derive(clap::Subcommand)]
pub enum AuditCommand {
    /// Checks every entry's hash and link and the trail's head; exit 1 on tampering.
    Verify { file: PathBuf },
}

pub fn keys(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Create {
            name,
            roles,
            tier,
            file,
        } => {
            let path = file.path()?;
            let (token, entry) = keys::create(&path, &name, &roles, tier.as_deref())?;
            eprintln!(
                "created key {} ({name}) in {}; it is shown once:",
                entry.id,
                path.display()
            );
            println!("{token}");
        }
        KeysCommand::List { file } => {
            let path = file.path()?;
            let f = keys::KeysFile::load(&path)?;
            for k in &f.keys {
                let state = k
                    .revoked_at
                    .as_deref()
                    .map_or("active".to_string(), |at| format!("revoked {at}"));
                println!(
                    "{}  {:<24} {:<8} {}  [{}]",
                    k.id,
                    k.name,
                    k.tier.as_deref().unwrap_or("-"),
                    state,
                    k.roles.join(", ")
                );
            }
            for c in &f.certs {
                println!(
                    "cert {:<40} {:<8} [{}]",
                    c.san,
                    c.tier.as_deref().unwrap_or("-"),
                    c.roles.join(", ")
                );
            }
        }
        KeysCommand::Revoke { id, file } => {
            let entry = keys::revoke(&file.path()?, &id)?;
            println!("revoked key {} ({})", entry.id, entry.name);
        }
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum StorageCommand {
    /// Appends a new random key to the key file (created, mode 0600, if missing). It seals
    /// everything written after the next start; older keys keep opening what they sealed.
    Keygen {
        /// The key file (`[storage] encryption_key_file`).
        file: PathBuf,
    },
}

pub fn storage(cmd: StorageCommand) -> Result<()> {
    let StorageCommand::Keygen { file } = cmd;
    let id = quiver_fsutil::seal::add_key(&file)?;
    println!(
        "key {id} added to {}; it seals from the next start",
        file.display()
    );
    Ok(())
}

pub fn audit(cmd: AuditCommand) -> Result<()> {
    let AuditCommand::Verify { file } = cmd;
    match quiver_auth::audit::verify(&file) {
        Ok(r) => {
            println!(
                "{}: {} entries, chain and head intact",
                file.display(),
                r.entries
            );
            Ok(())
        }
        Err(quiver_auth::audit::VerifyError::Tampered(problem)) => {
            println!("{}: TAMPERED: {problem}", file.display());
            std::process::exit(1);
        }
        Err(quiver_auth::audit::VerifyError::Io(e)) => {
            Err(e).with_context(|| format!("reading {}", file.display()))
        }
    }
}

/// Refuses nothing, but says loudly when the server is open to more than this machine.
pub fn warn_if_open(config: &quiver_core::Config) -> Result<()> {
    let open = config.auth.mode.trim() == "none";
    if open && !config.server.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.server.listen, "auth.mode = \"none\" on a non-loopback address: anyone who can reach it may read, write and administer everything (README \"Security\")");
    }
    if config.tls.client_ca.is_some() && config.tls.cert.is_none() {
        bail!("tls.client_ca needs tls.cert and tls.key");
    }
    Ok(())
}
