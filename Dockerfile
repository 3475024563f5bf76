# One image for all four gpu-fleet services. Pick the service with the container command:
#   gpu-fleet-manager | gpu-fleet-binder | gpu-fleet-forecaster | gpu-fleet-notifier
# (the CLIs `gpu-fleet` and `kubectl-runs` are installed too). Flags have GPU_FLEET_* env twins.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: turn the project into a wheel (no dev extras, nothing from the test tree) ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# gcc builds the funding matching's C module (gpu_fleet.core.funding._native); the runtime stage
# gets the compiled wheel only.  Without it the wheel would fall back to the Python matching.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# README.m[d]: copied when present (pyproject names it), skipped silently when not.
COPY pyproject.toml README.m[d] ./
COPY shared ./shared
COPY services ./services
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG UID=10001
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    GPU_FLEET_NATS_URL=nats://nats:4222 \
    GPU_FLEET_LOG_LEVEL=info
LABEL org.opencontainers.image.title="gpu-fleet" \
      org.opencontainers.image.description="GPU fleet scheduler services (manager, binder, forecaster, notifier)" \
      org.opencontainers.image.licenses="Apache-2.0"
# Plain COPY (not RUN --mount) so the classic builder of docker-compose v1 can build it too.
COPY --from=build /wheels /tmp/wheels
RUN pip install /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && groupadd --system --gid ${UID} gpufleet \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /home/gpufleet --create-home \
      --shell /usr/sbin/nologin gpufleet \
 && install -d -o ${UID} -g ${UID} -m 0700 /security
# /security: compose's security profile volume (a new named volume takes this owner).
WORKDIR /home/gpufleet
# Numeric user so Kubernetes `runAsNonRoot: true` can verify it without a passwd lookup.
USER ${UID}:${UID}
# The services stop on SIGTERM (finish in-flight work, drain NATS) within 10 s.
STOPSIGNAL SIGTERM
CMD ["gpu-fleet-manager"]
