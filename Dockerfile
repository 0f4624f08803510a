# svcproxy images: two targets from one build.
#   docker build --target operator -t svcproxy-operator:dev .
#   docker build --target agent    -t svcproxy-agent:dev .
# The operator runs as a non-root user; the agent runs as root with only the capabilities
# the chart grants (NET_ADMIN, NET_RAW, SYS_MODULE) and carries the kernel tools it drives.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: wheels of svcproxy and its dependencies ---------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --wheel-dir /wheels .

# --- runtime base: the package installed, nothing to build with ---------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels svcproxy \
    && svcproxy --help >/dev/null
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
    && apt-get install -y --no-install-recommends iptables nftables ipvsadm kmod iproute2 \
    && rm -rf /var/lib/apt/lists/*
EXPOSE 9101 9102
ENTRYPOINT ["svcproxy"]
CMD ["agent"]
