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
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY igdtrigger ./igdtrigger
# the project's wheel and every dependency's (all have binary wheels: no compiler needed)
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim
ARG UID=1000
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
