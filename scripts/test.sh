#!/usr/bin/env bash
# The test command: installs what the tests need (as root, from Debian's packages), then runs
# every test: the workspace's (unit and end-to-end, under KVM) and the guest crates' host-side
# unit tests, every test binary even when one fails. The end-to-end tests create taps, bridges,
# network namespaces and mounts, so they need root and /dev/kvm; the Linux boot tests boot
# Debian's kernel, fetched with apt. Then checks that the suite left the machine as it found
# it (no ftvmm process, namespace, link, mount, nftables table or temporary file), names and
# removes what it left, and fails if anything was left. Ends with one summary line:
# "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
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

# What a test could leave behind on this machine, one item per line.
machine_state() {
    ip -o netns list 2>/dev/null | awk '{ print "netns " $1 }'
    ip -o link show | awk -F': ' '{ sub(/@.*/, "", $2); print "link " $2 }'
    awk '{ print "mount " $2 }' /proc/mounts
    if command -v nft >/dev/null; then
        nft list tables 2>/dev/null | sed 's/^table /nft /'
    fi
    local pid
    for pid in $(pgrep -f "^$root/target/[^ ]*/ftvmm( |$)" || true); do
        echo "process $pid"
    done
}

# Removes one leaked item named as machine_state names it.
remove_leak() {
    local kind=$1 name=$2
    case $kind in
        netns) ip netns delete "$name" ;;
        link) ip link delete "$name" ;;
        mount) umount -l "$name" ;;
        nft) nft delete table $name ;;
        process) kill -KILL "$name" ;;
    esac 2>/dev/null || true
}

state=$(mktemp -d /tmp/test-sh.XXXXXX)
machine_state | sort >"$state/before"
# Every temporary file of the suite goes under one directory, which must be empty at the end.
export TMPDIR="$state/tmp"
mkdir "$TMPDIR"
log="$state/log"

finish() {
    local status=$1
    trap - EXIT INT TERM
    # Processes first: a leaked node may still hold a tap or a mount.
    machine_state | sort >"$state/after"
    local leaks
    leaks=$(comm -13 "$state/before" "$state/after" | sort -r)
    local files
    files=$(find "$TMPDIR" -mindepth 1 -maxdepth 1 -printf '%P\n' | sort)
    if [ -n "$leaks" ] || [ -n "$files" ]; then
        echo "test.sh: the suite left behind (now removed):" >&2
        [ -n "$leaks" ] && printf '  %s\n' "$leaks" >&2
        [ -n "$files" ] && printf '  temporary %s\n' $files >&2
        { grep '^process' <<<"$leaks" || true; grep -v '^process' <<<"$leaks" || true; } |
            while read -r kind name; do
                if [ -n "$kind" ]; then remove_leak "$kind" "$name"; fi
            done
        status=1
    fi
    # Test binaries that died without a result line (a crash, a signal) count as failed.
    awk '
        /^test result:/ { p += $4; f += $6 }
        /^error: test failed, to rerun pass/ { crashed++ }
        /^test result: FAILED/ { failed_bins++ }
        END { f += (crashed > failed_bins ? crashed - failed_bins : 0)
              printf "tests: %d passed, %d failed\n", p, f }' "$log"
    rm -rf "$state"
    exit "$status"
}
trap 'finish 130' INT TERM
trap 'finish $?' EXIT

status=0
cargo test --workspace --locked --tests --no-fail-fast 2>&1 | tee "$log" || status=1
# An empty RUSTFLAGS replaces the freestanding link flags of guest/.cargo/config.toml.
(cd guest && RUSTFLAGS="" cargo test --locked --no-fail-fast -p stencil-core -p guest-rt -p journal --tests) \
    2>&1 | tee -a "$log" || status=1
finish "$status"
