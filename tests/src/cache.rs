//! The tool cache: third-party programs the tests run, built once per machine and kept across runs.
//!
//! Layout: `$TERN_CACHE` (default `~/.cache/tern`) holds `garage-<version>/bin/garage`, a
//! `garage-<version>.lock` file that serialises builds between processes, and
//! `garage-<version>.build.log` with the output of the last build.
//!
//! `tests/run` builds Garage before `cargo test` starts, so tests normally only find the binary.
//! The build fallback here exists so that a plain `cargo test` on a fresh machine still works.

use std::ffi::OsString;
use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{announce, file_tail};

/// The Garage release Tern is tested against. Bump it here and in `tests/run` together.
pub const GARAGE_VERSION: &str = "2.5.0";

/// The cache directory: `$TERN_CACHE`, or `$HOME/.cache/tern`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = non_empty_env("TERN_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    let home = non_empty_env("HOME")
        .context("neither $TERN_CACHE nor $HOME is set: cannot locate the tool cache")?;
    Ok(PathBuf::from(home).join(".cache").join("tern"))
}

/// Where `cargo install --root` puts Garage: `<cache>/garage-<version>`.
pub fn garage_install_root() -> Result<PathBuf> {
    Ok(cache_dir()?.join(format!("garage-{GARAGE_VERSION}")))
}

/// The Garage binary to test against.
///
/// `$TERN_GARAGE_BIN` wins when set (it must exist). Otherwise the cached
/// `<cache>/garage-<version>/bin/garage` is used, and built with `cargo install` first if it is
/// missing, which takes about 7 minutes on 2 cores. Concurrent callers, in this process or in
/// others, wait for a single build instead of starting their own.
///
/// Blocking: call it from `spawn_blocking` in async code if the build may be needed.
pub fn garage_binary() -> Result<PathBuf> {
    // Resolve once per process: every Garage start asks, and the version probe costs a fork.
    static RESOLVED: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut resolved = RESOLVED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(path) = resolved.as_ref() {
        return Ok(path.clone());
    }
    let path = resolve_garage_binary()?;
    *resolved = Some(path.clone());
    Ok(path)
}

fn resolve_garage_binary() -> Result<PathBuf> {
    if let Some(bin) = non_empty_env("TERN_GARAGE_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!(
                "$TERN_GARAGE_BIN points to {}, which is not a file",
                bin.display()
            );
        }
        let version = garage_version(&bin)?;
        if !version_matches(&version) {
            // An override may deliberately try another release; say so loudly but go on.
            announce(&format!(
                "warning: $TERN_GARAGE_BIN is {version:?}, Tern is tested against v{GARAGE_VERSION}"
            ));
        }
        return Ok(bin);
    }

    let root = garage_install_root()?;
    let bin = root.join("bin").join("garage");
    if !bin.is_file() {
        build_garage(&root, &bin)?;
    }
    let version = garage_version(&bin)?;
    if !version_matches(&version) {
        bail!(
            "{} reports {version:?}, expected v{GARAGE_VERSION}; delete {} to rebuild it",
            bin.display(),
            root.display()
        );
    }
    Ok(bin)
}

/// First line of `garage --version`, e.g. `garage v2.5.0 [features: ...]`.
fn garage_version(bin: &Path) -> Result<String> {
    let output = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {} --version", bin.display()))?;
    if !output.status.success() {
        bail!(
            "{} --version failed ({}): {}",
            bin.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(stdout.lines().next().unwrap_or_default().trim().to_owned())
}

/// Release builds print `garage v2.5.0 [...]`, `cargo install` builds `garage cargo:2.5.0 [...]`.
fn version_matches(version_line: &str) -> bool {
    version_line.split_whitespace().any(|word| {
        let version = word.rsplit(':').next().unwrap_or(word);
        version.trim_start_matches('v') == GARAGE_VERSION
    })
}

/// `cargo install garage --version <v> --locked --root <root>`, under an exclusive file lock.
fn build_garage(root: &Path, bin: &Path) -> Result<()> {
    let cache = root
        .parent()
        .context("the Garage install root has no parent directory")?;
    fs::create_dir_all(cache)
        .with_context(|| format!("cannot create the tool cache {}", cache.display()))?;

    let lock_path = cache.join(format!("garage-{GARAGE_VERSION}.lock"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            announce(&format!(
                "waiting for another process to finish building Garage v{GARAGE_VERSION} (lock {})",
                lock_path.display()
            ));
            lock.lock()
                .with_context(|| format!("cannot lock {}", lock_path.display()))?;
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
        }
    }
    // Someone else may have finished the build while we waited for the lock.
    if bin.is_file() {
        return Ok(());
    }

    let log_path = cache.join(format!("garage-{GARAGE_VERSION}.build.log"));
    let log =
        File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .with_context(|| format!("cannot reopen {}", log_path.display()))?;
    announce(&format!(
        "Garage v{GARAGE_VERSION} is not cached: building it with cargo install into {} \
         (takes ~7+ minutes on 2 cores, done once per machine; log: {})",
        root.display(),
        log_path.display()
    ));

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let started = Instant::now();
    let status = Command::new(&cargo)
        .args([
            "install",
            "garage",
            "--version",
            GARAGE_VERSION,
            "--locked",
            "--root",
        ])
        .arg(root)
        // Run outside the workspace and without the target dir of the `cargo test` that runs us:
        // cargo install must neither pick up project config nor contend for its build lock.
        .current_dir(cache)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .status()
        .with_context(|| format!("cannot run {}", Path::new(&cargo).display()))?;
    if !status.success() || !bin.is_file() {
        bail!(
            "building Garage v{GARAGE_VERSION} failed ({status}); last lines of {}:\n{}",
            log_path.display(),
            file_tail(&log_path, 30)
        );
    }
    announce(&format!(
        "built Garage v{GARAGE_VERSION} in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    // The lock is released when `lock` is dropped here.
    Ok(())
}

fn non_empty_env(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|value| !value.is_empty())
}
