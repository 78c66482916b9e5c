# lbproxy: OpenAI-compatible load balancer for vLLM fleets.
#
#   docker build -t lbproxy .
#   docker run -p 8080:8080 -v "$PWD/my-config.yaml:/etc/lbproxy/config.yaml:ro" lbproxy
#
# The config is read from /etc/lbproxy/config.yaml (mount it; none is baked in). The
# container always listens on 0.0.0.0:8080: the command line overrides `listen:` so that
# the HEALTHCHECK and published ports never depend on the mounted file.
# The same image runs simulated vLLM servers: `docker run lbproxy sim --fleet FILE --host 0.0.0.0`.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app
RUN python -m venv /opt/venv

# Dependencies first, from the metadata alone, so that a source change does not reinstall
# them. Every dependency ships manylinux wheels: no compiler in the image.
COPY pyproject.toml README.md ./
RUN mkdir lbproxy && touch lbproxy/__init__.py \
    && pip install -e '.[fast,replicas]' \
    && rm -rf lbproxy

# The editable install above points at /app/lbproxy: copying the source there completes it
# (hardware profiles and fleets ship inside the package, in lbproxy/data/).
COPY lbproxy ./lbproxy
COPY configs ./configs
RUN python -c "import lbproxy.cli, lbproxy.sim.cli" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin lbproxy \
    && mkdir -p /etc/lbproxy

USER 10001:10001
EXPOSE 8080
# `serve` drains in-flight requests on SIGINT or SIGTERM (up to `shutdown_grace`), and so
# does `sim`; SIGINT also stops a Python process that installed no handler at all, where as
# PID 1 a SIGTERM would be ignored until Docker's SIGKILL.
STOPSIGNAL SIGINT
# /health is liveness (the process serves); /ready (a healthy backend per pool) is for
# load balancers in front of lbproxy, not a reason to restart it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=3)"]

ENTRYPOINT ["lbproxy"]
CMD ["serve", "--config", "/etc/lbproxy/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
