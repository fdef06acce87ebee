# igdtrigger on a home server. Needs host networking (SSDP, zeroconf and the router's view of
# this host's LAN address do not cross Docker's bridge):
#   docker run -d --network host -v igdtrigger:/config --name igdtrigger igdtrigger
# Conntrack detection needs root + CAP_NET_ADMIN: see examples/docker-compose.yml.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY igdtrigger ./igdtrigger
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 1000 --home-dir /config igdtrigger \
 && mkdir -p /config && chown igdtrigger /config
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV IGDTRIGGER_CONFIG=/config/config.toml \
    IGDTRIGGER_STATE_DIR=/config \
    PYTHONUNBUFFERED=1
VOLUME /config
USER igdtrigger
EXPOSE 8731
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
  CMD ["igdtrigger", "status", "--server", "http://127.0.0.1:8731"]
ENTRYPOINT ["igdtrigger"]
CMD ["serve"]
