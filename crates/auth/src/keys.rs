//! API keys. `quiver keys create` prints a key once — `qvk_<id>_<secret>`, a 16-hex-digit id
//! and 256 random bits — and writes only its SHA-256 to the keys file (TOML), with the key's
//! name, grants and rate tier. A presented key is looked up by its id and its secret's hash
//! compared in constant time. The file is re-read when it changes (checked at most once a
//! second), so `quiver keys create|revoke` takes effect without a restart. The file also maps
//! client-certificate identities (mTLS, by SAN) to grants.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use parking_lot::{Mutex, RwLock};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use std::sync::Arc;

use crate::audit::AuditLog;
use crate::{AuthError, Grants, Identity, Kind};

pub const TOKEN_PREFIX: &str = "qvk_";
/// How often the file's modification time is looked at.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub id: String,
    pub name: String,
    /// Hex SHA-256 of the key's secret part.
    pub hash: String,
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// A client certificate's identity (a SAN, DNS name or URI) and what it may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertEntry {
    pub san: String,
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    #[serde(default, rename = "key")]
    pub keys: Vec<KeyEntry>,
    #[serde(default, rename = "cert")]
    pub certs: Vec<CertEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("keys file {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("keys file {0}: {1}")]
    Parse(PathBuf, String),
    #[error("{0}")]
    Invalid(String),
}

impl KeysFile {
    pub fn load(path: &Path) -> Result<KeysFile, KeysError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                toml::from_str(&text).map_err(|e| KeysError::Parse(path.into(), e.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeysFile::default()),
            Err(e) => Err(KeysError::Io(path.into(), e)),
        }
    }

    /// Writes the file atomically (temporary file, fsync, rename, fsync of the directory).
    pub fn save(&self, path: &Path) -> Result<(), KeysError> {
        let text = toml::to_string_pretty(self).map_err(|e| KeysError::Invalid(e.to_string()))?;
        let header =
            "# Quiver API keys (quiver keys create|list|revoke): hashes only, never keys.\n";
        quiver_fsutil::write_atomic(path, format!("{header}{text}").as_bytes())
            .map_err(|e| KeysError::Io(path.into(), e))
    }
}

fn hash_hex(secret: &str) -> String {
    let d = Sha256::digest(secret.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Creates a key: returns the key (shown once) and its entry, already saved in `path`.
pub fn create(
    path: &Path,
    name: &str,
    roles: &[String],
    tier: Option<&str>,
) -> Result<(String, KeyEntry), KeysError> {
    Grants::parse(roles.iter().map(String::as_str)).map_err(KeysError::Invalid)?;
    if name.is_empty() {
        return Err(KeysError::Invalid("a key needs a name".into()));
    }
    let mut rng = rand::rng();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    let entry = KeyEntry {
        id: id.clone(),
        name: name.to_string(),
        hash: hash_hex(&secret),
        roles: roles.to_vec(),
        tier: tier.map(str::to_string),
        created_at: now_rfc3339(),
        revoked_at: None,
    };
    let mut file = KeysFile::load(path)?;
    file.keys.push(entry.clone());
    file.save(path)?;
    Ok((format!("{TOKEN_PREFIX}{id}_{secret}"), entry))
}

/// Revokes key `id` (it stays listed, marked revoked).
pub fn revoke(path: &Path, id: &str) -> Result<KeyEntry, KeysError> {
    let mut file = KeysFile::load(path)?;
    let entry = file
        .keys
        .iter_mut()
        .find(|k| k.id == id)
        .ok_or_else(|| KeysError::Invalid(format!("no key {id:?}")))?;
    if entry.revoked_at.is_none() {
        entry.revoked_at = Some(now_rfc3339());
    }
    let out = entry.clone();
    file.save(path)?;
    Ok(out)
}

struct Loaded {
    modified: Option<SystemTime>,
    file: KeysFile,
}

/// The keys file as the server reads it, kept current.
pub struct KeyStore {
    /// Where key changes seen on reload are recorded.
    audit: Option<Arc<AuditLog>>,
    path: PathBuf,
    loaded: RwLock<Loaded>,
    checked: Mutex<Instant>,
}

impl KeyStore {
    pub fn open(path: &Path, audit: Option<Arc<AuditLog>>) -> Result<KeyStore, KeysError> {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Ok(KeyStore {
            audit,
            path: path.to_path_buf(),
            loaded: RwLock::new(Loaded {
                modified,
                file: KeysFile::load(path)?,
            }),
            checked: Mutex::new(Instant::now()),
        })
    }

    /// Re-reads the file if it changed; a file that no longer parses keeps the last good one.
    fn refresh(&self) {
        {
            let mut checked = self.checked.lock();
            if checked.elapsed() < RECHECK_EVERY {
                return;
            }
            *checked = Instant::now();
        }
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if modified == self.loaded.read().modified {
            return;
        }
        match KeysFile::load(&self.path) {
            Ok(file) => {
                tracing::info!(path = %self.path.display(), keys = file.keys.len(), "keys file reloaded");
                let old = std::mem::replace(
                    &mut *self.loaded.write(),
                    Loaded {
                        modified,
                        file: file.clone(),
                    },
                );
                self.audit_changes(&old.file, &file);
            }
            Err(e) => {
                tracing::error!(error = %e, "keys file changed but does not load; keeping the last good one")
            }
        }
    }

    /// Key changes (made by `quiver keys`, seen on reload) go to the audit trail.
    fn audit_changes(&self, old: &KeysFile, new: &KeysFile) {
        let Some(audit) = &self.audit else { return };
        for k in &new.keys {
            let before = old.keys.iter().find(|o| o.id == k.id);
            let target = format!("key:{} ({})", k.id, k.name);
            match before {
                None => audit.record(
                    "keys-file",
                    "key_created",
                    &target,
                    "ok",
                    &format!("roles {:?}, tier {:?}", k.roles, k.tier),
                ),
                Some(b) if b.revoked_at.is_none() && k.revoked_at.is_some() => {
                    audit.record("keys-file", "key_revoked", &target, "ok", "")
                }
                Some(b) if b != k => audit.record(
                    "keys-file",
                    "key_changed",
                    &target,
                    "ok",
                    &format!("roles {:?}, tier {:?}", k.roles, k.tier),
                ),
                Some(_) => {}
            }
        }
        for k in old
            .keys
            .iter()
            .filter(|o| !new.keys.iter().any(|n| n.id == o.id))
        {
            audit.record(
                "keys-file",
                "key_removed",
                &format!("key:{} ({})", k.id, k.name),
                "ok",
                "",
            );
        }
        if old.certs != new.certs {
            audit.record(
                "keys-file",
                "certs_changed",
                "client certificates",
                "ok",
                &format!("{} mapped", new.certs.len()),
            );
        }
    }

    /// The identity of an API key, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.refresh();
        let rest = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(AuthError::Invalid("not a Quiver API key"))?;
        let (id, secret) = rest
            .split_once('_')
            .ok_or(AuthError::Invalid("malformed API key"))?;
        let loaded = self.loaded.read();
        let entry = loaded
            .file
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(AuthError::Invalid("unknown API key"))?;
        let presented = hash_hex(secret);
        if !bool::from(presented.as_bytes().ct_eq(entry.hash.as_bytes())) {
            return Err(AuthError::Invalid("unknown API key"));
        }
        if entry.revoked_at.is_some() {
            return Err(AuthError::Invalid("revoked API key"));
        }
        let grants = Grants::parse(entry.roles.iter().map(String::as_str))
            .map_err(|_| AuthError::Invalid("the key's roles do not parse"))?;
        Ok(Identity {
            name: format!("key:{}", entry.name),
            kind: Kind::ApiKey,
            grants,
            tier: entry.tier.clone(),
        })
    }

    /// The identity of a client certificate with these SANs, if the file maps one of them.
    pub fn certificate(&self, sans: &[String]) -> Option<Identity> {
        self.refresh();
        let loaded = self.loaded.read();
        let entry = loaded.file.certs.iter().find(|c| sans.contains(&c.san))?;
        Some(Identity {
            name: format!("cert:{}", entry.san),
            kind: Kind::Certificate,
            grants: Grants::parse(entry.roles.iter().map(String::as_str)).ok()?,
            tier: entry.tier.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_verifies_a_wrong_or_revoked_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let (token, entry) = create(&path, "svc", &["reader:*".into()], Some("gold")).unwrap();
        // The secret is everything after the id: base64url may itself hold '_' (taking the
        // third '_'-separated piece made this test flaky: a short piece could be anywhere).
        let secret = token.splitn(3, '_').nth(2).unwrap();
        assert!(secret.len() >= 40, "{token}");
        assert!(
            !std::fs::read_to_string(&path).unwrap().contains(secret),
            "only the hash is stored"
        );
        let audit = Arc::new(AuditLog::open(&dir.path().join("audit.log")).unwrap());
        let store = KeyStore::open(&path, Some(audit)).unwrap();
        let id = store.verify(&token).unwrap();
        assert_eq!(
            (id.name.as_str(), id.tier.as_deref()),
            ("key:svc", Some("gold"))
        );
        let mut wrong = token.clone();
        wrong.pop();
        wrong.push('x');
        assert!(store.verify(&wrong).is_err());
        assert!(store.verify("qvk_nope_x").is_err());
        assert!(store.verify("Bearer nonsense").is_err());
        revoke(&path, &entry.id).unwrap();
        let (_, second) = create(&path, "svc2", &["reader".into()], None).unwrap();
        // The store notices the change (at most a second later).
        *store.checked.lock() = Instant::now() - RECHECK_EVERY;
        let later = std::time::SystemTime::now() + Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(matches!(
            store.verify(&token),
            Err(AuthError::Invalid("revoked API key"))
        ));
        let trail = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        assert!(
            trail.contains("key_revoked") && trail.contains(&entry.id),
            "{trail}"
        );
        assert!(
            trail.contains("key_created") && trail.contains(&second.id),
            "{trail}"
        );
        assert!(create(&path, "bad", &["owner:*".into()], None).is_err());
    }
}
