# Shell helpers shared by hack/images.sh and hack/fresh-machine.sh (sourced, not run).

# apt_sources: prints this machine's non-empty apt source files, one per line, so an
# mmdebstrap rootfs gets the same registries the machine itself uses.
apt_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    if [ -s "$f" ]; then printf '%s\n' "$f"; fi
  done
}

# keep_only_tag REPO TAG: removes REPO's images tagged other than TAG (earlier inputs'
# builds), so rebuilds do not pile up on disk.
keep_only_tag() {
  docker image ls --format '{{.Repository}}:{{.Tag}}' "$1" | grep -vx "$2" \
    | xargs -r docker image rm >/dev/null || true
}
