//! The node-local pre-shared key: bytes that no Debug, log line or error may ever show.

use std::fmt;
use std::path::Path;

/// A pre-shared key. `Debug` prints only its length; there is no `Display` and no
/// `Serialize` (the VICI loader reads the bytes with [`SecretKey::expose`]).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(Vec<u8>);

impl SecretKey {
    pub fn new(bytes: impl Into<Vec<u8>>) -> SecretKey {
        SecretKey(bytes.into())
    }

    /// Reads a key file; one trailing newline (what editors add) is not part of the key.
    /// A file that anyone on the machine can read (or write) is refused: the key decides
    /// who may speak for the cluster's IPsec tunnels.
    pub fn from_file(path: &Path) -> std::io::Result<SecretKey> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "key file {} has mode {mode:04o}: other users can reach it; \
                     `chmod 600` it (or 640 with a group only the agent is in)",
                    path.display()
                ),
            ));
        }
        let mut bytes = std::fs::read(path)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("key file {} is empty", path.display()),
            ));
        }
        Ok(SecretKey(bytes))
    }

    /// The key bytes, for the one place that hands them to charon.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(<redacted, {} bytes>)", self.0.len())
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        // Best effort: do not leave the key in freed memory.
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, exclusive reference to a byte of our own buffer.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let k = SecretKey::new(b"hunter2-very-secret".to_vec());
        let shown = format!("{k:?} {k:#?} {:?}", Some(&k));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted, 19 bytes"), "{shown}");
    }

    #[test]
    fn key_file_loses_its_trailing_newline_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("psk");
        std::fs::write(&p, b"abc \n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(SecretKey::from_file(&p).unwrap().expose(), b"abc ");
        std::fs::write(&p, b"\n").unwrap();
        assert!(SecretKey::from_file(&p).is_err());
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_naming_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("psk");
        std::fs::write(&p, b"secret-key-bytes").unwrap();
        for (mode, ok) in [
            (0o644, false),
            (0o606, false),
            (0o602, false),
            (0o640, true),
            (0o600, true),
            (0o400, true),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = SecretKey::from_file(&p);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}");
            if let Err(e) = r {
                let text = e.to_string();
                assert!(
                    text.contains(&format!("{mode:04o}")) && text.contains("chmod 600"),
                    "{text}"
                );
                assert!(!text.contains("secret-key-bytes"), "{text}");
            }
        }
    }
}
