#!/bin/sh
# PID 1 of a svcproxy user-mode-linux guest (started by svcproxy_lab.uml.UmlGuest).
# The root file system is the host's, read-only (hostfs). This script mounts
# the kernel file systems, the UML kernel's modules and the guest's writable
# state folder (both from the host through hostfs), applies the network
# settings the host wrote into $SVCP_DIR/network.sh, and then becomes the
# command server (server.py), which answers the host through a spool folder.
# The kernel passes SVCP_DIR (the guest's state folder on the host) from the
# command line into this script's environment.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8

fail() {
  echo "svcproxy-init: $*" >&2
  # The host reports the console tail, so say what failed before stopping.
  busybox poweroff -f
}

[ -n "$SVCP_DIR" ] || fail "SVCP_DIR is not set on the kernel command line"
# Read the settings before tmpfs covers /tmp, where a test's state folder may be.
. "$SVCP_DIR/guest.env" || fail "cannot read $SVCP_DIR/guest.env"

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
# The kernel mounts devtmpfs itself (CONFIG_DEVTMPFS_MOUNT); mount it only if not.
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run || fail "cannot mount /run"
mkdir -p /run/netns /run/lock
mount -t tmpfs -o mode=1777 tmpfs /tmp || fail "cannot mount /tmp"
mount -t tmpfs -o mode=1777 tmpfs /var/tmp || fail "cannot mount /var/tmp"
mount -t cgroup2 cgroup2 /sys/fs/cgroup

for d in $SVCP_MOUNTS; do
  # Extra writable host folders (a lab's state folder, results), same path
  # inside; mkdir: the path may lie under one of the fresh tmpfs mounts above.
  mkdir -p "$d" && mount -t hostfs -o "$d" none "$d" || fail "cannot mount $d (hostfs)"
done
# Writable view of the guest's state folder, at the same path as on the host
# (last, so that it is on top when it lies inside one of the folders above).
mkdir -p "$SVCP_DIR" && mount -t hostfs -o "$SVCP_DIR" none "$SVCP_DIR" ||
  fail "cannot mount $SVCP_DIR (hostfs)"
mount -t hostfs -o "$SVCP_MODULES" none /lib/modules || fail "cannot mount $SVCP_MODULES on /lib/modules"

hostname "$SVCP_HOSTNAME"
ip link set lo up
if [ -f "$SVCP_DIR/network.sh" ]; then
  sh -e "$SVCP_DIR/network.sh" > "$SVCP_DIR/network.log" 2>&1 || fail "network setup failed: $(tail -n 5 "$SVCP_DIR/network.log")"
fi

echo "svcproxy-init: starting the command server"
exec "$SVCP_PYTHON" -I -S "$SVCP_SERVER" "$SVCP_DIR"
