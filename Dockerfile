# cdcd: Redis change-data-capture daemon, as a container (a sidecar next to an app, or alone).
#
#   docker build -t cdcd .
#   docker run -d --name cdcd -p 8444:8444 -v cdcd-data:/var/lib/cdcd \
#       -e CDCD_AUTH_TOKEN_FILE=/run/secrets/cdcd_token \
#       -v "$PWD/token:/run/secrets/cdcd_token:ro" cdcd
#   docker exec cdcd cdcd list          # the CLI, in the container, finds the daemon
#
# The daemon listens on 0.0.0.0:8444 here, and a non-loopback address needs a bearer
# token: pass CDCD_AUTH_TOKEN_FILE (a mounted secret, preferred) or CDCD_AUTH_TOKEN, else
# `cdcd serve` refuses to start (CDCD_INSECURE_BIND=true overrides, for a private network
# only). Other settings: CDCD_CONFIG (the TOML file /etc/cdcd/cdcd.toml: the documented
# defaults, all commented out; mount yours over it), CDCD_TASKS (tasks created at start-up,
# e.g. /etc/cdcd/tasks.json), CDCD_LOG_FORMAT=json, CDCD_LOG_LEVEL, and every other setting
# of config/cdcd.toml as CDCD_<NAME>. Metadata (cdcd.json: specs and checkpoints) lives in
# the volume /var/lib/cdcd, owned by uid 10001: keep it across restarts, or tasks start over.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY cdcd ./cdcd
# The documented defaults, every setting commented out: mount your own file over it.
COPY config/cdcd.toml /etc/cdcd/cdcd.toml
# Every dependency ships manylinux wheels: no compiler is needed in the slim image.
RUN pip install --no-cache-dir . \
    && rm -rf /src \
    && groupadd --system --gid 10001 cdcd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cdcd \
        --shell /usr/sbin/nologin cdcd \
    && mkdir -p /var/lib/cdcd /etc/cdcd \
    && chown 10001:10001 /var/lib/cdcd \
    && chmod 0700 /var/lib/cdcd

ENV CDCD_DATA_DIR=/var/lib/cdcd \
    CDCD_HOST=0.0.0.0 \
    CDCD_PORT=8444 \
    CDCD_CONFIG=/etc/cdcd/cdcd.toml

WORKDIR /var/lib/cdcd
VOLUME ["/var/lib/cdcd"]
EXPOSE 8444
# A numeric user, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001

# /healthz needs no token; slim has no curl, so Python's urllib asks (exit 1 when down).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CDCD_PORT', '8444'), timeout=4)"]

ENTRYPOINT ["cdcd"]
CMD ["serve"]
