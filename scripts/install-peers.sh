#!/usr/bin/env bash
# Installs what `ftvmm bench --only peers` compares ftvmm against: QEMU (Debian's
# qemu-system-x86, 7.2 on bookworm), whose COLO checkpoints it measures on the same machine.
# Idempotent: does nothing when qemu-system-x86_64 is already on PATH. The tests do not need
# it (scripts/test.sh does not call this).
set -euo pipefail
if command -v qemu-system-x86_64 >/dev/null; then
    exit 0
fi
apt-get install -y -qq qemu-system-x86 >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq qemu-system-x86 >/dev/null; }
command -v qemu-system-x86_64 >/dev/null ||
    { echo "install-peers: qemu-system-x86 installed but qemu-system-x86_64 is not on PATH" >&2; exit 1; }
qemu-system-x86_64 --version | head -n1
