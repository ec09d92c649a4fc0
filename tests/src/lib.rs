//! Test support for Tern: starts real services (Garage) and keeps the tools they need in a cache.

pub mod cache;
pub mod conformance;
pub mod garage;

use std::io::Write as _;
use std::path::Path;

/// Prints one progress line that shows up in CI logs even when the test passes.
///
/// Why not `eprintln!`: libtest captures the print macros of passing tests, and the point of
/// these lines ("garage started: pid ..., version ...") is to prove in every CI log that a real
/// service ran. Writing to the stderr handle directly bypasses the capture.
pub(crate) fn announce(message: &str) {
    tracing::info!("{message}");
    // Best effort: a closed stderr must not fail a test.
    let _ = writeln!(std::io::stderr().lock(), "[tern-tests] {message}");
}

/// The last `max_lines` lines of a (log) file, for error messages; never fails.
pub(crate) fn file_tail(path: &Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            lines[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
