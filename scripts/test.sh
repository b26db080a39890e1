#!/usr/bin/env bash
# The test command: installs what the tests need (as root, from Debian's packages), then runs
# every test: the workspace's (unit and end-to-end, under KVM) and the guest crates' host-side
# unit tests. The end-to-end tests create taps, bridges and network namespaces, so they need
# root and /dev/kvm; the Linux boot tests boot Debian's kernel, fetched with apt. Ends with one
# summary line: "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v ip >/dev/null || ! command -v chattr >/dev/null; then
    apt-get update -qq && apt-get install -y -qq iproute2 e2fsprogs
fi
# Debian's stock cloud kernel for the Linux boot tests (tests/linux.rs), cached outside the
# clone. If the fetch fails, those tests fail and say why.
if kernel=$(bash scripts/fetch-kernel.sh | tail -n1); then
    export FTVMM_KERNEL="$kernel"
else
    echo "test.sh: could not fetch the Linux test kernel; the Linux boot tests will fail" >&2
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
{
    cargo test --workspace --locked --tests &&
    # An empty RUSTFLAGS replaces the freestanding link flags of guest/.cargo/config.toml.
    (cd guest && RUSTFLAGS="" cargo test --locked -p stencil-core -p guest-rt -p journal --tests)
} 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
