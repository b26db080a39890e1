#!/usr/bin/env bash
# Builds a busybox initramfs for booting Debian's cloud kernel under ftvmm on a hardware KVM
# host: Debian's busybox-static, plus the virtio modules from the kernel package that
# scripts/fetch-kernel.sh cached (Debian builds virtio, virtio_mmio, virtio_blk and
# virtio_net as modules). Its /init loads them, mounts the virtio disk (/dev/vda) on /mnt if
# there is one, brings eth0 up, and then runs /mnt/ftvmm-run from the disk if it is there (the
# guest's workload); otherwise it prints what it found and idles (ftvmm's console is output
# only, so an interactive shell would wait for input that never comes).
#
#   scripts/mkinitramfs.sh [OUTPUT]      (default: $FTVMM_KERNEL_CACHE/initramfs.cpio.gz)
#
# Then: ftvmm run --kernel /var/cache/ftvmm/vmlinux --initrd /var/cache/ftvmm/initramfs.cpio.gz \
#           --disk disk.img --cmdline "console=ttyS0 panic=-1"
# (see docs/linux.md). Under PVM the kernel cannot reach /init: this is for hardware KVM.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${FTVMM_KERNEL_CACHE:-/var/cache/ftvmm}
out=${1:-$cache/initramfs.cpio.gz}
bash scripts/fetch-kernel.sh >/dev/null
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need cpio cpio
need modinfo kmod
need gzip gzip
version=$(cat "$cache/version")
moddir="$cache/pkg/lib/modules/$version"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root busybox-static)
dpkg-deb -x "$work"/busybox-static_*.deb "$work/bb"
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,mnt,lib/modules}
cp "$work/bb/bin/busybox" "$root/bin/busybox"

# The modules /init loads, dependencies first (modules.dep is made by depmod at install time,
# so the order comes from each module's own "depends" field).
order=()
seen=" "
add() {
    local name=$1 file dep
    [[ $seen == *" $name "* ]] && return
    seen+="$name "
    file=$(find "$moddir" \( -name "$name.ko*" -o -name "${name//_/-}.ko*" \) | head -n1)
    if [ -z "$file" ]; then
        return # built into the kernel
    fi
    for dep in $(modinfo -F depends "$file" | tr ',' ' '); do
        add "$dep"
    done
    cp "$file" "$root/lib/modules/"
    order+=("$(basename "$file")")
}
for m in virtio_mmio virtio_blk virtio_net; do
    add "$m"
done
printf '%s\n' "${order[@]}" > "$root/lib/modules/order"

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m" || echo "ftvmm-initramfs: cannot load $m"
done
# Give the virtio devices a moment to appear.
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
if [ -b /dev/vda ]; then
    mount /dev/vda /mnt && echo "ftvmm-initramfs: /dev/vda mounted on /mnt" ||
        echo "ftvmm-initramfs: /dev/vda present but not mountable (make a filesystem on it)"
fi
ip link set eth0 up 2>/dev/null && echo "ftvmm-initramfs: eth0 up"
echo "ftvmm-initramfs: ready: $(cat /proc/version)"
if [ -x /mnt/ftvmm-run ]; then
    exec /mnt/ftvmm-run
fi
echo "ftvmm-initramfs: no /mnt/ftvmm-run on the disk; idling (poweroff -f ends the VM)"
while :; do sleep 3600; done
INIT
chmod +x "$root/init"
mkdir -p "$(dirname "$out")"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
