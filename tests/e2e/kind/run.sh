#!/usr/bin/env bash
# Run svcproxy's e2e suite on a kind cluster (for people with Docker):
# build both images, create the cluster (kube-proxy in nftables mode), load the images,
# then run tests/e2e against it via SVCPROXY_E2E_KUBECONFIG (the chart test installs the chart).
# Tests that need the svcproxy lab's own machinery (client network namespaces, lab
# processes) skip themselves there.
#
#   tests/e2e/kind/run.sh                 # everything, cluster deleted at the end
#   KEEP_CLUSTER=1 tests/e2e/kind/run.sh  # leave the cluster running
#   tests/e2e/kind/run.sh -k chart        # extra arguments go to pytest
#
# Needs: docker, kind, kubectl, helm (on PATH) and the repo's venv (make venv).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
cluster="${KIND_CLUSTER:-svcproxy}"
tag="${IMAGE_TAG:-e2e}"
kubeconfig="${KUBECONFIG_OUT:-$repo/.kind-$cluster.kubeconfig}"

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is not on PATH; install it first" >&2; exit 2; }
done
[ -x "$repo/.venv/bin/pytest" ] || { echo "run.sh: no venv; run 'make venv' first" >&2; exit 2; }

echo "== building images svcproxy-operator:$tag and svcproxy-agent:$tag"
docker build --target operator -t "svcproxy-operator:$tag" "$repo"
docker build --target agent -t "svcproxy-agent:$tag" "$repo"

if ! kind get clusters | grep -qx "$cluster"; then
  echo "== creating kind cluster $cluster (kube-proxy: nftables)"
  kind create cluster --name "$cluster" --config "$here/kind-config.yaml" --kubeconfig "$kubeconfig" --wait 5m
else
  kind get kubeconfig --name "$cluster" > "$kubeconfig"
fi
cleanup() {
  if [ -z "${KEEP_CLUSTER:-}" ]; then kind delete cluster --name "$cluster"; rm -f "$kubeconfig"; fi
}
trap cleanup EXIT

echo "== loading images into $cluster"
kind load docker-image --name "$cluster" "svcproxy-operator:$tag" "svcproxy-agent:$tag"

# tests/e2e/test_chart_lab.py installs the chart (its own release, --wait: here the Pods really
# run) with these images, checks it and uninstalls it; the other e2e modules run their own
# operator and agent processes against the cluster, as on the lab.
export SVCPROXY_E2E_CHART_SET="operator.image.repository=svcproxy-operator,agent.image.repository=svcproxy-agent,image.tag=$tag,image.pullPolicy=Never"

echo "== e2e suite against $cluster"
export SVCPROXY_E2E_KUBECONFIG="$kubeconfig"
cd "$repo"
.venv/bin/pytest -q tests/e2e "$@"
