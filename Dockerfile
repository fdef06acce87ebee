# igdtrigger on a home server (Linux hosts only: SSDP, zeroconf and the router's view of this
# host's LAN address need host networking; Docker Desktop's VM does not forward multicast):
#   docker build -t igdtrigger .
#   docker run -d --name igdtrigger --network host -v igdtrigger:/config igdtrigger
#   docker exec igdtrigger igdtrigger status
# Everything in config.toml can also come from IGDTRIGGER_<SECTION>__<KEY> variables, e.g.
#   -e IGDTRIGGER_GATEWAY__URL=http://192.168.1.1:5000/rootDesc.xml -e IGDTRIGGER_API__PUBLIC_READ=true
# Rules go in /config/config.toml (see examples/config.toml, examples/rules/). Conntrack detection
# needs root + CAP_NET_ADMIN: see the "detect" profile in examples/docker-compose.yml.
# tests/test_packaging.py runs these steps (wheel, install, ENV, CMD, HEALTHCHECK) without Docker.
#
# Base image, pinned by digest so a rebuild gets the same bytes (python:3.11-slim, multi-arch).
# NOTE: this digest was NOT verified where this file was last edited (no Docker daemon or registry
# client there): it is the one two independent public projects pin for python:3.11-slim. Check
# and refresh it with `docker buildx imagetools inspect python:3.11-slim` (the "Digest:" line),
# or let Dependabot/Renovate keep it current; a different base: --build-arg PYTHON_IMAGE=...
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

FROM ${PYTHON_IMAGE} AS build
# A compiler, in this stage only: where a dependency has no binary wheel (miniupnpc on 32-bit
# Raspberry Pi OS, linux/arm/v7) pip builds it from source here. The final image has no compiler.
# (Should miniupnpc still be missing, igdtrigger uses its own SOAP client: backend = "auto".)
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY igdtrigger ./igdtrigger
# the project's wheel and every dependency's (binary wheels where they exist, else built here)
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG UID=1000
ARG VERSION=0.1.0
# where the project is published (none yet): docker build --build-arg SOURCE_URL=https://...
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="igdtrigger" \
      org.opencontainers.image.description="Router-grade port triggering: timed UPnP IGD / NAT-PMP / PCP port mappings while a game needs them" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.documentation="${SOURCE_URL}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"
# the README inside the image too: docker run --rm igdtrigger cat... or docker cp
COPY README.md /usr/share/doc/igdtrigger/README.md
RUN useradd --system --uid ${UID} --user-group --home-dir /config --no-create-home igdtrigger \
 && mkdir -p /config && chown igdtrigger:igdtrigger /config && chmod 0700 /config
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels igdtrigger && rm -rf /wheels
# Listen on the LAN (launcher hooks on other PCs act for their own address; reading status from
# another host needs the admin token in /config/api-token, or IGDTRIGGER_API__PUBLIC_READ=true).
# Detection is off: a non-root container cannot have CAP_NET_ADMIN.
ENV IGDTRIGGER_CONFIG=/config/config.toml \
    IGDTRIGGER_STATE_DIR=/config \
    IGDTRIGGER_API__LISTEN=0.0.0.0:8731 \
    IGDTRIGGER_DETECT__METHODS=[] \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME /config
WORKDIR /config
USER igdtrigger
EXPOSE 8731
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["igdtrigger", "healthcheck"]
ENTRYPOINT ["igdtrigger"]
CMD ["serve"]
