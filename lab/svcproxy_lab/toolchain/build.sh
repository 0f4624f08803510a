#!/usr/bin/env bash
# Builds the lab's real upstream binaries from Go modules into a cache folder
# keyed by version, so later runs (and CI on the same machine) reuse them:
#   kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl
#   etcd helm kubeconform
# and, for the kind cluster (hack/images.sh, hack/kind.sh): kubelet, kubeadm, agnhost (the
# e2e test image), coredns, kind, and the pause binary (C, from the k8s.io/kubernetes module).
# Usage: build.sh [CACHE_ROOT]   (default: ${XDG_CACHE_HOME:-$HOME/.cache}/svcproxy)
# Prints the bin folder on its last line.
set -euo pipefail

K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.19.0
KUBECONFORM_VERSION=v0.7.0
KIND_VERSION=v0.33.0
COREDNS_VERSION=v1.14.2
PAUSE_VERSION=3.10.2

here=$(cd "$(dirname "$0")" && pwd)
root=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/svcproxy}
key="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}_kubeconform-${KUBECONFORM_VERSION}"
# The kind part has a folder of its own, so adding it leaves the lab's binaries where they are.
kind_key="kind-${KIND_VERSION}_coredns-${COREDNS_VERSION}_pause-${PAUSE_VERSION}_k8s-${K8S_VERSION}"
kind_bin="$root/toolchain/$kind_key/bin"
bin="$root/toolchain/$key/bin"
mkdir -p "$bin" "$kind_bin"

log() { printf '[toolchain %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# build MODULE_DIR OUTPUT PACKAGE LDFLAGS: one binary, skipped when present. OUTPUT is a
# name in the lab's bin folder or a path.
build() {
  local dir=$1 out=$2 pkg=$3 ldflags=$4
  case $out in /*) ;; *) out=$bin/$out ;; esac
  if [ -x "$out" ]; then return 0; fi
  # Go is needed only when something is missing: a filled cache works without it.
  command -v go >/dev/null || {
    echo "build.sh: Go is not installed and $out is not built yet; the lab builds Kubernetes from Go modules. Install Go >= 1.26 (https://go.dev/dl/) and retry." >&2
    exit 2
  }
  log "building $out ($pkg); a cold build takes minutes"
  local start=$SECONDS
  (cd "$here/$dir" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$out.tmp" "$pkg")
  mv "$out.tmp" "$out"
  log "built ${out##*/} in $((SECONDS - start)) s"
}

minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
stamp=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  stamp+=" -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.gitTreeState=clean"
  stamp+=" -X $p.buildDate=1970-01-01T00:00:00Z"
done
k8s_flags="-s -w$stamp"

for cmd in kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl; do
  build kubernetes "$cmd" "k8s.io/kubernetes/cmd/$cmd" "$k8s_flags"
done
build etcd etcd go.etcd.io/etcd/server/v3 "-s -w"
build helm helm helm.sh/helm/v3/cmd/helm \
  "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
build helm kubeconform github.com/yannh/kubeconform/cmd/kubeconform "-s -w"

# The kind node's and the e2e image's binaries.
for cmd in kubelet kubeadm; do
  build kubernetes "$kind_bin/$cmd" "k8s.io/kubernetes/cmd/$cmd" "$k8s_flags"
done
build kubernetes "$kind_bin/agnhost" k8s.io/kubernetes/test/images/agnhost "-s -w"
build kind "$kind_bin/kind" sigs.k8s.io/kind "-s -w"
build kind "$kind_bin/coredns" github.com/coredns/coredns "-s -w"
if [ ! -x "$kind_bin/pause" ]; then
  # pause.c is upstream's, read from the module cache the kubernetes build filled.
  src=$(cd "$here/kubernetes" && GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
  gcc -Os -Wall -static -DVERSION="v$PAUSE_VERSION" -o "$kind_bin/pause.tmp" "$src"
  strip "$kind_bin/pause.tmp" && mv "$kind_bin/pause.tmp" "$kind_bin/pause"
  log "built pause $PAUSE_VERSION"
fi

echo "$bin"
