//! A node's identity: an Ed25519 key pair kept in the node's data directory. Its public half is
//! the libp2p peer id other nodes know it by. Copying a data directory copies the identity; two
//! nodes with one identity are detected and refused (see the network event loop).

use std::path::Path;

use libp2p::identity::Keypair;

use crate::key::{KeyError, write_private};

/// Loads the node key from `data_dir/node.key`, creating it on first use.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, KeyError> {
    let path = data_dir.join("node.key");
    let io = |source| KeyError::Io {
        path: path.clone(),
        source,
    };
    if path.is_file() {
        let bytes = std::fs::read(&path).map_err(io)?;
        let hex = String::from_utf8_lossy(&bytes);
        let raw: Vec<u8> = (0..hex.trim().len() / 2)
            .filter_map(|i| u8::from_str_radix(&hex.trim()[2 * i..2 * i + 2], 16).ok())
            .collect();
        return Keypair::ed25519_from_bytes(raw).map_err(|e| KeyError::Io {
            path: path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a node key: {e}"),
            ),
        });
    }
    let kp = libp2p::identity::ed25519::Keypair::generate();
    let secret: Vec<u8> = kp.secret().as_ref().to_vec();
    std::fs::create_dir_all(data_dir).map_err(io)?;
    write_private(
        &path,
        &secret
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    )
    .map_err(io)?;
    Ok(Keypair::from(kp))
}

#[cfg(test)]
mod tests {
    #[test]
    fn identity_persists_in_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let a = super::load_or_create(dir.path()).unwrap();
        let b = super::load_or_create(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let other = tempfile::tempdir().unwrap();
        let c = super::load_or_create(other.path()).unwrap();
        assert_ne!(a.public().to_peer_id(), c.public().to_peer_id());
    }
}
