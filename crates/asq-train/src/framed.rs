//! The container of asq's files (checkpoints, exported models): an 8-byte magic number, a
//! format version (u32 LE), the payload length (u64 LE) and its FNV-1a 64 checksum (u64 LE),
//! then a bincode 2 payload (standard config) decoded with a length limit, so a hostile length
//! field cannot make the reader allocate more than the limit.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// Bytes before the payload.
pub const HEADER_BYTES: usize = 8 + 4 + 8 + 8;

/// FNV-1a 64 of `bytes`: detects corruption, not tampering.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One file format: its magic number, version, payload limit and name in messages.
#[derive(Debug, Clone, Copy)]
pub struct Format {
    /// First 8 bytes of every file.
    pub magic: &'static [u8; 8],
    /// The version this build writes and reads.
    pub version: u32,
    /// Largest payload accepted (also bincode's allocation limit).
    pub limit: usize,
    /// "checkpoint", "model"...
    pub what: &'static str,
}

impl Format {
    /// Header + payload, the payload given.
    pub fn seal(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
        out.extend_from_slice(self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&fnv1a(payload).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Header + bincode of `value`.
    pub fn encode<T: Serialize, const LIMIT: usize>(&self, value: &T) -> Result<Vec<u8>> {
        let config = bincode::config::standard().with_limit::<LIMIT>();
        let payload = bincode::serde::encode_to_vec(value, config)
            .map_err(|e| Error::Config(format!("{} encoding: {e}", self.what)))?;
        Ok(self.seal(&payload))
    }

    /// The payload of `bytes` after checking magic, version, length and checksum.
    pub fn unseal<'a>(&self, bytes: &'a [u8], path: &Path) -> Result<&'a [u8]> {
        let bad = |detail: String| Error::Format {
            path: path.to_path_buf(),
            detail,
        };
        if bytes.len() < HEADER_BYTES {
            return Err(bad(format!(
                "truncated: {} bytes, the header alone is {HEADER_BYTES}",
                bytes.len()
            )));
        }
        if &bytes[..8] != self.magic {
            return Err(bad(format!("not an asq {} (bad magic number)", self.what)));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != self.version {
            return Err(bad(format!(
                "{} format version {version}, this build reads {}",
                self.what, self.version
            )));
        }
        let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        if len != (bytes.len() - HEADER_BYTES) as u64 {
            return Err(bad(format!(
                "payload length {len} but {} bytes follow the header (truncated or padded)",
                bytes.len() - HEADER_BYTES
            )));
        }
        let sum = u64::from_le_bytes(bytes[20..28].try_into().expect("8 bytes"));
        let payload = &bytes[HEADER_BYTES..];
        if fnv1a(payload) != sum {
            return Err(bad("checksum mismatch: the file is corrupt".into()));
        }
        Ok(payload)
    }

    /// Unseals and decodes `bytes`; the whole payload must be one value.
    pub fn decode<T: DeserializeOwned, const LIMIT: usize>(
        &self,
        bytes: &[u8],
        path: &Path,
    ) -> Result<T> {
        let payload = self.unseal(bytes, path)?;
        let bad = |detail: String| Error::Format {
            path: path.to_path_buf(),
            detail,
        };
        let config = bincode::config::standard().with_limit::<LIMIT>();
        let (value, used): (T, usize) = bincode::serde::decode_from_slice(payload, config)
            .map_err(|e| bad(format!("undecodable payload: {e}")))?;
        if used != payload.len() {
            return Err(bad(format!(
                "{} unused payload bytes",
                payload.len() - used
            )));
        }
        Ok(value)
    }

    /// Reads `path`, refusing files over the limit before reading them.
    pub fn read(&self, path: &Path) -> Result<Vec<u8>> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > (self.limit + HEADER_BYTES) as u64 {
            return Err(Error::Format {
                path: path.to_path_buf(),
                detail: format!("{size} bytes exceeds the {} size limit", self.what),
            });
        }
        std::fs::read(path).map_err(io)
    }
}
