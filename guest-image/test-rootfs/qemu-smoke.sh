#!/usr/bin/env bash
# Boot the dinv guest kernel + test rootfs under QEMU (microvm, KVM) and check
# the /init markers. Proves kernel + rootfs independently of our VMM.
#
# Usage: guest-image/test-rootfs/qemu-smoke.sh [extra kernel params...]
# Env: SMP (1), MEM (256), TIMEOUT (600 s), LOG (log file, default in a temp
#      dir), PVM_CMDLINE (default: the non-comment line of
#      guest-image/kernel/cmdline-pvm.txt when /sys/module/kvm_pvm exists;
#      set to "" to boot without it), QEMU_EXTRA (more QEMU args, split on
#      spaces; e.g. "-monitor unix:/tmp/mon.sock,server,nowait" to sample RIP
#      with `echo 'info registers' | socat - UNIX:/tmp/mon.sock`).
# Output: the console log with a "+<seconds since exec>" prefix per line, then
# a summary; exit 0 iff every marker is present, no DINV-TEST-FAIL/BLK-FAIL,
# and QEMU exited by itself.
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
token=tok$RANDOM$RANDOM
mkfs.ext4 -q -L dinvdata "$tmp/data.ext4" 64M

cmdline="console=ttyS0 reboot=k panic=-1 root=/dev/vda ro init=/init dinv.token=$token $PVM_CMDLINE $*"
echo "cmdline: $cmdline" >&2

start=$EPOCHREALTIME
set +e
timeout "${TIMEOUT:-600}" qemu-system-x86_64 \
    -M microvm,acpi=off -enable-kvm -cpu host,-arch-capabilities \
    -m "${MEM:-256}" -smp "${SMP:-1}" -nodefaults -no-user-config -nographic -no-reboot \
    -serial stdio -device i8042 -kernel "$kdir/vmlinux" -append "$cmdline" \
    -drive id=r,file="$rootfs",format=raw,if=none,readonly=on -device virtio-blk-device,drive=r \
    -drive id=d,file="$tmp/data.ext4",format=raw,if=none,discard=unmap -device virtio-blk-device,drive=d \
    ${QEMU_EXTRA:-} \
    < /dev/null 2>&1 |
    while IFS= read -r line; do
        line=${line%$'\r'}
        t=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
        printf '+%s %s\n' "$t" "$line"
    done | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
end=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')

ok=1
for m in DINV-TEST-INIT-OK DINV-TEST-CPUS DINV-TEST-MEM-KB "DINV-TEST-BLK-OK $token" DINV-TEST-TRIM DINV-TEST-DONE; do
    grep -q " $m" "$LOG" || { echo "missing marker: $m" >&2; ok=0; }
done
if grep -q -e ' DINV-TEST-FAIL' -e ' DINV-TEST-BLK-FAIL' "$LOG"; then ok=0; fi
echo "--- summary: qemu rc=$rc after ${end}s" >&2
grep -E ' (DINV-TEST-|Run /init|Linux version)' "$LOG" >&2 || true
[[ $rc == 0 ]] || { echo "qemu did not exit cleanly (rc=$rc; 124 = timeout)" >&2; ok=0; }
[[ $ok == 1 ]] && echo "PASS" >&2 || { echo "FAIL" >&2; exit 1; }
