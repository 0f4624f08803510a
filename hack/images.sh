#!/usr/bin/env bash
# Builds every image the kind cluster runs, with no registry: Debian bookworm bases made by
# mmdebstrap, svcproxy's operator and agent (the Dockerfile's targets FROM the Python base),
# the control-plane, CoreDNS and pause images kubeadm asks for, agnhost for the e2e tests,
# and the kind node image. Each image carries a label with the hash of its inputs and is
# rebuilt only when they change, so a warm run takes seconds.
# Usage: hack/images.sh   (the last line names the svcproxy image tag, e.g. dev-0123abcd4567)
#        hack/images.sh conformance   also the upstream conformance suite's other images
#                                     (glibc-dns-testing, nginx; hack/conformance.sh)
set -euo pipefail
case ${1:-} in ''|conformance) ;; *) echo "usage: hack/images.sh [conformance]" >&2; exit 2 ;; esac
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
. hack/lib.sh

bash hack/docker.sh
export DOCKER_BUILDKIT=0   # the classic builder: no buildx plugin needed
bash hack/setup.sh packages   # mmdebstrap among them

toolchain=lab/svcproxy_lab/toolchain/build.sh
bin=$(bash "$toolchain" | tail -n 1)
eval "$(grep -E '^(K8S|ETCD|KIND|COREDNS|PAUSE)_VERSION=' "$toolchain")"
kind_bin=$(dirname "$bin")/../kind-${KIND_VERSION}_coredns-${COREDNS_VERSION}_pause-${PAUSE_VERSION}_k8s-${K8S_VERSION}/bin
kind_bin=$(cd "$kind_bin" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

hash_of() { cat "$@" | sha256sum | cut -c1-16; }
key_of() { docker image inspect -f '{{index .Config.Labels "io.svcproxy.key"}}' "$1" 2>/dev/null || true; }

# stale TAG KEY: true when TAG is missing or was built from other inputs than KEY says.
stale() { [ "$(key_of "$1")" != "$2" ]; }

# build_image TAG KEY ARGS...: docker build with the key as a label. The classic builder's
# deprecation notice is noise here; the build's own errors are shown when it fails.
build_image() {
  local tag=$1 key=$2; shift 2
  log "building $tag"
  if ! docker build -q --force-rm --label "io.svcproxy.key=$key" -t "$tag" "$@" \
      >/dev/null 2>"$work/build.err"; then
    grep -v -e 'DEPRECATED: The legacy builder' -e 'BuildKit is currently disabled' \
      -e 'Install the buildx component' -e 'https://docs.docker.com/go/buildx' "$work/build.err" >&2
    return 1
  fi
}

# base NAME PACKAGES: a bookworm rootfs by mmdebstrap, from this machine's apt sources.
base() {
  local tag="svcproxy-base/$1:bookworm" pkgs=$2 key
  key=$(echo "bookworm $pkgs" | sha256sum | cut -c1-16)
  stale "$tag" "$key" || return 0
  log "making the $1 base with mmdebstrap ($pkgs)"
  local sources
  mapfile -t sources < <(apt_sources)
  mmdebstrap --quiet --variant=apt --include="$pkgs" bookworm "$work/$1.tar" "${sources[@]}"
  docker import --change "LABEL io.svcproxy.key=$key" "$work/$1.tar" "$tag" >/dev/null
  rm -f "$work/$1.tar"
}

base python python3,python3-venv,ca-certificates
base tools iptables,nftables,conntrack,iproute2,curl,dnsutils,netcat-openbsd,iperf,bash,ca-certificates
base node systemd,systemd-sysv,dbus,containerd,runc,containernetworking-plugins,iptables,nftables,conntrack,iproute2,ethtool,socat,util-linux,mount,kmod,procps,ca-certificates,bash,curl

# svcproxy: keyed by everything the Dockerfile copies.
src_key=$( (git ls-files -co --exclude-standard -- Dockerfile pyproject.toml README.md operator \
  | LC_ALL=C sort | xargs sha256sum; key_of svcproxy-base/python:bookworm) | sha256sum | cut -c1-12)
tag=dev-$src_key
if stale "svcproxy-operator:$tag" "$src_key" || stale "svcproxy-agent:$tag" "$src_key"; then
  # Wheels are made here, where pip is set up for this machine's index; the image build
  # then installs them with no network.
  ctx=$work/svcproxy
  mkdir -p "$ctx"
  git ls-files -co --exclude-standard -- Dockerfile .dockerignore pyproject.toml README.md operator \
    | tar -cf - -T - | tar -xf - -C "$ctx"
  log "making the svcproxy wheels"
  mkdir -p "$ctx/operator/.wheels"
  python3 -m pip wheel -q --wheel-dir "$ctx/operator/.wheels" "$ctx" >&2
  for target in operator agent; do
    build_image "svcproxy-$target:$tag" "$src_key" --network host --target "$target" \
      --build-arg PYTHON_IMAGE=svcproxy-base/python:bookworm \
      --build-arg "PIP_INSTALL=--no-index --find-links /src/operator/.wheels svcproxy" "$ctx"
  done
fi

# One binary per image, as kubeadm's manifests name them.
binary_image() {
  local tag=$1 base=$2 binary=$3 dir=$work/$3 key
  key=$(hash_of "$4/$binary" hack/images/binary.Dockerfile; key_of "$base")
  stale "$tag" "$key" || return 0
  mkdir -p "$dir" && cp "$4/$binary" hack/images/binary.Dockerfile "$dir/"
  build_image "$tag" "$key" -f "$dir/binary.Dockerfile" --build-arg "BASE=$base" \
    --build-arg "BINARY=$binary" "$dir"
}
reg=registry.k8s.io
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  binary_image "$reg/$c:$K8S_VERSION" scratch "$c" "$bin"
done
binary_image "$reg/kube-proxy:$K8S_VERSION" svcproxy-base/tools:bookworm kube-proxy "$bin"
binary_image "$reg/etcd:${ETCD_VERSION#v}-0" scratch etcd "$bin"

# CoreDNS and pause run from /: their images' entry points are the binaries themselves.
root_image() {
  local tag=$1 binary=$2 dir=$work/root-$2 key
  key=$(hash_of "$kind_bin/$binary")
  stale "$tag" "$key" || return 0
  mkdir -p "$dir" && cp "$kind_bin/$binary" "$dir/"
  printf 'FROM scratch\nCOPY %s /%s\nENTRYPOINT ["/%s"]\n' "$binary" "$binary" "$binary" > "$dir/Dockerfile"
  build_image "$tag" "$key" "$dir"
}
root_image "$reg/coredns/coredns:$COREDNS_VERSION" coredns
root_image "$reg/pause:$PAUSE_VERSION" pause

# agnhost, with the porter's test certificate from the k8s.io/kubernetes module.
agn=$work/agnhost
eval "$(bash "$toolchain" --go-env)"   # the Go build.sh builds with, maybe off PATH
# `go mod download`, not `go list -m`: the module cache may have been cleaned since the
# binaries were built and cached, and `go list -m` then prints an empty directory.
k8s_dir=$(cd lab/svcproxy_lab/toolchain/kubernetes && GOFLAGS=-mod=mod go mod download -json k8s.io/kubernetes \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -d "$k8s_dir" ] || { echo "images.sh: cannot get the k8s.io/kubernetes module source" >&2; exit 1; }
porter=$k8s_dir/test/images/agnhost/porter
agn_key=$(hash_of "$kind_bin/agnhost" "$kind_bin/coredns" "$porter/localhost.crt" hack/images/agnhost.Dockerfile; key_of svcproxy-base/tools:bookworm)
if stale "$reg/e2e-test-images/agnhost:2.63.0" "$agn_key"; then
  mkdir -p "$agn"
  cp "$kind_bin/agnhost" "$kind_bin/coredns" "$porter/localhost.crt" "$porter/localhost.key" "$agn/"
  build_image "$reg/e2e-test-images/agnhost:2.63.0" "$agn_key" -f hack/images/agnhost.Dockerfile \
    --build-arg BASE=svcproxy-base/tools:bookworm "$agn"
fi

# The conformance specs' other images, named as e2e.test v1.36 names them
# (test/utils/image/manifest.go): the DNS specs' glibc prober, and the EndpointSlice specs' nginx.
if [ "${1:-}" = conformance ]; then
  base nginx nginx,ca-certificates
  e2e=$reg/e2e-test-images
  dns_key=$(hash_of "$kind_bin/coredns" hack/images/glibc-dns-testing.Dockerfile; key_of svcproxy-base/tools:bookworm)
  if stale "$e2e/glibc-dns-testing:2.0.0" "$dns_key"; then
    mkdir -p "$work/glibc-dns" && cp "$kind_bin/coredns" "$work/glibc-dns/"
    build_image "$e2e/glibc-dns-testing:2.0.0" "$dns_key" -f hack/images/glibc-dns-testing.Dockerfile \
      --build-arg BASE=svcproxy-base/tools:bookworm "$work/glibc-dns"
  fi
  nginx_key=$(hash_of hack/images/nginx.Dockerfile; key_of svcproxy-base/nginx:bookworm)
  if stale "$e2e/nginx:1.15-4" "$nginx_key"; then
    mkdir -p "$work/nginx"
    build_image "$e2e/nginx:1.15-4" "$nginx_key" -f hack/images/nginx.Dockerfile \
      --build-arg BASE=svcproxy-base/nginx:bookworm "$work/nginx"
  fi
fi

# The node image: the control-plane images saved into it, imported by containerd at boot.
node_images=("$reg/kube-apiserver:$K8S_VERSION" "$reg/kube-controller-manager:$K8S_VERSION"
  "$reg/kube-scheduler:$K8S_VERSION" "$reg/kube-proxy:$K8S_VERSION" "$reg/etcd:${ETCD_VERSION#v}-0"
  "$reg/coredns/coredns:$COREDNS_VERSION" "$reg/pause:$PAUSE_VERSION")
node_key=$( (for i in "${node_images[@]}" svcproxy-base/node:bookworm; do key_of "$i"; done
  find hack/images/node -type f | LC_ALL=C sort | xargs sha256sum
  sha256sum "$kind_bin/kubelet" "$kind_bin/kubeadm" "$bin/kubectl") | sha256sum | cut -c1-16)
node_tag=svcproxy/kind-node:$K8S_VERSION
if stale "$node_tag" "$node_key"; then
  ctx=$work/node
  mkdir -p "$ctx/bin" "$ctx/images"
  cp -r hack/images/node/files hack/images/node/Dockerfile "$ctx/"
  cp "$kind_bin/kubelet" "$kind_bin/kubeadm" "$bin/kubectl" "$ctx/bin/"
  docker save -o "$ctx/images/control-plane.tar" "${node_images[@]}"
  build_image "$node_tag" "$node_key" --build-arg BASE=svcproxy-base/node:bookworm \
    --build-arg "K8S_VERSION=$K8S_VERSION" "$ctx"
fi
# What a rebuild left: untagged images of ours and svcproxy tags of earlier sources.
docker image prune -f --filter "label=io.svcproxy.key" >/dev/null
for repo_ in svcproxy-operator svcproxy-agent; do keep_only_tag "$repo_" "$repo_:$tag"; done
echo "$tag"
