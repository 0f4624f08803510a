# svcproxy images: two targets from one build.
#   docker build --target operator -t svcproxy-operator:dev .
#   docker build --target agent    -t svcproxy-agent:dev .
# The operator runs as a non-root user; the agent runs as root with only the capabilities
# the chart grants (NET_ADMIN, NET_RAW, SYS_MODULE) and carries the kernel tools it drives.
# PYTHON_IMAGE is any Debian bookworm image with Python 3.11 and its venv module: the public
# slim image by default, or the registry-free base that hack/images.sh makes. The package
# lives in a virtualenv, so the build needs no BuildKit and works where pip may not touch
# the system Python (Debian's own python3). PIP_INSTALL lets a build with no index at
# hand install from wheels made beforehand (hack/images.sh puts them in operator/.wheels).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: svcproxy and its dependencies installed into /opt/svcproxy ---------------------------
FROM ${PYTHON_IMAGE} AS build
ARG PIP_INSTALL=.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN python3 -m venv /opt/svcproxy \
    && /opt/svcproxy/bin/pip install --no-compile ${PIP_INSTALL} \
    && /opt/svcproxy/bin/svcproxy --help >/dev/null

# --- runtime base: the virtualenv, nothing to build with ----------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/svcproxy/bin:$PATH
COPY --from=build /opt/svcproxy /opt/svcproxy
RUN svcproxy --help >/dev/null
LABEL org.opencontainers.image.source="https://github.com/svcproxy/svcproxy" \
      org.opencontainers.image.licenses="Apache-2.0"

# --- operator: non-root, nothing but Python and the package -------------------------------------
FROM base AS operator
RUN groupadd --system --gid 65532 svcproxy \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin svcproxy
USER 65532:65532
EXPOSE 9100 8080
ENTRYPOINT ["svcproxy"]
CMD ["operator"]

# --- agent: the netfilter tools, ipvsadm (to read IPVS back) and kmod (modprobe) ----------------
FROM base AS agent
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables ipvsadm kmod iproute2 conntrack \
    && rm -rf /var/lib/apt/lists/*
EXPOSE 9101 9102
ENTRYPOINT ["svcproxy"]
CMD ["agent"]
