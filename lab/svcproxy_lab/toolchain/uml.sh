#!/usr/bin/env bash
# Unpacks Debian's user-mode-linux kernel (linux.uml, with IPVS and every
# scheduler as modules) into a cache folder keyed by the package version,
# without installing it system-wide. Called by hack/setup.sh; the lab's UML
# guests (lab/svcproxy_lab/uml.py) read the folder it prints.
# Usage: uml.sh [CACHE_ROOT]   (default: ${XDG_CACHE_HOME:-$HOME/.cache}/svcproxy)
# Quick when the version is already unpacked. Prints the folder on its last line:
#   <folder>/usr/bin/linux.uml, <folder>/usr/lib/uml/modules/<kernel version>/
set -euo pipefail

root=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/svcproxy}
log() { printf '[uml %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

command -v apt-get >/dev/null || {
  echo "uml.sh: apt-get not found; the UML kernel comes from Debian's user-mode-linux package." >&2
  exit 2
}

version_of() { apt-cache policy user-mode-linux 2>/dev/null | awk '/Candidate:/ {print $2}'; }
version=$(version_of)
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
  log "user-mode-linux not in the package lists; running apt-get update"
  apt-get update -qq
  version=$(version_of)
fi
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
  echo "uml.sh: apt cannot find the Debian package user-mode-linux; check /etc/apt/sources.list (Debian main)." >&2
  exit 2
fi

# Package versions may hold ':' (epochs); keep the folder name plain.
dest="$root/uml/${version//:/_}"
if [ -x "$dest/usr/bin/linux.uml" ] && [ -f "$dest/.complete" ]; then
  echo "$dest"
  exit 0
fi

log "unpacking user-mode-linux $version into $dest"
mkdir -p "$root/uml"
work=$(mktemp -d "$root/uml/.download.XXXXXX")
trap 'rm -rf "$work"' EXIT
# apt-get download writes into the current folder; as root it warns that the
# _apt user cannot write there, which is harmless.
(cd "$work" && apt-get download -qq "user-mode-linux=$version" 2>&1 | grep -v -i 'unsandboxed' >&2 || true)
deb=$(ls "$work"/user-mode-linux_*.deb 2>/dev/null | head -n1)
if [ -z "$deb" ]; then
  echo "uml.sh: apt-get download user-mode-linux=$version produced no .deb; check network access to the Debian mirror." >&2
  exit 2
fi
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
dpkg-deb -x "$deb" "$dest.tmp"
test -x "$dest.tmp/usr/bin/linux.uml" || {
  echo "uml.sh: $deb has no usr/bin/linux.uml; the package layout changed." >&2
  exit 2
}
ls -d "$dest.tmp"/usr/lib/uml/modules/*/ >/dev/null 2>&1 || {
  echo "uml.sh: $deb has no usr/lib/uml/modules/<version>/; the package layout changed." >&2
  exit 2
}
touch "$dest.tmp/.complete"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
log "done"
echo "$dest"
