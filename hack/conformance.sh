#!/usr/bin/env bash
# Kubernetes' own conformance specs for Services, DNS, EndpointSlices, the API server's proxy
# and Pod networking, run against the kind cluster (`make conformance`; not part of `make test`):
#   1. builds e2e.test from k8s.io/kubernetes/test/e2e at the lab's pinned version into the
#      toolchain cache (lab/svcproxy_lab/toolchain/build.sh --e2e; a cold build takes long);
#   2. builds the images the focused specs run besides agnhost (hack/images.sh conformance),
#      brings the kind cluster up (hack/kind.sh up) and loads them into it;
#   3. applies the default policy MODE asks for (none: kube-proxy alone, the baseline);
#   4. runs e2e.test with the focus, the cluster's kubeconfig and a timeout, its JUnit
#      report and log in a results folder outside the repository;
#   5. records the run (date, mode, command, one row per spec) in docs/conformance.md
#      (lab/svcproxy_lab/conformance.py).
# Usage: hack/conformance.sh            the run described above
#        hack/conformance.sh --dry-run  lists the focused specs (--ginkgo.dry-run): no cluster
# Environment:
#   MODE=none|iptables|userspace   the cluster-wide default policy (default none)
#   TIMEOUT=40                     minutes for the whole suite (Ginkgo's --ginkgo.timeout)
#   FOCUS=REGEX                    the specs (default: the sig-network conformance set below)
#   RESULTS=DIR                    default ~/.cache/svcproxy/conformance/<UTC time>-<mode>
#   RECORD=0                       do not write docs/conformance.md
#   KEEP_CLUSTER=1                 leave a cluster this script created running (by default
#                                  it takes it down again, as it found the machine)
#   PYTHON=PATH                    the Python for the record (default .venv/bin/python)
# The exit status is e2e.test's (non-zero when a spec failed), or 2 for a usage error.
# e2e.test runs in the root namespace and talks only to the API server's node address; every
# spec's traffic runs in Pods on the kind nodes (hack/kind.sh keeps the Pod and Service
# ranges blackholed in the root namespace while the cluster exists).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
log() { printf '[conformance %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

dry_run=0
case ${1:-} in
  '') ;;
  --dry-run) dry_run=1 ;;
  *) echo "usage: hack/conformance.sh [--dry-run]" >&2; exit 2 ;;
esac
mode=${MODE:-none}
case $mode in none|iptables|userspace) ;;
  *) echo "conformance.sh: MODE=$mode is not one of none, iptables, userspace" >&2; exit 2 ;;
esac
timeout_min=${TIMEOUT:-40}
[[ $timeout_min =~ ^[1-9][0-9]*$ ]] || { echo "conformance.sh: TIMEOUT=$timeout_min is not a number of minutes" >&2; exit 2; }
focus=${FOCUS:-'\[sig-network\].*(Services|DNS|EndpointSlice|Proxy|Networking).*\[Conformance\]'}
python=${PYTHON:-$repo/.venv/bin/python}
label=$mode; [ "$dry_run" = 1 ] && label=dry-run
results=${RESULTS:-${XDG_CACHE_HOME:-$HOME/.cache}/svcproxy/conformance/$(date -u +%Y%m%dT%H%M%SZ)-$label}
e2e_images=(registry.k8s.io/e2e-test-images/glibc-dns-testing:2.0.0 registry.k8s.io/e2e-test-images/nginx:1.15-4)

toolchain=lab/svcproxy_lab/toolchain/build.sh
log "building e2e.test if it is not cached ($toolchain --e2e)"
e2e=$(bash "$toolchain" --e2e | tail -n 1)
kubectl_bin=$(bash "$toolchain" | tail -n 1)/kubectl
mkdir -p "$results"

# The default policy for every Service the specs create.
apply_mode() {
  local kubeconfig=$1
  [ "$mode" = none ] && { log "MODE=none: no svcproxy policy, kube-proxy (nftables) proxies every Service"; return 0; }
  # The cluster-wide default policy. It selects the namespaces e2e.test creates
  # (each carries the label e2e-run), so the specs' Services go to svcproxy while the
  # cluster's own (kubernetes, kube-dns) stay with kube-proxy.
  if ! "$kubectl_bin" --kubeconfig "$kubeconfig" get crd clusterserviceproxypolicies.svcproxy.io >/dev/null 2>&1; then
    echo "conformance.sh: MODE=$mode needs the ClusterServiceProxyPolicy CRD, which the installed chart lacks (is the chart older than this checkout?); run MODE=none for the kube-proxy baseline." >&2
    exit 2
  fi
  log "MODE=$mode: applying the ClusterServiceProxyPolicy conformance-default"
  "$kubectl_bin" --kubeconfig "$kubeconfig" apply -f - >&2 <<YAML
apiVersion: svcproxy.io/v1alpha1
kind: ClusterServiceProxyPolicy
metadata: {name: conformance-default}
spec:
  mode: $mode
  namespaceSelector:
    matchExpressions: [{key: e2e-run, operator: Exists}]
YAML
}

args=(--kubectl-path="$kubectl_bin" --provider=skeleton --report-dir="$results" --e2e-output-dir="$results"
  --disable-log-dump --ginkgo.focus="$focus" --ginkgo.timeout="${timeout_min}m" --ginkgo.no-color)
if [ "$dry_run" = 1 ]; then
  args+=(--ginkgo.dry-run)
else
  bash hack/images.sh conformance >/dev/null
  control_plane=${KIND_CLUSTER:-svcproxy}-control-plane
  if [ "$(docker inspect -f '{{.State.Running}}' "$control_plane" 2>/dev/null)" != true ] \
      && [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    trap 'log "taking down the cluster this run created"; bash hack/kind.sh down' EXIT
  fi
  kubeconfig=$(bash hack/kind.sh up | tail -n 1)
  bash hack/kind.sh load "${e2e_images[@]}"
  apply_mode "$kubeconfig"
  args=(--kubeconfig="$kubeconfig" "${args[@]}")
fi

# While the specs run under a svcproxy policy: every second, the specs' namespaces (label
# e2e-run), their Services (type, proxy label) and svcproxy's programs, so the record can say
# which Services svcproxy served and which kube-proxy served alone (the handover takes
# seconds; many specs are done sooner).
sampler=
if [ "$dry_run" = 0 ] && [ "$mode" != none ]; then
  (
    k() { "$kubectl_bin" --kubeconfig "$kubeconfig" "$@" 2>/dev/null || true; }
    while :; do
      echo "# t=$(date +%s.%N)"
      k get ns -l e2e-run -o name | sed 's/^/ns /'
      k get svc -A --no-headers -o 'custom-columns=NS:.metadata.namespace,NAME:.metadata.name,TYPE:.spec.type,PROXY:.metadata.labels.service\.kubernetes\.io/service-proxy-name,CLUSTERIP:.spec.clusterIP' | sed 's/^/svc /'
      k get pvs -A --no-headers -o 'custom-columns=NS:.metadata.namespace,NAME:.metadata.name' | sed 's/^/pvs /'
      sleep 1
    done
  ) > "$results/handover.txt" &
  sampler=$!
fi

log "running e2e.test (${timeout_min} min at most); log: $results/e2e.log"
start=$SECONDS
rc=0
# Ginkgo stops at its own timeout and still writes the report; the outer one only catches a hang.
timeout --kill-after=60s "$(( timeout_min + 5 ))m" "$e2e" "${args[@]}" >"$results/e2e.log" 2>&1 || rc=$?
log "e2e.test ended with status $rc after $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true; fi
# Ginkgo's own summary ("Ran 37 of 7579 Specs ...", "FAIL! -- 30 Passed | 7 Failed ...").
grep -E '^(Ran [0-9]+ of|SUCCESS!|FAIL!|Summarizing)' "$results/e2e.log" >&2 || tail -n 3 "$results/e2e.log" >&2

junit=$results/junit_01.xml
if [ ! -s "$junit" ]; then
  echo "conformance.sh: e2e.test wrote no JUnit report ($junit); see $results/e2e.log" >&2
  exit $(( rc == 0 ? 1 : rc ))
fi
command="MODE=$mode TIMEOUT=$timeout_min make conformance"
[ "$dry_run" = 1 ] && command="hack/conformance.sh --dry-run"
# The command as a reader would type it: values with shell characters in single quotes.
shell_words() {
  local a out=() re='^[][A-Za-z0-9_./=:,+~-]*$' q="'"
  for a; do
    a=${a//$HOME/\~}
    if [[ $a =~ $re ]]; then out+=("$a")
    elif [[ $a == --*=* ]]; then out+=("${a%%=*}=$q${a#*=}$q")
    else out+=("$q$a$q"); fi
  done
  echo "${out[*]}"
}
shown=$(shell_words "$e2e" "${args[@]}")
if [ "${RECORD:-1}" = 1 ]; then
  record_args=()
  [ "$dry_run" = 1 ] && record_args=(--dry-run)
  [ -s "$results/handover.txt" ] && record_args+=(--handover "$results/handover.txt")
  # The record's own status is 1 when a spec failed (e2e.test's status says so already).
  rec=0
  "$python" -m svcproxy_lab.conformance --junit "$junit" --focus "$focus" --mode "$mode" \
    --command "$command; e2e.test: $shown" --doc docs/conformance.md "${record_args[@]}" >&2 || rec=$?
  if [ "$rec" -le 1 ]; then log "recorded in docs/conformance.md"; else log "could not record the run (above)"; fi
fi
echo "$results"
exit "$rc"
