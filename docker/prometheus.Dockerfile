# Prometheus from Debian's package (2.42): builds on the local debootstrap base with nothing
# pulled from a registry. The scrape config is mounted by compose; a copy is baked in so the
# image also runs alone.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
    # The web UI uses moment-timezone's bundled builds; its raw tz data (~210 MB) is unused.
    && rm -rf /var/lib/apt/lists/* /usr/share/javascript/moment-timezone/data \
    && mkdir -p /prometheus && chown prometheus:prometheus /prometheus

COPY deploy/prometheus/prometheus.yml /etc/prometheus/prometheus.yml

USER prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
# No curl or wget in the image: ask /-/ready over bash's /dev/tcp.
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /-/ready HTTP/1.0\\r\\n\\r\\n' >&3 && head -1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--storage.tsdb.retention.time=15d", "--web.listen-address=:9090", "--web.enable-lifecycle"]
