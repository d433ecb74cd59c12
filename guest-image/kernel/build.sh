#!/usr/bin/env bash
# Build the dinv guest kernel (vmlinux for PVH boot, bzImage, System.map,
# config) from Debian's linux-source package, cached by input hash.
#
# Usage: dir=$(guest-image/kernel/build.sh | tail -1)
#   -> $dir/{vmlinux,bzImage,System.map,config}
# Cache: ${DINV_CACHE:-$HOME/.cache/dinv}/kernel/<sha256>/
# Logs go to stderr; the last stdout line is the artifact directory.
# Needs (apt): see ../apt-packages.txt.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "[kernel] $*" >&2; }
die() { echo "[kernel] ERROR: $*" >&2; exit 1; }

# --- version pin --------------------------------------------------------------
DEB_PACKAGE=$(sed -n 's/^DEB_PACKAGE=//p' "$here/VERSION")
UPSTREAM_VERSION=$(sed -n 's/^UPSTREAM_VERSION=//p' "$here/VERSION")
[[ -n $DEB_PACKAGE && -n $UPSTREAM_VERSION ]] || die "VERSION must set DEB_PACKAGE and UPSTREAM_VERSION"
want_mm=$(echo "$UPSTREAM_VERSION" | cut -d. -f1,2)

deb_version=$(dpkg-query -W -f='${Version}' "$DEB_PACKAGE" 2>/dev/null) \
    || die "package $DEB_PACKAGE is not installed (apt-get install $DEB_PACKAGE)"
have_mm=$(echo "$deb_version" | cut -d. -f1,2)
[[ $have_mm == "$want_mm" ]] \
    || die "$DEB_PACKAGE is version $deb_version, expected upstream $want_mm.x ($UPSTREAM_VERSION); update VERSION, config and patches"
tarball=/usr/src/$DEB_PACKAGE.tar.xz
[[ -f $tarball ]] || die "$tarball not found (is $DEB_PACKAGE installed?)"
if [[ ${deb_version%%-*} != "$UPSTREAM_VERSION" ]]; then
    log "warning: $DEB_PACKAGE is $deb_version, pinned upstream $UPSTREAM_VERSION (same major.minor; continuing)"
fi

shopt -s nullglob
fragments=("$here"/config/*.config)
patches=("$here"/patches/*.patch)
shopt -u nullglob
(( ${#fragments[@]} > 0 )) || die "no config fragments in $here/config"

# --- cache key ----------------------------------------------------------------
key=$(
    {
        echo "deb:$DEB_PACKAGE=$deb_version"
        for f in "$here/VERSION" "$here/build.sh" "${fragments[@]}" "${patches[@]}"; do
            echo "file:${f#"$here"/}"
            sha256sum < "$f"
        done
    } | sha256sum | cut -d' ' -f1
)
cache_root=${DINV_CACHE:-$HOME/.cache/dinv}/kernel
out=$cache_root/$key
artifacts=(vmlinux bzImage System.map config)

complete() { local a; for a in "${artifacts[@]}"; do [[ -s $1/$a ]] || return 1; done; }

if complete "$out"; then
    log "cached: $out"
    echo "$out"
    exit 0
fi

# --- build --------------------------------------------------------------------
# One build per key at a time: a concurrent caller waits for it and reuses it.
mkdir -p "$cache_root"
exec 9> "$cache_root/.lock-$key"
if ! flock -n 9; then
    log "another build of this kernel is running; waiting for it"
    flock 9
fi
if complete "$out"; then
    log "cached: $out"
    echo "$out"
    exit 0
fi
work=$(mktemp -d "$cache_root/.build-$key.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
src=$work/src
mkdir -p "$src" "$work/out"

start=$(date +%s)
log "unpacking $tarball ($deb_version) into $src"
tar -xJf "$tarball" -C "$src" --strip-components=1

mk_ver=$(make -s -C "$src" kernelversion 2>/dev/null)
[[ $(echo "$mk_ver" | cut -d. -f1,2) == "$want_mm" ]] \
    || die "unpacked source is $mk_ver, expected $want_mm.x"
log "source version $mk_ver"

for p in "${patches[@]}"; do
    log "applying $(basename "$p")"
    patch -d "$src" -p1 --batch --forward -F0 < "$p" >&2 \
        || die "patch $(basename "$p") does not apply to $mk_ver"
done

export KBUILD_BUILD_USER=dinv KBUILD_BUILD_HOST=dinv
export KBUILD_BUILD_TIMESTAMP="$deb_version"
mkargs=(-C "$src" ARCH=x86_64)

log "config: allnoconfig + ${#fragments[@]} fragments"
make "${mkargs[@]}" allnoconfig >&2
(cd "$src" && ./scripts/kconfig/merge_config.sh -m .config "${fragments[@]}") >&2
make "${mkargs[@]}" olddefconfig >&2

# Verify every option the fragments request is set as requested.
verify_config() {
    local cfg=$1 frag line sym want have bad=0
    for frag in "${fragments[@]}"; do
        while IFS= read -r line; do
            if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
                sym=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
            elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set ]]; then
                sym=${BASH_REMATCH[1]} want=n
            else
                continue
            fi
            have=$(grep -E "^$sym=" "$cfg" | head -1 | cut -d= -f2- || true)
            [[ -n $have ]] || have=n
            if [[ $have != "$want" ]]; then
                echo "  $(basename "$frag"): $sym requested=$want final=$have" >&2
                bad=1
            fi
        done < "$frag"
    done
    return $bad
}
if ! verify_config "$src/.config"; then
    die "final .config does not match the fragments (see mismatches above; fix a missing dependency or the fragment)"
fi
log "config verified"

jobs=$(nproc)
log "make -j$jobs vmlinux bzImage"
make "${mkargs[@]}" -j"$jobs" vmlinux bzImage >&2

cp "$src/vmlinux" "$work/out/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$work/out/bzImage"
cp "$src/System.map" "$work/out/System.map"
cp "$src/.config" "$work/out/config"
{
    echo "package=$DEB_PACKAGE $deb_version"
    echo "kernelversion=$mk_ver"
    echo "build_seconds=$(( $(date +%s) - start ))"
} > "$work/out/build-info.txt"

# Publish first (atomic rename), then delete the big source tree.
if ! mv -T "$work/out" "$out" 2>/dev/null; then
    complete "$out" || die "could not install artifacts into $out"
    log "another build installed $out first; using it"
fi
log "built in $(( $(date +%s) - start ))s: $out"
log "removing the source tree"
rm -rf "$work"
echo "$out"
