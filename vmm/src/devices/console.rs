//! Host-side console sinks: standard output, or a file written at the guest's stream offsets.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::ConsoleSink;
use crate::cast::usize_to_u64;

/// Writes console bytes to this process's standard output.
pub struct StdoutConsole;

impl ConsoleSink for StdoutConsole {
    fn write_console(&mut self, bytes: &[u8]) {
        let mut out = io::stdout().lock();
        // A closed stdout must not stop the guest; the bytes are simply not shown.
        let _ = out.write_all(bytes).and_then(|_| out.flush());
    }
}

/// Writes each console byte at its absolute offset in the guest's console stream, so that
/// files written by different nodes of one guest line up byte for byte.
pub struct FileConsole {
    file: File,
    offset: u64,
}

impl FileConsole {
    /// Opens `path` for the stream from offset `offset`: a stream that starts (offset 0)
    /// truncates the file; one that goes on (a takeover, a swap) keeps what the file holds of
    /// its earlier part, which this node may have written itself.
    pub fn create(path: &Path, offset: u64) -> io::Result<Self> {
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(offset == 0)
            .open(path)?;
        Ok(Self { file, offset })
    }
}

impl ConsoleSink for FileConsole {
    fn write_console(&mut self, bytes: &[u8]) {
        if let Err(e) = self.file.write_all_at(bytes, self.offset) {
            tracing::error!("console file write failed: {e}");
        }
        self.offset += usize_to_u64(bytes.len());
    }
}
