#!/usr/bin/env bash
# Build the tiny dinv test rootfs (busybox + /init) as an ext4 image, without
# root privileges (mkfs.ext4 -d), cached by input hash.
#
# Usage: img=$(guest-image/test-rootfs/build.sh | tail -1)
#   -> .../test-rootfs/<sha256>/rootfs.ext4   (label dinvtest, 96 MiB)
# Cache: ${DINV_CACHE:-$HOME/.cache/dinv}/test-rootfs/<sha256>/
# Logs go to stderr; the last stdout line is the absolute image path.
# Needs (apt): busybox-static e2fsprogs iperf3 (the network benchmark's guest side; copied with
# its shared libraries).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "[test-rootfs] $*" >&2; }
die() { echo "[test-rootfs] ERROR: $*" >&2; exit 1; }

busybox=/bin/busybox
bb_version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null) \
    || die "busybox-static is not installed (apt-get install busybox-static)"
[[ -x $busybox ]] || die "$busybox missing"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing (apt-get install e2fsprogs)"
iperf_version=$(dpkg-query -W -f='${Version}' iperf3 2>/dev/null) \
    || die "iperf3 is not installed (apt-get install iperf3)"
e2fs_version=$(dpkg-query -W -f='${Version}' e2fsprogs 2>/dev/null || mkfs.ext4 -V 2>&1 | head -1)

key=$(
    {
        echo "busybox-static=$bb_version"
        echo "e2fsprogs=$e2fs_version"
        echo "iperf3=$iperf_version"
        ldd /usr/bin/iperf3 | awk '$3 ~ /^\// { print $3 }' | xargs -r dpkg -S 2>/dev/null | sort
        sha256sum < "$here/build.sh"
        sha256sum < "$here/init"
    } | sha256sum | cut -d' ' -f1
)
cache_root=${DINV_CACHE:-$HOME/.cache/dinv}/test-rootfs
out=$cache_root/$key

if [[ -s $out/rootfs.ext4 ]]; then
    log "cached: $out/rootfs.ext4"
    echo "$out/rootfs.ext4"
    exit 0
fi

mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,proc,sys,dev,mnt,tmp} "$work/out"
ln -s bin "$root/sbin"
mkdir -p "$root/usr"
ln -s ../bin "$root/usr/bin"
ln -s ../bin "$root/usr/sbin"
chmod 1777 "$root/tmp"

cp "$busybox" "$root/bin/busybox"
n=0
for applet in $("$busybox" --list); do
    [[ $applet == busybox || -e $root/bin/$applet ]] && continue
    ln -s busybox "$root/bin/$applet"
    n=$((n + 1))
done
[[ -e $root/bin/sh ]] || die "busybox has no sh applet"
for a in mount umount awk dd sync fstrim reboot nproc; do
    [[ -e $root/bin/$a ]] || log "warning: busybox has no '$a' applet; /init will report the failure"
done
log "busybox $bb_version with $n applets"

install -m 0755 "$here/init" "$root/init"

# iperf3 and the shared libraries it loads (dynamic loader included), at the same paths.
cp /usr/bin/iperf3 "$root/bin/iperf3"
for lib in $(ldd /usr/bin/iperf3 | awk '$3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

mkfs.ext4 -q -d "$root" -L dinvtest -E root_owner=0:0 "$work/out/rootfs.ext4" 96M >&2
if ! mv -T "$work/out" "$out" 2>/dev/null; then
    [[ -s $out/rootfs.ext4 ]] || die "could not install $out"
fi
log "built $out/rootfs.ext4"
echo "$out/rootfs.ext4"
