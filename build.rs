//! Builds the payload guests (the separate cargo workspace in `guest/`) so that the ftvmm binary
//! can embed them (see `src/payloads.rs`).
//!
//! The guest workspace is built by a nested `cargo build --release` run from `guest/`, so its
//! `.cargo/config.toml` (freestanding static ELF flags) applies, into `$OUT_DIR/guest-target`.
//! The environment is cleared first: variables cargo sets for this build script (RUSTFLAGS,
//! CARGO_TARGET_DIR, CARGO_CFG_*, CARGO_PKG_*, the jobserver, a rustc wrapper, ...) would
//! otherwise leak into the guest build and change or break it.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The payload binaries, by builtin name (each a binary of the guest workspace).
const PAYLOADS: &[&str] = &["seq", "stencil", "kv", "journal", "idle"];

/// Variables the nested cargo and rustup need; everything else is dropped.
const KEEP_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "RUSTUP_HOME",
    "CARGO_HOME",
    "RUSTUP_TOOLCHAIN",
    "TMPDIR",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest_dir = manifest_dir.join("guest");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    watch_sources(&guest_dir);

    let mut cmd = Command::new(&cargo);
    cmd.env_clear();
    for key in KEEP_ENV {
        if let Some(value) = env::var_os(key) {
            cmd.env(key, value);
        }
    }
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cargo));
    if !output.status.success() {
        panic!(
            "building the guest payloads in {} failed ({}):\n{}\n{}",
            guest_dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let payload_dir = target_dir.join("x86_64-unknown-linux-gnu").join("release");
    for name in PAYLOADS {
        let path = payload_dir.join(name);
        assert!(
            path.is_file(),
            "guest build did not produce {}",
            path.display()
        );
    }
    println!(
        "cargo:rustc-env=FTVMM_PAYLOAD_DIR={}",
        payload_dir.display()
    );
}

/// Re-run when a guest source changes: every entry of `guest/` except build output (`target`)
/// and hidden files other than `.cargo` (directories are scanned recursively by cargo).
fn watch_sources(guest_dir: &Path) {
    let entries = std::fs::read_dir(guest_dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", guest_dir.display()));
    for entry in entries {
        let entry = entry.expect("guest directory entry");
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "target" || (name.starts_with('.') && name != ".cargo") {
            continue;
        }
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
    // New members appear as new entries of guest/ itself.
    println!("cargo:rerun-if-changed={}", guest_dir.display());
}
