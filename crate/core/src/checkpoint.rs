//! safetensors files with JSON metadata, written atomically (temp file, fsync, rename) so an
//! interrupted save never leaves a half-written checkpoint behind.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

pub fn save(path: &Path, tensors: &[(String, Tensor)], metadata: HashMap<String, String>) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| Error::Checkpoint(format!("cannot serialise {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| Error::Input(format!("not a file path: {}", path.display())))?;
    // Unique per call, not only per process: two saves to one path at once (calls on two
    // models that are not awaited) must not write into the same temporary file.
    static SAVES: AtomicU64 = AtomicU64::new(0);
    let call = SAVES.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp-{}-{call}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Io(std::io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))));
    }
    Ok(())
}

pub struct Loaded {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))))?;
    let bad = |e: &dyn std::fmt::Display| {
        Error::Checkpoint(format!("{} is not a valid safetensors file: {e}", path.display()))
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(&e))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| bad(&e))?;
    Ok(Loaded { tensors, metadata })
}

/// safetensors' own bound on a header (100 MB), so that a corrupt length reads no further.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A safetensors file's metadata, read from its header alone (no tensor is read).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let io =
        |e: std::io::Error| Error::Io(std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())));
    let bad = |why: String| Error::Checkpoint(format!("{} is not a valid safetensors file: {why}", path.display()));
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|_| bad(format!("{file_len} bytes, shorter than a header")))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
        return Err(bad(format!("a header of {header_len} bytes in a file of {file_len}")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let Some(entries) = json.get("__metadata__") else { return Ok(HashMap::new()) };
    serde_json::from_value(entries.clone()).map_err(|e| bad(format!("__metadata__: {e}")))
}

impl Loaded {
    /// A required metadata entry.
    pub fn meta(&self, key: &str, path: &Path) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::Checkpoint(format!("{} has no {key:?} entry in its metadata", path.display())))
    }

    /// Checks the "format" metadata entry; `what` names the expected kind of file.
    pub fn expect_format(&self, path: &Path, format: &str, what: &str) -> Result<()> {
        let found = self.meta("format", path)?;
        if found != format {
            return Err(Error::Checkpoint(format!(
                "{} has format {found:?}, expected {format:?} ({what})",
                path.display()
            )));
        }
        Ok(())
    }

    /// Removes and returns the tensors whose names start with `prefix` (prefix stripped).
    pub fn take_prefixed(&mut self, prefix: &str) -> HashMap<String, Tensor> {
        let names: Vec<String> = self.tensors.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
        names
            .into_iter()
            .map(|k| {
                let t = self.tensors.remove(&k).expect("key listed above");
                (k[prefix.len()..].to_string(), t)
            })
            .collect()
    }
}
