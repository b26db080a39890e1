#!/usr/bin/env bash
# Fetches Debian's stock cloud kernel (linux-image-cloud-amd64) for the Linux boot tests and
# turns its bzImage into the ELF vmlinux that ftvmm boots through its PVH entry. Idempotent:
# the result is cached outside the clone, under $FTVMM_KERNEL_CACHE (default /var/cache/ftvmm),
# and a second run does nothing. Prints the vmlinux path on its last line.
#
# The kernel package's modules stay in $cache/pkg (scripts/mkinitramfs.sh uses them).
set -euo pipefail
cache=${FTVMM_KERNEL_CACHE:-/var/cache/ftvmm}
mkdir -p "$cache"
if [ -s "$cache/vmlinux" ] && [ -s "$cache/bzImage" ] && [ -s "$cache/version" ]; then
    echo "$cache/vmlinux"
    exit 0
fi
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need apt-get apt
need lz4 lz4
need dpkg-deb dpkg
# The metapackage depends on the versioned image package; resolve it (apt's lists first).
resolve() { apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9].*-cloud-amd64$/ { print $2; exit }'; }
pkg=$(resolve)
if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(resolve)
fi
[ -n "$pkg" ] || { echo "fetch-kernel: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
work=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
# As root, apt would hand the download to its _apt user, who cannot write the private dir.
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$pkg")
deb=$(ls "$work"/*.deb)
dpkg-deb -x "$deb" "$work/pkg"
vmlinuz=$(ls "$work"/pkg/boot/vmlinuz-* | head -n1)
# The bzImage's payload is legacy-lz4 compressed (magic 02 21 4c 18), like the kernel's own
# scripts/extract-vmlinux finds it: decompress from the magic's offset; trailing bytes after
# the compressed stream make lz4 complain, so its status is ignored and the result checked.
off=$(grep -aboF "$(printf '\002\041\114\030')" "$vmlinuz" | head -n1 | cut -d: -f1)
[ -n "$off" ] || { echo "fetch-kernel: no lz4 payload in $vmlinuz" >&2; exit 1; }
tail -c +"$((off + 1))" "$vmlinuz" | lz4 -dc > "$work/vmlinux" 2>/dev/null || true
[ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] ||
    { echo "fetch-kernel: decompressed payload is not an ELF" >&2; exit 1; }
cp "$vmlinuz" "$cache/bzImage.tmp" && mv "$cache/bzImage.tmp" "$cache/bzImage"
basename "$vmlinuz" | sed 's/^vmlinuz-//' > "$cache/version.tmp"
rm -rf "$cache/pkg"
mv "$work/pkg" "$cache/pkg"
mv "$work/vmlinux" "$cache/vmlinux"
mv "$cache/version.tmp" "$cache/version"
echo "$cache/vmlinux"
