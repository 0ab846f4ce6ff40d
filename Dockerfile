# syntax=docker/dockerfile:1
# The InferWatch daemon's image: `docker build -t REGISTRY/inferwatch:0.1.0 .` at the repository root.
# Stage 1 builds the wheel and installs it, with its dependencies, into a virtualenv; stage 2 is a
# slim Python with that virtualenv and nothing to build with. It runs as uid 10001 (the Helm chart's
# runAsUser) and keeps its state in /var/lib/inferwatch, which the chart mounts writable (an emptyDir
# or a PersistentVolumeClaim) next to /tmp, under a read-only root filesystem.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m pip install "build>=1.2"
COPY pyproject.toml README.md ./
COPY monitor ./monitor
RUN python -m build --wheel --outdir /dist .
# Every dependency has a binary wheel for linux x86_64 and aarch64 (numpy, scipy, river, msgspec,
# crc32c): nothing is compiled. The venv gets no pip of its own.
RUN python -m venv --without-pip /opt/inferwatch \
 && python -m pip --python /opt/inferwatch/bin/python install /dist/*.whl

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="inferwatch" \
      org.opencontainers.image.description="Runtime security monitor for deployed ML models" \
      org.opencontainers.image.licenses="Apache-2.0"
# No installer in the image that runs: the base image's pip goes too.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --system --gid 10001 inferwatch \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/inferwatch --no-create-home \
      --shell /usr/sbin/nologin inferwatch \
 && mkdir -p /var/lib/inferwatch /etc/inferwatch \
 && chown 10001:10001 /var/lib/inferwatch
COPY --from=build /opt/inferwatch /opt/inferwatch
# The shipped config and example playbooks, for `docker run IMAGE check -c /usr/share/inferwatch/inferwatch.yaml`.
COPY configs/inferwatch.yaml /usr/share/inferwatch/inferwatch.yaml
COPY playbooks /usr/share/inferwatch/playbooks
ENV PATH=/opt/inferwatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
WORKDIR /var/lib/inferwatch
USER 10001:10001
EXPOSE 9108
ENTRYPOINT ["inferwatch"]
CMD ["run", "-c", "/etc/inferwatch/config.yaml", "--state-dir", "/var/lib/inferwatch"]
