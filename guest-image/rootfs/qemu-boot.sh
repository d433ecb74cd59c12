#!/usr/bin/env bash
# Boot the dinv guest kernel + docker rootfs (dinv-agent as init) under QEMU (microvm, KVM), as a
# check independent of our VMM. There is no vsock here (no vhost-vsock on this machine), so the
# docker API is checked by the agent itself (`dinv-agent: ready` = /_ping answered OK).
#
# Usage: guest-image/rootfs/qemu-boot.sh [extra kernel params...]
#   e.g. DISK=/tmp/docker.img guest-image/rootfs/qemu-boot.sh dinv.test_shutdown_after=10
# Env: DISK (docker disk image; created sparse DISK_SIZE if missing; default: a temp file),
#      DISK_SIZE (4G), MEM (512), SMP (1), TIMEOUT (1800 s), LOG (console log file),
#      PVM_CMDLINE (default: the non-comment line of guest-image/kernel/cmdline-pvm.txt when
#      /sys/module/kvm_pvm exists).
# Output: the console with a "+<seconds since exec>" prefix per line, then a timing summary.
# Exit 0 iff the agent reported ready and powered off, and QEMU exited by itself.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kdir=$("$here/../kernel/build.sh" | tail -1)
rootfs=$("$here/build.sh" | tail -1)

if [[ -z ${PVM_CMDLINE+x} ]]; then
    PVM_CMDLINE=
    if [[ -d /sys/module/kvm_pvm ]]; then
        PVM_CMDLINE=$(grep -v '^[[:space:]]*#' "$here/../kernel/cmdline-pvm.txt" | grep -m1 . || true)
    fi
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
LOG=${LOG:-$tmp/console.log}
DISK=${DISK:-$tmp/docker.img}
[[ -e $DISK ]] || truncate -s "${DISK_SIZE:-4G}" "$DISK"

cmdline="console=ttyS0 reboot=k panic=-1 $PVM_CMDLINE root=/dev/vda ro init=/sbin/dinv-agent dinv.docker_disk=/dev/vdb $*"
echo "cmdline: $cmdline" >&2

start=$EPOCHREALTIME
set +e
timeout "${TIMEOUT:-1800}" qemu-system-x86_64 \
    -M microvm,acpi=off -enable-kvm -cpu host,-arch-capabilities \
    -m "${MEM:-512}" -smp "${SMP:-1}" -nodefaults -no-user-config -nographic -no-reboot \
    -serial stdio -kernel "$kdir/vmlinux" -append "$cmdline" \
    -drive id=r,file="$rootfs",format=raw,if=none,readonly=on -device virtio-blk-device,drive=r \
    -drive id=d,file="$DISK",format=raw,if=none,discard=unmap -device virtio-blk-device,drive=d \
    < /dev/null 2>&1 |
    while IFS= read -r line; do
        line=${line%$'\r'}
        t=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
        printf '+%s %s\n' "$t" "$line"
    done | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
end=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')

echo "--- summary: qemu rc=$rc after ${end}s" >&2
grep -E 'Run /sbin/dinv-agent|dinv-agent (.* starting|containerd started|containerd socket|dockerd started|/run/docker.sock appeared|ready|dockerd [0-9]|docker disk|shutting down|shutdown done|powering off)|error' "$LOG" >&2 || true
ok=1
grep -q 'dinv-agent: ready' "$LOG" || { echo "agent never reported ready" >&2; ok=0; }
grep -q 'dinv-agent: powering off' "$LOG" || { echo "agent did not power off" >&2; ok=0; }
[[ $rc == 0 ]] || { echo "qemu did not exit cleanly (rc=$rc; 124 = timeout)" >&2; ok=0; }
(( ok )) && echo "OK" >&2
(( ok ))
