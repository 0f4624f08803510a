#!/usr/bin/env bash
# Builds the lab's real upstream binaries from Go modules into a cache folder
# keyed by version, so later runs (and CI on the same machine) reuse them:
#   kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl
#   etcd helm kubeconform
# and, for the kind cluster (hack/images.sh, hack/kind.sh): kubelet, kubeadm, agnhost (the
# e2e test image), coredns, kind, and the pause binary (C, from the k8s.io/kubernetes module).
# Usage: build.sh [CACHE_ROOT]   (default: ${XDG_CACHE_HOME:-$HOME/.cache}/svcproxy)
# Prints the bin folder on its last line.
#        build.sh --e2e [CACHE_ROOT]
#                                  builds only the upstream conformance suite, e2e.test
#                                  (`go test -c k8s.io/kubernetes/test/e2e`, for
#                                  hack/conformance.sh), into a folder of its own keyed by
#                                  K8S_VERSION, and prints the binary's path on its last line
#        build.sh --go-env         prints shell lines that put the Go it builds with first on
#                                  PATH (eval them); exit 3 when this machine has no usable Go
#
# Go: the first of `go` on PATH, /usr/local/go and Debian's /usr/lib/go-1.N that is at least
# GO_VERSION builds as it is. Otherwise any Go >= 1.21 found there (hack/setup.sh installs
# Debian's backported one on a machine without) builds with GOTOOLCHAIN=go$GO_VERSION: the go
# command fetches that release from the Go module proxy once and runs it.
set -euo pipefail

K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.19.0
KUBECONFORM_VERSION=v0.7.0
KIND_VERSION=v0.33.0
COREDNS_VERSION=v1.14.2
PAUSE_VERSION=3.10.2
GO_VERSION=1.26.8

here=$(cd "$(dirname "$0")" && pwd)

# version_ge A B: dotted version A is B or later.
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }
# The Go release a go binary is, without letting it switch to another toolchain.
go_release() { (cd / && GOTOOLCHAIN=local "$1" env GOVERSION 2>/dev/null) | sed -n 's/^go\([0-9][0-9.]*\).*/\1/p'; }

# pick_go: sets GO_BIN (and GO_SWITCH=1 when it must fetch GO_VERSION); false when none fits.
pick_go() {
  local g v fallback=""
  GO_SWITCH=0
  for g in "$(command -v go || true)" /usr/local/go/bin/go $(ls -d /usr/lib/go-1.*/bin/go 2>/dev/null | sort -rV); do
    [ -n "$g" ] && [ -x "$g" ] || continue
    v=$(go_release "$g")
    [ -n "$v" ] || continue
    if version_ge "$v" "$GO_VERSION"; then GO_BIN=$g; return 0; fi
    # 1.21 is the first go command that can fetch and run another release.
    if [ -z "$fallback" ] && version_ge "$v" 1.21; then fallback=$g; fi
  done
  [ -n "$fallback" ] || return 1
  GO_BIN=$fallback GO_SWITCH=1
}

# go_env: the Go to build with, first on PATH, for this script and its callers' eval.
go_env() {
  if ! pick_go; then
    echo "build.sh: no Go >= 1.21 on this machine, and the lab builds Kubernetes from Go modules with Go $GO_VERSION; run hack/setup.sh as root (it installs Debian's backported Go, which fetches $GO_VERSION), or install Go >= $GO_VERSION, and retry." >&2
    return 3
  fi
  printf 'export PATH=%q:"$PATH"\n' "$(dirname "$GO_BIN")"
  if [ "$GO_SWITCH" = 1 ]; then printf 'export GOTOOLCHAIN=go%s\n' "$GO_VERSION"; fi
}
if [ "${1:-}" = --go-env ]; then go_env; exit; fi
# e2e.test is large (a cold build takes several times kube-apiserver's): built only when asked.
only_e2e=0
if [ "${1:-}" = --e2e ]; then only_e2e=1; shift; fi

# use_go: once, before the first go command; only when something must be built.
go_ready=0
use_go() {
  [ "$go_ready" = 0 ] || return 0
  pick_go || { go_env; exit 3; }
  PATH="$(dirname "$GO_BIN"):$PATH"
  if [ "$GO_SWITCH" = 1 ]; then
    export GOTOOLCHAIN=go$GO_VERSION
    log "$GO_BIN is older than Go $GO_VERSION: building with GOTOOLCHAIN=$GOTOOLCHAIN"
  fi
  go_ready=1
}

root=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/svcproxy}
key="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}_kubeconform-${KUBECONFORM_VERSION}"
# The kind part has a folder of its own, so adding it leaves the lab's binaries where they are.
kind_key="kind-${KIND_VERSION}_coredns-${COREDNS_VERSION}_pause-${PAUSE_VERSION}_k8s-${K8S_VERSION}"
kind_bin="$root/toolchain/$kind_key/bin"
bin="$root/toolchain/$key/bin"
e2e_key="conformance-k8s-${K8S_VERSION}"
e2e_bin="$root/toolchain/$e2e_key/bin"
mkdir -p "$bin" "$kind_bin"
# One build at a time per key: tests and scripts call this script concurrently, and two
# builds of one binary would race on its output file. The second waits, then finds it built.
# e2e.test has a key of its own: it neither waits for the lab's binaries nor holds them up.
lock_key=$key
[ "$only_e2e" = 1 ] && lock_key=$e2e_key
exec 9>"$root/toolchain/$lock_key.lock"
flock 9

log() { printf '[toolchain %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# build MODULE_DIR OUTPUT PACKAGE LDFLAGS [test]: one binary, skipped when present. OUTPUT
# is a name in the lab's bin folder or a path. With "test", the binary is PACKAGE's test
# binary (`go test -c`), as the e2e suite is.
build() {
  local dir=$1 out=$2 pkg=$3 ldflags=$4 how=(build)
  [ "${5:-}" = test ] && how=(test -c)
  case $out in /*) ;; *) out=$bin/$out ;; esac
  if [ -x "$out" ]; then return 0; fi
  # Go is needed only when something is missing: a filled cache works without it.
  use_go
  log "building $out ($pkg); a cold build takes minutes"
  local start=$SECONDS
  (cd "$here/$dir" && CGO_ENABLED=0 GOFLAGS=-mod=mod go "${how[@]}" -trimpath -ldflags "$ldflags" -o "$out.tmp.$$" "$pkg")
  mv "$out.tmp.$$" "$out"
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

if [ "$only_e2e" = 1 ]; then
  mkdir -p "$e2e_bin"
  build kubernetes "$e2e_bin/e2e.test" k8s.io/kubernetes/test/e2e "$k8s_flags" test
  echo "$e2e_bin/e2e.test"
  exit 0
fi

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
  use_go
  # download, not list: the module cache may have been cleaned since the last build.
  src=$(cd "$here/kubernetes" && GOFLAGS=-mod=mod go mod download -json k8s.io/kubernetes \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')/build/pause/linux/pause.c
  gcc -Os -Wall -static -DVERSION="v$PAUSE_VERSION" -o "$kind_bin/pause.tmp" "$src"
  strip "$kind_bin/pause.tmp" && mv "$kind_bin/pause.tmp" "$kind_bin/pause"
  log "built pause $PAUSE_VERSION"
fi

echo "$bin"
