# glibc-dns-testing as the e2e DNS specs run it: a glibc (Debian) userland with dig, getent
# and hostname, and CoreDNS at /coredns, as upstream's image has; the specs run their probe
# loops in it with `sh -c`. BASE is hack/images.sh's tools base (bookworm, dnsutils).
ARG BASE
FROM ${BASE}
COPY coredns /coredns
