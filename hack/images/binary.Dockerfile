# One upstream binary in an image, as the kubeadm manifests and the e2e suite expect it:
# BASE is scratch for static servers, or hack/images.sh's tools base where a program needs
# netfilter or network tools beside it.
ARG BASE=scratch
FROM ${BASE}
ARG BINARY
COPY ${BINARY} /usr/local/bin/${BINARY}
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
