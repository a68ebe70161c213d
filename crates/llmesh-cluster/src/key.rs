//! The cluster key: a secret every node of a cluster shares. Connections are wrapped in a
//! private-network layer keyed by it (libp2p `pnet`, XSalsa20) before the Noise handshake, so a
//! process without the key cannot connect, read traffic or join.
//!
//! Keys are text; the 32-byte pre-shared key is derived with SHA-256, so a generated hex key and
//! a passphrase both work.

use std::path::{Path, PathBuf};

use libp2p::pnet::PreSharedKey;
use sha2::{Digest, Sha256};

/// A cluster key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(String);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterKey({})", self.fingerprint())
    }
}

/// Why a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Too short to be a secret.
    #[error("the cluster key must be at least 16 characters long")]
    TooShort,
    /// The key file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
}

impl ClusterKey {
    /// A key from text (trimmed).
    pub fn new(text: &str) -> Result<Self, KeyError> {
        let t = text.trim();
        if t.chars().count() < 16 {
            return Err(KeyError::TooShort);
        }
        Ok(ClusterKey(t.to_string()))
    }

    /// A fresh random key (64 hex characters).
    pub fn generate() -> Self {
        use rand::Rng;
        let bytes: [u8; 32] = rand::rng().random();
        ClusterKey(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Reads a key file.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(&text)
    }

    /// The key saved in `data_dir`, or a new one saved there. Returns it and whether it is new.
    pub fn load_or_create(data_dir: &Path) -> Result<(Self, bool), KeyError> {
        let path = data_dir.join("cluster.key");
        if path.is_file() {
            return Ok((Self::from_file(&path)?, false));
        }
        let key = Self::generate();
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        write_private(&path, &key.0).map_err(io)?;
        Ok((key, true))
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 32-byte pre-shared key for the private network layer.
    pub fn psk(&self) -> PreSharedKey {
        let mut h = Sha256::new();
        h.update(b"llmesh cluster key v1\0");
        h.update(self.0.as_bytes());
        PreSharedKey::new(h.finalize().into())
    }

    /// A short public fingerprint, safe to log: nodes whose fingerprints differ cannot talk.
    pub fn fingerprint(&self) -> String {
        self.psk()
            .fingerprint()
            .to_string()
            .chars()
            .take(16)
            .collect()
    }
}

/// Writes a file readable only by its owner (on Unix).
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    {
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
    #[cfg(not(unix))]
    {
        std::fs::write(path, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_derive_stable_distinct_psks() {
        let a = ClusterKey::new("correct horse battery staple").unwrap();
        let b = ClusterKey::new("  correct horse battery staple\n").unwrap();
        let c = ClusterKey::new("correct horse battery stable").unwrap();
        assert_eq!(a.psk(), b.psk());
        assert_ne!(a.psk(), c.psk());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert!(ClusterKey::new("short").is_err());
        assert_eq!(ClusterKey::generate().as_str().len(), 64);
    }

    #[test]
    fn a_generated_key_is_saved_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, new1) = ClusterKey::load_or_create(dir.path()).unwrap();
        let (k2, new2) = ClusterKey::load_or_create(dir.path()).unwrap();
        assert!(new1 && !new2);
        assert_eq!(k1, k2);
    }
}
