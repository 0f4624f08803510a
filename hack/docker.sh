#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine, for hack/images.sh and hack/kind.sh.
# Where none runs, it installs Debian's docker.io and starts dockerd as a plain background
# process (these machines have no systemd), configured for them:
#   - no iptables rules and no masquerade: the kind network is internal (hack/kind.sh), so
#     nothing a test sends can leave the machine, and the lab's own rules stay untouched;
#   - container rlimits at most the hard limit these machines allow (no CAP_SYS_RESOURCE);
#   - runc behind hack/runc-bounded, which keeps a privileged container's capabilities
#     within this machine's bounding set (runc refuses to start it otherwise).
# Usage: hack/docker.sh        (prints nothing when the engine already answers)
set -euo pipefail

log() { printf '[docker %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Does this process's bounding set hold every capability (bits 0-40)? Then plain runc works.
full_caps() { [ $(( 0x$(awk '/^CapBnd:/ {print $2}' /proc/self/status) & 0x1ffffffffff )) = $(( 0x1ffffffffff )) ]; }

if docker info >/dev/null 2>&1; then
  if full_caps || docker info --format '{{json .Runtimes}}' | grep -q svcproxy-runc; then exit 0; fi
  if [ -f /var/run/svcproxy-dockerd.pid ] && [ "$(cat /var/run/svcproxy-dockerd.pid)" = "$(pgrep -xo dockerd)" ]; then
    log "restarting the dockerd this script started, with the runc wrapper"
    pid=$(cat /var/run/svcproxy-dockerd.pid)
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
  else
    echo "docker.sh: the running Docker engine would start privileged containers with capabilities this machine lacks; add hack/runc-bounded as its default runtime (see this script) and restart it." >&2
    exit 2
  fi
fi

if [ "$(id -u)" != 0 ]; then
  echo "docker.sh: no Docker engine answers and only root can start one here; start Docker, or run as root." >&2
  exit 2
fi

if ! command -v dockerd >/dev/null; then
  log "installing Debian's docker.io"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
command -v docker >/dev/null || {
  echo "docker.sh: dockerd is installed but no docker client is on PATH; install docker.io's client." >&2
  exit 2
}

# The runtime wrapper is copied out of the checkout: dockerd outlives it.
runtime=/usr/local/libexec/svcproxy/runc-bounded
mkdir -p "$(dirname "$runtime")"
install -m 0755 "$(dirname "$0")/runc-bounded" "$runtime"

conf=/etc/docker/daemon.json
if [ ! -f "$conf" ] || ! grep -q svcproxy-runc "$conf"; then
  mkdir -p /etc/docker
  hard=$(ulimit -Hn)
  [ "$hard" = unlimited ] && hard=1048576
  limit=$(( hard < 16384 ? hard : 16384 ))
  cat > "$conf" <<JSON
{
  "iptables": false,
  "ip6tables": false,
  "ip-masq": false,
  "default-ulimits": {"nofile": {"Name": "nofile", "Hard": $limit, "Soft": $limit}},
  "storage-driver": "overlay2",
  "runtimes": {"svcproxy-runc": {"path": "$runtime"}},
  "default-runtime": "svcproxy-runc"
}
JSON
fi

log "starting dockerd (log: /var/log/svcproxy-dockerd.log)"
# setsid: the engine outlives this script and the make target that started it. It takes
# only stdin, stdout and stderr along: any other inherited descriptor stays open as long as
# the engine runs, and the one `flock /tmp/svcproxy-lab.lock make ...` hands its command is
# the lab lock itself, which then nobody else could take again until dockerd stops.
# shellcheck disable=SC2016
setsid bash -c 'for fd in /proc/self/fd/*; do fd=${fd##*/}; [ "$fd" -gt 2 ] && eval "exec $fd>&-"; done 2>/dev/null
  exec dockerd' >>/var/log/svcproxy-dockerd.log 2>&1 < /dev/null &
echo $! > /var/run/svcproxy-dockerd.pid
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 0.5
done
echo "docker.sh: dockerd did not answer within 30 s; see /var/log/svcproxy-dockerd.log (last lines below)." >&2
tail -n 20 /var/log/svcproxy-dockerd.log >&2
exit 1
