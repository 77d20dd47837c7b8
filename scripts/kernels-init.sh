#!/bin/busybox sh
# /init of the initramfs `cargo xtask kernels` boots: loads the modules the
# -cloud kernels build as modules (virtio PCI, virtio-fs, veth; the list is
# /modules.load, in dependency order), mounts the host's root read-only over
# virtio-fs and switches to it, where $TGK_GUEST (scripts/kernels-guest.sh)
# runs the tests with the host's tools. TGK_* come from the kernel command
# line; TGK_ROOT is the workspace.
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
  echo "TGK error $*"
  echo o >/proc/sysrq-trigger
  sleep 60
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do
  insmod "/lib/modules/$module" || fail "insmod $module"
done </modules.load

mkdir -p /newroot
mount -t virtiofs -o ro hostroot /newroot || fail "mounting the host root over virtio-fs"
# The workspace ($TGK_ROOT) stays visible where it is, also when it lies
# under one of the tmpfs below (a clone in /tmp): held aside, then moved
# back onto its own path.
mkdir -p /workspace
mount --bind "/newroot$TGK_ROOT" /workspace || fail "holding the workspace $TGK_ROOT"
# Where the tests and their tools write: the shared root stays read-only.
for dir in tmp run var/tmp; do
  mount -t tmpfs -o mode=1777 tmpfs "/newroot/$dir" || fail "tmpfs on /$dir"
done
mkdir -p "/newroot$TGK_ROOT"
mount --move /workspace "/newroot$TGK_ROOT" || fail "putting the workspace back at $TGK_ROOT"
for fs in proc sys dev; do
  mount --move "/$fs" "/newroot/$fs"
done
exec switch_root /newroot /bin/bash "$TGK_GUEST"
