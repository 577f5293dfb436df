//! The node's WireGuard key pair: made here, kept in a 0600 file under the state directory
//! (a restart keeps it), replaced when the cluster asks for a newer key generation. Only
//! the public key ever leaves the node.

use boringtun::x25519::{PublicKey, StaticSecret};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Base64 (standard, padded), as `wg` and the API show keys.
pub fn base64(bytes: &[u8; 32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(44);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn unbase64(s: &str) -> Option<[u8; 32]> {
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut out = Vec::with_capacity(32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
        }
    }
    out.try_into().ok()
}

pub fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<[u8; 32]> {
    let v: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    v?.try_into().ok()
}

/// A key pair of one generation.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyPair {
    pub epoch: i64,
    /// RFC 3339.
    pub created: String,
    private_key: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("epoch", &self.epoch)
            .field("public", &self.public_base64())
            .finish()
    }
}

impl KeyPair {
    /// A new pair from the kernel's random source.
    pub fn generate(epoch: i64) -> std::io::Result<Self> {
        let mut secret = [0u8; 32];
        let mut filled = 0;
        while filled < secret.len() {
            // SAFETY: writes at most the remaining length into our buffer.
            let n = unsafe {
                libc::getrandom(
                    secret[filled..].as_mut_ptr().cast(),
                    secret.len() - filled,
                    0,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            filled += n as usize;
        }
        Ok(Self {
            epoch,
            created: k8s_openapi::jiff::Timestamp::now().to_string(),
            private_key: base64(&secret),
        })
    }

    pub fn private(&self) -> [u8; 32] {
        unbase64(&self.private_key).unwrap_or_default()
    }

    pub fn public(&self) -> [u8; 32] {
        *PublicKey::from(&StaticSecret::from(self.private())).as_bytes()
    }

    pub fn public_base64(&self) -> String {
        base64(&self.public())
    }
}

pub fn key_file(state_dir: &Path) -> PathBuf {
    state_dir.join("wireguard").join("private-key.json")
}

/// The pair of the generation being prepared during a rotation.
pub fn next_key_file(state_dir: &Path) -> PathBuf {
    state_dir.join("wireguard").join("next-private-key.json")
}

/// The stored pair, if any and readable.
pub fn load(path: &Path) -> Option<KeyPair> {
    let pair: KeyPair = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    unbase64(&pair.private_key).map(|_| pair)
}

/// Writes `pair` (mode 0600, replaced atomically).
pub fn store(path: &Path, pair: &KeyPair) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec(pair)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The pairs of a node: the one in use and, during a rotation, the next one.
#[derive(Debug)]
pub struct KeyRing {
    pub active: KeyPair,
    pub next: Option<KeyPair>,
    /// Pairs made by this call (rotations).
    pub made: usize,
}

/// The pairs for generation `active` and, during a rotation, `next` (kept under
/// `state_dir`): the stored pair in use unless it is older; the stored next pair becomes
/// the one in use when `active` reaches its generation (the switch); a new pair is made
/// and stored before it is used when none fits.
pub fn converge(state_dir: &Path, active: i64, next: Option<i64>) -> std::io::Result<KeyRing> {
    let (active_path, next_path) = (key_file(state_dir), next_key_file(state_dir));
    let mut stored_next = load(&next_path);
    let mut made = 0;
    let active = match load(&active_path) {
        Some(pair) if pair.epoch >= active => pair,
        _ => match stored_next.take().filter(|p| p.epoch >= active) {
            Some(pair) => {
                store(&active_path, &pair)?;
                pair
            }
            None => {
                made += 1;
                let pair = KeyPair::generate(active)?;
                store(&active_path, &pair)?;
                pair
            }
        },
    };
    let next = match next.filter(|n| *n > active.epoch) {
        Some(n) => Some(match stored_next.filter(|p| p.epoch >= n) {
            Some(pair) => pair,
            None => {
                made += 1;
                let pair = KeyPair::generate(n)?;
                store(&next_path, &pair)?;
                pair
            }
        }),
        None => None,
    };
    if next.is_none() {
        match std::fs::remove_file(&next_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(KeyRing { active, next, made })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn encodings_round_trip_like_wg_does() {
        // `echo -n` of 32 bytes 0..31 through `base64`.
        let bytes: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            base64(&bytes),
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
        );
        assert_eq!(unbase64(&base64(&bytes)), Some(bytes));
        assert_eq!(unhex(&hex(&bytes)), Some(bytes));
        assert_eq!(unbase64("not base64!"), None);
    }

    #[test]
    fn the_pair_is_kept_0600_and_replaced_only_for_a_newer_generation() {
        let dir = tempfile::tempdir().unwrap();
        let first = converge(dir.path(), 1, None).unwrap();
        assert_eq!((first.made, first.next.is_none()), (1, true));
        let mode = std::fs::metadata(key_file(dir.path()))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let again = converge(dir.path(), 1, None).unwrap();
        assert_eq!(again.made, 0, "a restart keeps the key");
        assert_eq!(again.active.public(), first.active.public());
        // Prepare: a next pair beside the one in use, kept across calls.
        let prepared = converge(dir.path(), 1, Some(2)).unwrap();
        assert_eq!(prepared.made, 1);
        assert_eq!(prepared.active.public(), first.active.public());
        let next = prepared.next.unwrap();
        assert_eq!(next.epoch, 2);
        let mode = std::fs::metadata(next_key_file(dir.path()))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let again = converge(dir.path(), 1, Some(2)).unwrap();
        assert_eq!(again.next.unwrap().public(), next.public());
        // Switch: the prepared pair becomes the one in use, no new pair.
        let switched = converge(dir.path(), 2, None).unwrap();
        assert_eq!(switched.made, 0);
        assert_eq!(switched.active.public(), next.public());
        assert!(!next_key_file(dir.path()).exists());
        // A node that missed the preparation makes its pair for the generation.
        let caught_up = converge(dir.path(), 4, None).unwrap();
        assert_eq!((caught_up.made, caught_up.active.epoch), (1, 4));
        assert_ne!(caught_up.active.public(), next.public());
    }
}
