#!/usr/bin/env bash
# Runs the README's commands on a fresh Debian 12, the way a newcomer would: a bare bookworm
# rootfs (mmdebstrap --variant=apt: Essential packages and apt, nothing else), a clean
# `git clone` of this checkout's HEAD in /root/svcproxy, and each command run there as root,
# exactly as written, one after the other until one fails.
#
#   hack/fresh-machine.sh            the README's first-screen preparation lines, then
#                                    `make venv`, `make lint`, `bash hack/setup.sh` (minutes:
#                                    setup.sh builds the Kubernetes toolchain cold)
#   hack/fresh-machine.sh --full     every line of the README's first-screen block, i.e. the
#                                    preparation, `make demo` and `make test` (long)
#   hack/fresh-machine.sh -- CMD...  these commands instead, each one a shell line
#   --keep                           leave the container for a look (docker exec -it NAME bash)
#
# What the container gets from this machine is only what any machine of this workplace has
# before anything is installed: its apt sources and apt settings, its extra CA certificates
# (the package registries are reached through a TLS-inspecting egress proxy) and its pip
# settings. No cache, no Go, no Python packages. The image is made once and reused, keyed by
# those inputs.
#
# The container is --privileged (network namespaces, netfilter, /dev/net/tun, UML guests) and
# shares the host's network: that is the only way it reaches the package registries here
# (the Docker engine of hack/docker.sh does no masquerade). Downloads are all that leaves;
# the tests' own traffic stays in the namespaces they create, as on the host. So run --full
# only when no other lab or `make test` runs on this machine: they would share the root
# namespace's routes, rules and the lab's loopback ports.
#
# Progress and every command's output go to stderr and to LOGDIR/NN.log; the last line of
# stdout is JSON: {"passed": bool, "steps": [{"cmd", "rc", "seconds"}...], ...}.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
log() { printf '[fresh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
. hack/lib.sh

full=0 keep=0 steps=()
while [ $# -gt 0 ]; do
  case $1 in
    --full) full=1 ;;
    --keep) keep=1 ;;
    --) shift; steps=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "fresh-machine.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# The README's first shell block: the lines a newcomer types, in order.
readme_lines() {
  git show HEAD:README.md | awk '/^```sh$/ && !done {on=1; next} on && /^```$/ {on=0; done=1} on && NF' 
}
if [ ${#steps[@]} -eq 0 ]; then
  mapfile -t readme < <(readme_lines)
  [ ${#readme[@]} -gt 0 ] || { echo "fresh-machine.sh: README.md has no sh block" >&2; exit 2; }
  if [ $full = 1 ]; then
    steps=("${readme[@]}")
  else
    for line in "${readme[@]}"; do
      case $line in "make demo"*|"make test"*) ;; *) steps+=("$line") ;; esac
    done
    # make venv first: it must work before setup.sh has installed anything.
    steps+=("make venv" "make lint" "bash hack/setup.sh")
  fi
fi

[ "$(id -u)" = 0 ] || { echo "fresh-machine.sh: run as root (Docker, mmdebstrap)" >&2; exit 2; }
bash hack/docker.sh
bash hack/setup.sh packages   # mmdebstrap among them

work=$(mktemp -d /tmp/svcproxy-fresh.XXXXXX)
cname=svcproxy-fresh-$$
cleanup() {
  if [ $keep = 0 ]; then docker rm -f -v "$cname" >/dev/null 2>&1 || true; fi
  rm -rf "$work/clone" "$work/rootfs.tar"
}
trap cleanup EXIT
logdir=$work/logs
mkdir -p "$logdir"
t0=$SECONDS

# The image: what this workplace's machines have before anything is installed.
extras=()
mapfile -t sources < <(apt_sources)
for f in /etc/apt/apt.conf.d/99artifact-registry /etc/pip.conf /usr/local/share/ca-certificates/*.crt; do
  [ -s "$f" ] && extras+=("$f")
done
packages=ca-certificates
key=$( (echo "bookworm apt $packages v1"; sha256sum "${sources[@]}" "${extras[@]}") | sha256sum | cut -c1-16)
image=svcproxy-fresh/debian:bookworm-$key
image_seconds=0
if docker image inspect "$image" >/dev/null 2>&1; then
  log "reusing $image"
else
  log "making $image with mmdebstrap"
  hooks=()
  for f in "${extras[@]}"; do
    hooks+=("--customize-hook=mkdir -p \"\$1$(dirname "$f")\" && cp $f \"\$1$f\"")
  done
  hooks+=('--customize-hook=chroot "$1" update-ca-certificates >/dev/null')
  start=$SECONDS
  mmdebstrap --quiet --variant=apt --include="$packages" "${hooks[@]}" bookworm \
    "$work/rootfs.tar" "${sources[@]}"
  docker import --change "LABEL io.svcproxy.fresh-key=$key" "$work/rootfs.tar" "$image" >/dev/null
  rm -f "$work/rootfs.tar"
  image_seconds=$((SECONDS - start))
  log "made $image in $image_seconds s"
  # Earlier images of this script, made from other inputs.
  keep_only_tag svcproxy-fresh/debian "$image"
fi

# A clean clone of HEAD: what is committed, nothing of this work tree's state.
commit=$(git rev-parse HEAD)
git clone -q --no-checkout "$(git rev-parse --path-format=absolute --git-common-dir)" "$work/clone"
git -C "$work/clone" checkout -q --detach "$commit"

# /dev/shm exec, unlike Docker's default: UML guests execute their memory from it.
# /var/lib/docker and /var/lib/containerd on volumes: overlay on overlay is refused, and the
# kind suite runs an engine inside. /lib/modules so modprobe finds the host kernel's modules.
docker run -d --name "$cname" --hostname fresh --privileged --network host \
  --tmpfs /dev/shm:rw,nosuid,nodev,exec,size=4g \
  -v /lib/modules:/lib/modules:ro -v /var/lib/docker -v /var/lib/containerd \
  --ulimit nofile=16384:16384 "$image" \
  bash -c 'trap "exit 0" TERM; while :; do sleep 3600 & wait; done' >/dev/null
docker cp -q "$work/clone" "$cname:/root/svcproxy"

json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1" 2>/dev/null \
  || printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }
results=() passed=true i=0
for cmd in "${steps[@]}"; do
  i=$((i + 1))
  if [ $passed = false ]; then
    results+=("{\"cmd\": $(json_str "$cmd"), \"rc\": null, \"seconds\": null}")
    continue
  fi
  step_log=$(printf '%s/%02d.log' "$logdir" "$i")
  log "step $i: $cmd"
  start=$SECONDS
  set +e
  docker exec -w /root/svcproxy -e HOME=/root "$cname" bash -c "$cmd" < /dev/null 2>&1 \
    | tee "$step_log" >&2
  rc=${PIPESTATUS[0]}
  set -e
  took=$((SECONDS - start))
  log "step $i: exit $rc in $took s (log: $step_log)"
  [ "$rc" = 0 ] || passed=false
  results+=("{\"cmd\": $(json_str "$cmd"), \"rc\": $rc, \"seconds\": $took}")
done
[ $keep = 1 ] && log "container kept: docker exec -it $cname bash; docker rm -f -v $cname when done"

steps_json=$(printf '%s, ' "${results[@]}")
echo "{\"passed\": $passed, \"commit\": \"$commit\", \"image\": \"$image\", \"image_seconds\": $image_seconds, \"total_seconds\": $((SECONDS - t0)), \"logs\": \"$logdir\", \"steps\": [${steps_json%, }]}"
[ $passed = true ]
