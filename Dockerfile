# math-service image, in the style of Astral's uv Docker guide: a build stage installs the
# locked dependencies with uv; the final stage holds only Python, that environment and the
# script, so a container starts with no network, no package manager and no root.

# --- Build stage ------------------------------------------------------------------------------
FROM python:3.11-slim AS builder
# A pinned uv release: the same lock always installs the same way.
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /bin/uv

# Bytecode is compiled now: a read-only container could not write it at start.
# Copy, not hard-link, out of the cache mount, which is not part of the image.
# Use the base image's Python, never download one.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    VIRTUAL_ENV=/opt/venv

WORKDIR /app
# Copied, not bind-mounted: buildah's layer cache does not look inside bind mounts, and a
# changed lock must never reuse an old environment.
COPY service.py service.py.lock ./
# Install into $VIRTUAL_ENV (--active) exactly what service.py.lock lists (--frozen: no
# re-resolve), from wheels only (--no-build: there is no compiler here, on either platform);
# the cache mount keeps uv's downloads between builds, outside the image.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --script service.py --frozen --active --no-build --no-progress

# --- Final stage ------------------------------------------------------------------------------
FROM python:3.11-slim
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Owned by root and read-only to the app user: the running service cannot change its own code.
COPY service.py .

ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric uid/gid (the image needs no user entry for it): Kubernetes' runAsNonRoot can
# only verify a numeric USER, and 10001 is above the uids a host or base image hands out.
USER 10001:10001
EXPOSE 8000
# checkov:skip=CKV_DOCKER_2:Kubernetes ignores HEALTHCHECK; deployment.yaml probes /healthz and /readyz instead
# Exec form: python is PID 1 and receives SIGTERM itself, then drains in-flight requests.
CMD ["python", "service.py"]
