#!/usr/bin/env bash
# The svcproxy kind cluster on this machine, with nothing pulled from a registry:
#   hack/kind.sh up     build the images (hack/images.sh), create or reuse the 3-node cluster
#                       "svcproxy" (kube-proxy in nftables mode), write its CNI, load the
#                       images, helm install --wait the chart; the last line is the
#                       kubeconfig's path
#   hack/kind.sh down   delete the cluster and everything "up" made (network, routes, files)
#   hack/kind.sh load IMAGE...
#                       load images built here into every node of the running cluster
#   hack/kind.sh chart  helm upgrade --install --wait the chart again, with the images "up"
#                       last loaded (what `svcproxy demo --kind` runs first)
# The nodes sit on an internal Docker network: no default route, no masquerade, so no
# traffic from the cluster can leave the machine. The root namespace gets blackhole routes
# for the cluster's Pod and Service ranges while the cluster exists, and talks only to the
# API server's node address.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
log() { printf '[kind %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

cluster=${KIND_CLUSTER:-svcproxy}
network=svcproxy-kind
nft_table=svcproxy-kind   # drops what the nodes' bridge would forward elsewhere
subnet=172.31.250.0/24
config=tests/e2e/kind/kind-config.yaml
state=${XDG_CACHE_HOME:-$HOME/.cache}/svcproxy/kind
kubeconfig=$state/$cluster.kubeconfig
release=svcproxy
chart_ns=svcproxy-system
pod_cidr=10.245.0.0/16      # as in the kind config
service_cidr=10.97.0.0/16
blackholes=("$pod_cidr" "$service_cidr")
export KIND_EXPERIMENTAL_DOCKER_NETWORK=$network

toolchain() {
  local bin
  bin=$(bash lab/svcproxy_lab/toolchain/build.sh | tail -n 1)
  kind_dir=$(ls -d "$(dirname "$bin")"/../kind-*/bin | head -n 1)
  export PATH="$bin:$(cd "$kind_dir" && pwd):$PATH"
}

nodes() { kind get nodes --name "$cluster"; }
node_ip() { docker inspect -f "{{(index .NetworkSettings.Networks \"$network\").IPAddress}}" "$1"; }
kube() { kubectl --kubeconfig "$kubeconfig" "$@"; }

# CNI: every node gets a ptp config for its Pod CIDR and a route to every other node's.
# ptp routes all Pod traffic through the node, so netfilter sees every packet (hairpin too).
write_cni() {
  local node cidr ip other ocidr oip
  for node in $(nodes); do
    cidr=$(kube get node "$node" -o jsonpath='{.spec.podCIDR}')
    [ -n "$cidr" ] || { echo "kind.sh: node $node has no podCIDR yet" >&2; return 1; }
    docker exec -i "$node" sh -c 'cat > /etc/cni/net.d/10-svcproxy.conflist.tmp && mv /etc/cni/net.d/10-svcproxy.conflist.tmp /etc/cni/net.d/10-svcproxy.conflist' <<JSON
{
  "cniVersion": "0.4.0",
  "name": "svcproxy-kind",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "mtu": 1500,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$cidr"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
    # The nodes have no default route; a node's own connections to a ClusterIP (agents,
    # kube-proxy's peers on the host network) need a route before kube-proxy rewrites them.
    docker exec "$node" ip route replace "$service_cidr" dev eth0
    for other in $(nodes); do
      [ "$other" = "$node" ] && continue
      ocidr=$(kube get node "$other" -o jsonpath='{.spec.podCIDR}')
      oip=$(node_ip "$other")
      docker exec "$node" ip route replace "$ocidr" via "$oip"
    done
  done
}

up() {
  bash hack/docker.sh
  log "building images (hack/images.sh)"
  local tag
  tag=$(bash hack/images.sh | tail -n 1)
  toolchain
  mkdir -p "$state"
  echo "$tag" > "$state/image-tag"
  for cidr in "${blackholes[@]}"; do ip route replace blackhole "$cidr"; done
  # Nothing from the nodes' bridge is forwarded anywhere else (the nodes have no default
  # route either; this holds if one comes back). A table of its own, which down deletes
  # whole: a rule in iptables' FORWARD chain made iptables-nft create `table ip filter`
  # on a machine that had none, and deleting the rule left that table behind.
  nft -f - <<NFT
table ip $nft_table
delete table ip $nft_table
table ip $nft_table {
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "$network" oifname != "$network" drop
  }
}
NFT
  docker network inspect "$network" >/dev/null 2>&1 \
    || docker network create --internal --subnet "$subnet" \
       -o com.docker.network.bridge.name="$network" "$network" >/dev/null
  # Nodes left stopped (a reboot, an ended session) cannot be restarted cleanly: start over.
  if nodes | grep -q . && [ "$(docker inspect -f '{{.State.Running}}' "$cluster-control-plane" 2>/dev/null)" != true ]; then
    log "the cluster's nodes are not running: deleting them"
    kind delete cluster --name "$cluster" >&2
  fi
  if ! nodes | grep -q .; then
    log "creating the kind cluster $cluster"
    kind create cluster --name "$cluster" --config "$config" \
      --image "svcproxy/kind-node:$(grep -E '^K8S_VERSION=' lab/svcproxy_lab/toolchain/build.sh | cut -d= -f2)" \
      --kubeconfig "$kubeconfig.kind" >&2 || {
      # kind ends by exporting a kubeconfig through the published API port, which an
      # internal network does not have; the cluster itself is up if its nodes are.
      [ "$(docker inspect -f '{{.State.Running}}' "$cluster-control-plane" 2>/dev/null)" = true ] || exit 1
      log "kind could not write its kubeconfig (no published port here): using the node's address"
    }
  fi
  # The published API port does not reach an internal network: talk to the node's address.
  local ip
  ip=$(node_ip "$cluster-control-plane")
  kind get kubeconfig --internal --name "$cluster" | sed "s#server: https://.*#server: https://$ip:6443#" > "$kubeconfig"
  write_cni
  # CoreDNS answers for the cluster only: names outside it are not forwarded (nothing may
  # leave this machine, and the node's resolver, docker's 127.0.0.11, is CoreDNS's own
  # loopback inside its Pod: the loop plugin would stop it).
  if kube -n kube-system get cm coredns -o jsonpath='{.data.Corefile}' | grep -q 'forward \.'; then
    kube -n kube-system get cm coredns -o yaml \
      | sed -e '/forward \. \/etc\/resolv.conf/,/}/d' -e '/^ *loop$/d' \
      | kube replace -f - >&2
    kube -n kube-system rollout restart deploy/coredns >&2
  fi
  log "waiting for the nodes and CoreDNS"
  kube wait --for=condition=Ready node --all --timeout=180s >&2
  kube -n kube-system rollout status deploy/coredns --timeout=180s >&2
  log "loading images"
  kind load docker-image --name "$cluster" "svcproxy-operator:$tag" "svcproxy-agent:$tag" \
    registry.k8s.io/e2e-test-images/agnhost:2.63.0 >&2
  install_chart "$tag"
  echo "$kubeconfig"
}

# install_chart TAG: the chart with the operator and agent images of that tag, all Pods ready.
install_chart() {
  log "installing the chart"
  helm --kubeconfig "$kubeconfig" upgrade --install "$release" charts/svcproxy \
    --namespace "$chart_ns" --create-namespace --wait --timeout 5m \
    --set operator.image.repository=svcproxy-operator --set agent.image.repository=svcproxy-agent \
    --set image.tag="$1" --set image.pullPolicy=Never >&2
  # helm --wait counts a DaemonSet ready with maxUnavailable Pods missing: wait for all.
  kube -n "$chart_ns" rollout status ds/"$release"-agent --timeout=180s >&2
  kube -n "$chart_ns" rollout status deploy/"$release"-operator --timeout=180s >&2
}

# The chart again on the running cluster, without building or loading anything.
chart() {
  toolchain
  nodes 2>/dev/null | grep -q . && [ -s "$kubeconfig" ] && [ -s "$state/image-tag" ] \
    || { echo "kind.sh: the cluster $cluster is not up; run hack/kind.sh up (make kind-up) first" >&2; exit 1; }
  install_chart "$(cat "$state/image-tag")"
  echo "$kubeconfig"
}

down() {
  toolchain
  if nodes 2>/dev/null | grep -q .; then
    log "deleting the kind cluster $cluster"
    kind delete cluster --name "$cluster" >&2
  fi
  docker network rm "$network" >/dev/null 2>&1 || true
  nft delete table ip "$nft_table" 2>/dev/null || true
  # The FORWARD rule earlier versions of this script inserted (-D makes no table).
  while iptables -D FORWARD -i "$network" ! -o "$network" -j DROP 2>/dev/null; do :; done
  for cidr in "${blackholes[@]}"; do ip route del blackhole "$cidr" 2>/dev/null || true; done
  rm -f "$kubeconfig" "$kubeconfig.kind" "$state/image-tag"
}

load() {
  toolchain
  nodes 2>/dev/null | grep -q . || { echo "kind.sh: the cluster $cluster is not up; run hack/kind.sh up first" >&2; exit 1; }
  log "loading $*"
  kind load docker-image --name "$cluster" "$@" >&2
}

case ${1:-} in
  up) up ;;
  down) down ;;
  load) shift; [ $# -gt 0 ] || { echo "usage: hack/kind.sh load IMAGE..." >&2; exit 2; }; load "$@" ;;
  chart) chart ;;
  *) echo "usage: hack/kind.sh up|down|chart|load IMAGE..." >&2; exit 2 ;;
esac
