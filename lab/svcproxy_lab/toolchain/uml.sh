#!/usr/bin/env bash
# Unpacks a Debian user-mode-linux kernel (linux.uml, with IPVS and every
# scheduler as modules) into a cache folder keyed by the package version,
# without installing it system-wide, and checks that it boots on this host.
# Called by hack/setup.sh; the lab's UML guests (lab/svcproxy_lab/uml.py) read
# the folder it prints.
#
# Which kernel: the machine's own suite's package first (Debian 12: 6.1). Some
# hosts cannot run it: on one 6.18 host with AMX, UML 6.1 (and 6.12) died
# starting init ("userspace - ptrace set fp regs failed, errno = 14"), while
# 7.2 boots. Then Debian unstable's package is used, with that suite's glibc
# beside it (the host's is too old for it) and its ELF interpreter and library
# path pointed there by patchelf. Each kernel is boot-checked once per host
# kernel release (a marker in its folder).
#
# Usage: uml.sh [CACHE_ROOT]   (default: ${XDG_CACHE_HOME:-$HOME/.cache}/svcproxy)
# Quick when a checked version is already unpacked. Prints the folder on its last line:
#   <folder>/usr/bin/linux.uml, <folder>/usr/lib/uml/modules/<kernel version>/
# SVCPROXY_UML_SUITE=sid forces the unstable kernel (to try it on any host).
set -euo pipefail

root=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/svcproxy}
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
  boots "$dest" && echo "$dest"
}

# Debian unstable's kernel, with that suite's glibc beside it.
unstable() {
  local mirror lists apt version dest work libdir
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
  version=$(candidate "${apt[@]}")
  [ -n "$version" ] || die "Debian unstable has no user-mode-linux package."
  dest="$root/uml/${version//:/_}-sid"
  if ! [ -f "$dest/.complete" ]; then
    log "unpacking user-mode-linux $version (Debian unstable) and its glibc into $dest"
    work=$(mktemp -d "$root/uml/.download.XXXXXX")
    download "$work" "${apt[@]}" "user-mode-linux=$version" libc6
    command -v patchelf >/dev/null || download "$work" patchelf
    unpack "$dest" "$work"/user-mode-linux_*.deb "$work"/libc6_*.deb
    local patchelf
    patchelf=$(command -v patchelf || true)
    if [ -z "$patchelf" ]; then
      mkdir -p "$work/pe" && dpkg-deb -x "$work"/patchelf_*.deb "$work/pe"
      patchelf="$work/pe/usr/bin/patchelf"
    fi
    # The final folder's path, not .tmp's: the interpreter path is absolute.
    libdir="$dest/usr/lib/x86_64-linux-gnu"
    [ -x "$dest.tmp/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ] || die "libc6 of Debian unstable has no ld-linux-x86-64.so.2."
    "$patchelf" --set-interpreter "$libdir/ld-linux-x86-64.so.2" --set-rpath "$libdir" "$dest.tmp/usr/bin/linux.uml"
    finish "$dest"
    rm -rf "$work"
  fi
  boots "$dest" && echo "$dest"
}

if [ "${SVCPROXY_UML_SUITE:-}" != sid ] && own; then
  exit 0
fi
log "trying Debian unstable's user-mode-linux"
unstable || die "no user-mode-linux kernel boots on this host (kernel $host); see the lines above."
