#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine, and is
# quick when everything is already there:
#   - Debian packages (network tools, netfilter, ipvsadm, UML helpers);
#   - the lab's Kubernetes, etcd, helm and kubeconform binaries, built from Go
#     modules into a cache folder keyed by version (minutes when cold);
#   - the user-mode-linux kernel with IPVS, unpacked into the same cache.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "setup: must run as root (network namespaces, netfilter, user-mode-linux)." >&2
  exit 2
fi

packages=(iproute2 iptables nftables ipvsadm ipset conntrack kmod busybox-static slirp procps psmisc)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

bash lab/svcproxy_lab/toolchain/build.sh >/dev/null
if [ -f lab/svcproxy_lab/toolchain/uml.sh ]; then
  bash lab/svcproxy_lab/toolchain/uml.sh >/dev/null
fi
