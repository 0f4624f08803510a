#!/usr/bin/env bash
# Provides a user-mode-linux kernel (linux.uml) with IPVS, every scheduler and
# IPv4 NAT in a cache folder, without installing anything system-wide, and
# checks that it boots on this host. Called by hack/setup.sh; the lab's UML
# guests (lab/svcproxy_lab/uml.py) read the folder it prints.
#
# Which kernel: the machine's own suite's user-mode-linux package (Debian 12:
# 6.1), unpacked, when it boots here and its config has IPv4 NAT. Otherwise one
# built from Debian unstable's linux-source: `make ARCH=um defconfig` plus
# uml.config beside this script, keyed by the source version and a hash of
# uml.config. Why: on one 6.18 host with AMX, UML 6.1 and 6.12 died starting
# init ("userspace - ptrace set fp regs failed, errno = 14"); Debian's 7.2um1
# boots there but has no IPv4/IPv6 NAT, so masquerade cannot be programmed.
# The build takes 5-8 minutes on 2 cores, once per cache. Each kernel is
# boot-checked once per host kernel release (a marker in its folder).
#
# Usage: uml.sh [CACHE_ROOT]   (default: ${XDG_CACHE_HOME:-$HOME/.cache}/svcproxy)
# Quick when a checked kernel is already there. Prints the folder on its last line:
#   <folder>/usr/bin/linux.uml, <folder>/usr/lib/uml/modules/<kernel version>/
# SVCPROXY_UML_BUILD=1 skips the package and builds (to try the build on any host).
set -euo pipefail

root=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/svcproxy}
here=$(cd "$(dirname "$0")" && pwd)
log() { printf '[uml %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { echo "uml.sh: $*" >&2; exit 2; }

command -v apt-get >/dev/null || die "apt-get not found; the UML kernel comes from Debian's user-mode-linux package."
mkdir -p "$root/uml"
# One unpacker at a time per cache (several worktrees' tests may start together).
exec 9>"$root/uml/.lock"
flock 9

host=$(uname -r)

# boots DIR: the kernel in DIR runs an init script to its end on this host.
boots() {
  local dir=$1 probe out rc
  [ -f "$dir/.boots-$host" ] && return 0
  [ -f "$dir/.fails-$host" ] && return 1
  probe=$(mktemp -d "$root/uml/.probe.XXXXXX")
  printf '#!/bin/sh\necho svcproxy-uml-probe-ok\nexec busybox poweroff -f\n' > "$probe/init"
  chmod 755 "$probe/init"
  rc=0
  out=$(cd "$probe" && timeout 60 "$dir/usr/bin/linux.uml" mem=128M "umid=probe$$" "uml_dir=$probe" \
    rootfstype=hostfs rootflags=/ ro "init=$probe/init" con=null con0=null,fd:1 ssl=null 2>&1) || rc=$?
  rm -rf "$probe"
  if grep -q svcproxy-uml-probe-ok <<<"$out"; then
    touch "$dir/.boots-$host"
    return 0
  fi
  log "$(basename "$dir") does not boot on host kernel $host (exit $rc): $(grep -m1 -E 'ptrace.*failed|Kernel panic|not found' <<<"$out" || tail -n1 <<<"$out")"
  touch "$dir/.fails-$host"
  return 1
}

# unpack DEB... into DEST (atomically: DEST appears complete or not at all).
unpack() {
  local dest=$1 deb
  shift
  rm -rf "$dest.tmp"
  mkdir -p "$dest.tmp"
  for deb in "$@"; do dpkg-deb -x "$deb" "$dest.tmp"; done
  [ -x "$dest.tmp/usr/bin/linux.uml" ] || die "$1 has no usr/bin/linux.uml; the package layout changed."
  ls -d "$dest.tmp"/usr/lib/uml/modules/*/ >/dev/null 2>&1 ||
    die "$1 has no usr/lib/uml/modules/<version>/; the package layout changed."
}

finish() {
  touch "$1.tmp/.complete"
  rm -rf "$1"
  mv "$1.tmp" "$1"
}

# download DIR APT-ARGS... -- PKG...: apt-get download into DIR (as root apt warns that
# the _apt user cannot write there, which is harmless).
download() {
  local dir=$1
  shift
  (cd "$dir" && apt-get download -qq "$@" 2>&1 | grep -v -i 'unsandboxed' >&2 || true)
}

# candidate [APT-ARGS...]: the user-mode-linux version apt would take ("" when none).
candidate() {
  local v
  v=$(apt-cache "$@" policy user-mode-linux 2>/dev/null | awk '/Candidate:/ {print $2}')
  [ "$v" = "(none)" ] || echo "$v"
}

# The machine's own suite.
own() {
  local version dest work deb
  version=$(candidate)
  if [ -z "$version" ]; then
    log "user-mode-linux not in the package lists; running apt-get update"
    apt-get update -qq
    version=$(candidate)
  fi
  if [ -z "$version" ]; then
    log "apt cannot find user-mode-linux in this machine's sources (/etc/apt/sources.list*)"
    return 1
  fi
  # Package versions may hold ':' (epochs); keep the folder name plain.
  dest="$root/uml/${version//:/_}"
  if ! [ -f "$dest/.complete" ]; then
    log "unpacking user-mode-linux $version into $dest"
    work=$(mktemp -d "$root/uml/.download.XXXXXX")
    download "$work" "user-mode-linux=$version"
    deb=$(ls "$work"/user-mode-linux_*.deb 2>/dev/null | head -n1)
    [ -n "$deb" ] || die "apt-get download user-mode-linux=$version produced no .deb; check access to the Debian mirror."
    unpack "$dest" "$deb"
    finish "$dest"
    rm -rf "$work"
  fi
  has_nat "$dest" && boots "$dest" && echo "$dest"
}

# has_nat DIR: the unpacked package's kernel config has IPv4 NAT, in nft or in
# x_tables (the agent takes whichever the kernel has).
has_nat() {
  local cfg=$1/usr/share/doc/user-mode-linux/config.gz
  [ -f "$cfg" ] || { log "$(basename "$1") carries no config.gz; assuming it has NAT"; return 0; }
  if zgrep -q '^CONFIG_IP_NF_NAT=[ym]' "$cfg" ||
     { zgrep -q '^CONFIG_NF_TABLES_IPV4=y' "$cfg" && zgrep -q '^CONFIG_NFT_NAT=[ym]' "$cfg"; }; then
    return 0
  fi
  log "$(basename "$1") has no IPv4 NAT (neither CONFIG_IP_NF_NAT nor nft's)"
  return 1
}

# build: a kernel from Debian unstable's linux-source with uml.config.
build() {
  local mirror lists apt version pkg hash dest work src tool kver line missing=()
  for tool in make gcc flex bison bc xz depmod; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] ||
    die "building the UML kernel needs ${missing[*]}; run hack/setup.sh packages (as root) or install flex bison bc xz-utils kmod."
  hash=$(sha256sum "$here/uml.config" | cut -c1-12)
  # A kernel built earlier from this uml.config serves, whatever unstable now holds:
  # a newer source would mean an 8-minute build in the middle of some test run.
  for dest in "$root"/uml/built-*-"$hash"; do
    if [ -f "$dest/.complete" ] && boots "$dest"; then
      echo "$dest"
      return 0
    fi
  done
  mirror=$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' /etc/apt/sources.list.d/*.sources \
    /etc/apt/sources.list 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  lists="$root/uml/apt-sid"
  mkdir -p "$lists/lists/partial" "$lists/cache/archives/partial"
  echo "deb $mirror sid main" > "$lists/sources.list"
  apt=(-o "Dir::Etc::sourcelist=$lists/sources.list" -o "Dir::Etc::sourceparts=-"
       -o "Dir::State::Lists=$lists/lists" -o "Dir::Cache=$lists/cache")
  # The lists are read only here; refresh them when a day old (sid moves, old debs go).
  # apt keeps them compressed (..._Packages.lz4): match any suffix, or every run updates.
  if [ -z "$(find "$lists/lists" -name '*_Packages*' -mmin -1440 2>/dev/null)" ]; then
    log "reading Debian unstable's package lists from $mirror"
    apt-get "${apt[@]}" update -qq || die "apt-get update of Debian unstable ($mirror sid) failed."
  fi
  version=$(apt-cache "${apt[@]}" policy linux-source 2>/dev/null | awk '/Candidate:/ {print $2}')
  pkg=$(apt-cache "${apt[@]}" depends linux-source 2>/dev/null | awk '/Depends: linux-source-/ {print $2; exit}')
  [ -n "$version" ] && [ "$version" != "(none)" ] && [ -n "$pkg" ] ||
    die "Debian unstable has no linux-source package (its lists: $lists)."
  dest="$root/uml/built-${version//:/_}-$hash"
  if ! [ -f "$dest/.complete" ]; then
    log "building a UML kernel from $pkg $version with uml.config into $dest (5-8 min)"
    work=$(mktemp -d "$root/uml/.build.XXXXXX")
    download "$work" "${apt[@]}" "$pkg=$version"
    ls "$work/${pkg}_"*.deb >/dev/null 2>&1 || die "apt-get download $pkg=$version produced no .deb; check access to $mirror."
    dpkg-deb --fsys-tarfile "$work/${pkg}_"*.deb | tar -x -C "$work" --wildcards './usr/src/linux-source-*.tar.xz'
    tar -xJf "$work"/usr/src/linux-source-*.tar.xz -C "$work"
    src=$(ls -d "$work"/linux-source-*/ | head -n1)
    (
      cd "$src"
      make ARCH=um defconfig
      ./scripts/kconfig/merge_config.sh -m .config "$here/uml.config"
      make ARCH=um olddefconfig
    ) > "$work/config.log" 2>&1 || die "configuring the UML kernel failed; see $work/config.log"
    # olddefconfig silently drops what the fragment asks for and Kconfig refuses.
    while read -r line; do
      grep -qx "$line" "$src/.config" || die "uml.config asks for $line but $pkg $version's Kconfig dropped it (renamed, or a dependency missing); fix uml.config."
    done < <(grep -E '^CONFIG_' "$here/uml.config")
    rm -rf "$dest.tmp"
    mkdir -p "$dest.tmp/usr/bin" "$dest.tmp/mods"
    if ! make -C "$src" ARCH=um -j"$(nproc)" linux modules > "$work/build.log" 2>&1 ||
       ! make -C "$src" ARCH=um modules_install INSTALL_MOD_PATH="$dest.tmp/mods" >> "$work/build.log" 2>&1; then
      die "building the UML kernel failed; the end of $work/build.log: $(tail -n 5 "$work/build.log")"
    fi
    install -m 755 "$src/linux" "$dest.tmp/usr/bin/linux.uml"
    kver=$(ls "$dest.tmp/mods/lib/modules")
    mkdir -p "$dest.tmp/usr/lib/uml/modules" "$dest.tmp/usr/share/doc/user-mode-linux"
    mv "$dest.tmp/mods/lib/modules/$kver" "$dest.tmp/usr/lib/uml/modules/$kver"
    # Links into the build tree, which goes away below.
    rm -f "$dest.tmp/usr/lib/uml/modules/$kver/build" "$dest.tmp/usr/lib/uml/modules/$kver/source"
    rm -rf "$dest.tmp/mods"
    # The same place as the package's: what has_nat and a reader look for.
    gzip -c "$src/.config" > "$dest.tmp/usr/share/doc/user-mode-linux/config.gz"
    finish "$dest"
    rm -rf "$work"
  fi
  boots "$dest" && echo "$dest"
}

# UML keeps guest memory in a file under /dev/shm and executes from it; on a noexec mount every
# kernel fails its boot probe, so say so instead of marking good kernels as failing here.
if awk '$2 == "/dev/shm" && $4 ~ /(^|,)noexec(,|$)/ {found=1} END {exit !found}' /proc/mounts; then
  die "/dev/shm is mounted noexec, and UML guests execute their memory from it: remount it (mount -o remount,exec /dev/shm), or in a container give it --tmpfs /dev/shm:rw,exec"
fi

if [ -z "${SVCPROXY_UML_BUILD:-}" ] && own; then
  exit 0
fi
build || die "the UML kernel built here does not boot on this host (kernel $host); see the lines above."
