#!/usr/bin/env bash
# The test command: installs what the tests need (as root, from Debian's packages), then runs
# every test of the workspace. The end-to-end tests create taps, bridges and network
# namespaces, so they need root and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v ip >/dev/null; then
    apt-get update -qq && apt-get install -y -qq iproute2
fi
cargo build --workspace --locked --all-targets
cargo test --workspace --locked
# The guest runtime's and the stencil kernel's host-side unit tests (an empty RUSTFLAGS
# replaces the freestanding link flags of guest/.cargo/config.toml).
(cd guest && RUSTFLAGS="" cargo test --locked -p stencil-core -p guest-rt)
