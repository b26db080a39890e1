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
