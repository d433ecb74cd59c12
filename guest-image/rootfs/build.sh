#!/usr/bin/env bash
# Build the dinv guest root filesystem: Debian (trixie; bookworm fallback) minbase + docker.io,
# containerd, runc, … with /sbin/dinv-agent as init, packed into a read-only ext4 image,
# cached by input hash.
#
# Usage: img=$(guest-image/rootfs/build.sh | tail -1)
#   -> .../rootfs/<sha256>/rootfs.ext4   (label dinvroot; build-info.txt beside it)
# Boot: root=/dev/vda ro init=/sbin/dinv-agent (see guest-image/README.md).
# Cache: ${DINV_CACHE:-$HOME/.cache/dinv}/rootfs/<sha256>/ ; downloaded .debs are kept in
#        ${DINV_CACHE:-$HOME/.cache/dinv}/rootfs/debs (not an input: only speeds up rebuilds).
# Inputs hashed: this script, packages.txt, overlay/**, the dinv-agent binary, the suite.
# Env: DINV_ROOTFS_SUITE (default trixie), DINV_DEBIAN_MIRROR (default http://deb.debian.org/debian),
#      CARGO_TARGET_DIR (respected when building the agent).
# Logs go to stderr; the last stdout line is the absolute image path.
# Needs root (debootstrap, chroot) and (apt): see apt-packages.txt.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
log() { echo "[rootfs] $*" >&2; }
die() { echo "[rootfs] ERROR: $*" >&2; exit 1; }

suite=${DINV_ROOTFS_SUITE:-trixie}
fallback_suite=bookworm
mirror=${DINV_DEBIAN_MIRROR:-http://deb.debian.org/debian}

[[ $(id -u) == 0 ]] || die "must run as root (debootstrap and chroot)"
command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing (apt-get install e2fsprogs)"
command -v cargo >/dev/null || die "cargo missing"

# --- the agent ------------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-$repo/target}
log "building dinv-agent (cargo build --release -p dinv-agent, target dir $target_dir)"
(cd "$repo" && CARGO_TARGET_DIR=$target_dir cargo build --release -p dinv-agent) >&2 \
    || die "cargo build of dinv-agent failed"
agent=$target_dir/release/dinv-agent
[[ -x $agent ]] || die "$agent not built"

# --- cache key ------------------------------------------------------------------
packages=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$here/packages.txt" | grep -v '^$' | paste -sd, -)
[[ -n $packages ]] || die "packages.txt lists no packages"
key=$(
    {
        echo "suite:$suite mirror:$mirror"
        echo "script"; sha256sum < "$here/build.sh"
        echo "packages:$packages"
        echo "agent"; sha256sum < "$agent"
        (cd "$here/overlay" && find . -type f -o -type l | LC_ALL=C sort | while read -r f; do
            echo "overlay:$f $(stat -c %a "$f")"; sha256sum < "$f"; done)
    } | sha256sum | cut -d' ' -f1
)
cache_base=${DINV_CACHE:-$HOME/.cache/dinv}
cache_root=$cache_base/rootfs
out=$cache_root/$key

if [[ -s $out/rootfs.ext4 ]]; then
    log "cached: $out/rootfs.ext4"
    echo "$out/rootfs.ext4"
    exit 0
fi

# --- debootstrap ----------------------------------------------------------------
mkdir -p "$cache_root" "$cache_root/debs"
work=$(mktemp -d "$cache_root/.build-$key.XXXXXX")
cleanup() {
    # Never follow into a half-built tree's mounts (debootstrap may leave /proc mounted on error).
    if [[ -d $work/root ]]; then
        for m in proc sys dev/pts dev; do umount -l "$work/root/$m" 2>/dev/null || true; done
    fi
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
root=$work/root
mkdir -p "$work/out"
start=$(date +%s)

bootstrap() {
    local s=$1
    rm -rf --one-file-system "$root"
    log "debootstrap --variant=minbase $s (${packages//,/ })"
    debootstrap --variant=minbase --cache-dir="$cache_root/debs" --include="$packages" \
        "$s" "$root" "$mirror" >&2
}
used_suite=$suite
if ! bootstrap "$suite"; then
    [[ $suite != "$fallback_suite" ]] || die "debootstrap $suite failed"
    log "debootstrap $suite failed; falling back to $fallback_suite"
    used_suite=$fallback_suite
    bootstrap "$fallback_suite" || die "debootstrap $fallback_suite failed"
fi
boot_done=$(date +%s)
log "debootstrap done in $((boot_done - start))s"

# --- configure ------------------------------------------------------------------
install -m 0755 "$agent" "$root/sbin/dinv-agent"
# The agent links against the build host's glibc: prove it runs on the guest's.
guest_glibc=$(chroot "$root" dpkg-query -W -f='${Version}' libc6)
chroot "$root" /sbin/dinv-agent --version >&2 \
    || die "dinv-agent does not run against the guest's glibc ($guest_glibc)"
versions=$(chroot "$root" dpkg-query -W -f='${Package}=${Version} ' docker.io containerd runc iptables libc6)
log "guest packages: $versions"

cp -a "$here/overlay/." "$root/"
# dockerd execs `runc --version` for every /version and /info request: a Go program start, ~20 s
# of guest CPU on PVM. The root is read-only, so runc's answer is recorded now; dockerd's PATH
# (guest-image/agent/src/services.rs, DOCKERD_PATH) finds this `runc` first, which prints it for
# `--version` alone and execs the real runc for everything else.
runc_bin=$(chroot "$root" sh -c 'command -v runc') || die "runc not found in the guest tree"
runc_version=$(chroot "$root" "$runc_bin" --version) || die "$runc_bin --version failed"
[[ $runc_version == *"runc version"* && $runc_version != *"'"* ]] \
    || die "unexpected runc --version output: $runc_version"
wrapper=/usr/libexec/dinv/dockerd-path/runc
mkdir -p "$root${wrapper%/*}"
{
    echo '#!/bin/sh'
    echo "# Generated by guest-image/rootfs/build.sh: answers --version with what $runc_bin"
    echo '# printed when this image was built, execs it for everything else.'
    echo 'if [ "$#" -eq 1 ] && [ "$1" = --version ]; then'
    echo "    printf '%s\\n' '${runc_version//$'\n'/"' '"}'"
    echo '    exit 0'
    echo 'fi'
    echo "exec $runc_bin \"\$@\""
} > "$root$wrapper"
chmod 0755 "$root$wrapper"
[[ $(chroot "$root" "$wrapper" --version) == "$runc_version" ]] \
    || die "the runc --version wrapper does not reproduce runc's answer"
chroot "$root" "$wrapper" --help >/dev/null \
    || die "the runc wrapper does not exec $runc_bin"
# Mount points the agent uses (root is read-only at run time).
mkdir -p "$root"/{proc,sys,dev,run,tmp,mnt,var/lib/docker,var/lib/containerd,var/log}
chmod 1777 "$root/tmp"
# No getty, no systemd: the agent is init. Drop anything that would expect a writable root.
rm -f "$root/etc/machine-id" && : > "$root/etc/machine-id"

# --- trim -----------------------------------------------------------------------
before=$(du -sm "$root" | cut -f1)
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old \
    "$root"/var/log/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/usr/share/i18n "$root"/usr/share/lintian \
    "$root"/usr/share/bash-completion "$root"/usr/share/zsh "$root"/usr/share/fish
# Not used by dockerd: the containerd CLI, v1 shims, the stress tool.
rm -f "$root"/usr/bin/ctr "$root"/usr/bin/containerd-shim "$root"/usr/bin/containerd-shim-runc-v1 \
    "$root"/usr/bin/containerd-stress
find "$root" -xdev \( -name '*.pyc' -o -name '__pycache__' \) -prune -exec rm -rf {} + 2>/dev/null || true
after=$(du -sm "$root" | cut -f1)
log "trimmed tree: ${before} MiB -> ${after} MiB"

# --- pack -----------------------------------------------------------------------
# Right-sized: used space + 15% + 32 MiB, inode count from the file count + 20%. No journal: the
# root is mounted read-only.
files=$(find "$root" -xdev | wc -l)
size_mb=$(( after + after * 15 / 100 + 32 ))
inodes=$(( files + files / 5 + 1024 ))
log "mkfs.ext4 ${size_mb} MiB, ${inodes} inodes (${files} files)"
mkfs.ext4 -q -F -d "$root" -L dinvroot -b 4096 -m 0 -N "$inodes" -O ^has_journal \
    -E nodiscard "$work/out/rootfs.ext4" "${size_mb}M" >&2
e2fsck -fn "$work/out/rootfs.ext4" >&2 || die "fsck of the new image failed"

end=$(date +%s)
{
    echo "suite=$used_suite"
    echo "packages=$versions"
    echo "agent_sha256=$(sha256sum < "$agent" | cut -d' ' -f1)"
    echo "tree_mib=$after"
    echo "image_mib=$size_mb"
    echo "debootstrap_seconds=$((boot_done - start))"
    echo "build_seconds=$((end - start))"
} > "$work/out/build-info.txt"

if ! mv -T "$work/out" "$out" 2>/dev/null; then
    [[ -s $out/rootfs.ext4 ]] || die "could not install $out"
    log "another build installed $out first; using it"
fi
log "built in $((end - start))s: $out/rootfs.ext4 (${size_mb} MiB)"
echo "$out/rootfs.ext4"
