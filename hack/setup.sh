#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine, and is
# quick when everything is already there:
#   - Debian packages (Python's venv, a C compiler for the pause binary, network
#     tools, netfilter, ipvsadm, UML helpers, mmdebstrap for the kind images,
#     and what building a UML kernel needs where no packaged one serves);
#   - Go, when this machine has none at least as new as the one build.sh pins:
#     Debian's backported Go (bookworm-backports, added as an apt source if
#     absent), with which build.sh fetches the pinned release from the Go module
#     proxy (GOTOOLCHAIN);
#   - the lab's Kubernetes, etcd, helm and kubeconform binaries, built from Go
#     modules into a cache folder keyed by version (minutes when cold);
#   - the user-mode-linux kernel with IPVS and NAT, unpacked or built into the
#     same cache (toolchain/uml.sh).
# Usage: hack/setup.sh            all of it (as root)
#        hack/setup.sh packages   only the Debian packages: what `make venv` needs
#                                 first; needs root only when something is missing
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
case $mode in all|packages) ;; *) echo "usage: hack/setup.sh [packages]" >&2; exit 2 ;; esac
log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
is_root() { [ "$(id -u)" = 0 ]; }
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ "$mode" = all ] && ! is_root; then
  echo "setup: must run as root (network namespaces, netfilter, user-mode-linux)." >&2
  exit 2
fi

# mount: the UML guests' init mounts /proc and the rest with it, and bookworm does not count
# it as Essential (a bare rootfs lacks it). git: hack/images.sh lists its sources with it.
packages=(iproute2 iptables nftables ipvsadm ipset conntrack kmod busybox-static slirp procps psmisc mount git
  gcc libc6-dev make flex bison bc xz-utils mmdebstrap)
# One dpkg-query for all of them: the packages not installed (unknown ones print nothing).
installed=$(dpkg-query -W -f='${Package} ${Status}\n' "${packages[@]}" 2>/dev/null \
  | awk '/ install ok installed$/ {print $1}' || true)
missing=()
for p in "${packages[@]}"; do
  grep -qx "$p" <<<"$installed" || missing+=("$p")
done
# The Python the Makefile makes its venv with ($PY, python3 by default) needs venv and
# ensurepip; Debian's python3 has them only with python3-venv.
py=${PY:-python3}
py_missing=()
if ! command -v "$py" >/dev/null || ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
  py_missing=(python3 python3-venv)
fi
if [ $(( ${#missing[@]} + ${#py_missing[@]} )) -gt 0 ]; then
  if ! is_root; then
    if [ ${#py_missing[@]} -gt 0 ]; then
      echo "setup: $py cannot make a virtualenv; as root: apt-get install python3 python3-venv (or run hack/setup.sh packages)." >&2
      exit 2
    fi
    log "not root, so not installing ${missing[*]} (the dataplane, e2e tests and the demo need them)"
  else
    log "installing Debian packages: ${py_missing[*]} ${missing[*]}"
    apt-get update -qq
    apt_install "${py_missing[@]}" "${missing[@]}"
  fi
fi
[ "$mode" = packages ] && exit 0

# A Go new enough for build.sh, or one that can fetch the pinned release for it.
toolchain=lab/svcproxy_lab/toolchain/build.sh
if ! bash "$toolchain" --go-env >/dev/null 2>&1; then
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  backports=$codename-backports
  apt-cache policy 2>/dev/null | grep -q " $codename/main " || apt-get update -qq
  if ! apt-cache policy 2>/dev/null | grep -q " $backports/main "; then
    # The mirror this machine already takes Debian main from.
    mirror=$(apt-cache policy 2>/dev/null | awk -v s="$codename/main" '$3 == s {print $2; exit}')
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    log "adding the apt source $mirror $backports main (for Debian's backported Go)"
    echo "deb $mirror $backports main" > /etc/apt/sources.list.d/svcproxy-backports.list
    apt-get update -qq
  fi
  # The newest golang-1.N-go that apt offers: 1.21 and later can fetch another release.
  pkg=$(apt-cache pkgnames golang-1. 2>/dev/null | grep -xE 'golang-1\.[0-9]+-go' | sort -V | tail -n 1)
  if [ -z "$pkg" ]; then
    echo "setup: apt offers no golang-1.N-go package (not even in $backports); install Go >= $(sed -n 's/^GO_VERSION=//p' "$toolchain") and retry." >&2
    exit 2
  fi
  log "installing $pkg (a bootstrap: build.sh fetches the pinned Go with it)"
  apt_install "$pkg"
  bash "$toolchain" --go-env >/dev/null
fi

bash lab/svcproxy_lab/toolchain/build.sh >/dev/null
if [ -f lab/svcproxy_lab/toolchain/uml.sh ]; then
  bash lab/svcproxy_lab/toolchain/uml.sh >/dev/null
fi
