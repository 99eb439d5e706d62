# rule-sidecar: the hot-reload rule service, run as a sidecar container next to the
# application in the same pod (the application calls it over localhost).
#
#   podman build -t rule-sidecar .          # or: docker build -t rule-sidecar .
#   scripts/build-image.sh                  # offline: a local debootstrap base, no pulls
#
# BASE_IMAGE is used by both stages. It must provide `python3` (3.11 or newer) with the
# venv module: the official python:3.11-slim-bookworm (python in /usr/local/bin) and
# Debian's own python3.11 + python3-venv (python in /usr/bin) both work. The venv's
# bin/python is a symlink to the base's interpreter, so the final stage must use the
# same base as the builder: that is why there is one argument for both.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------
# builder: a wheel of the project and of every dependency (with the `speed` extra), then
# a venv in /opt/rule-sidecar installed from those wheels only.
FROM ${BASE_IMAGE} AS builder

# The interpreter to build the venv with, as the base names it.
ARG PYTHON=python3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# hatchling reads pyproject.toml and README.md (the long description); the wheel holds
# the sidecar package only (its schemas and example rules are package data).
# scripts/trim-venv.py trims the venv afterwards; it is not part of the wheel.
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY scripts/trim-venv.py ./

# --only-binary: every dependency comes as a manylinux wheel, so nothing is compiled and
# no compiler is needed, not even here (the project's own wheel is pure Python).
# pip and setuptools are removed from the runtime venv: nothing installs at run time.
# trim-venv.py removes what nothing imports (kubernetes/aio, the Kubernetes API modules
# other than CoreV1Api, the unused CEL extensions, tests) and compiles byte code where
# it is loaded, with unchecked hashes, so it is valid whatever the files' modification
# times after COPY and Python never needs to write a .pyc (see the script for what gets
# none). Only python and /bin/sh run here: the base scripts/build-image.sh makes has no
# coreutils.
RUN "${PYTHON}" -m venv /opt/rule-sidecar \
 && /opt/rule-sidecar/bin/python -m pip wheel --no-cache-dir --only-binary=:all: \
        ".[speed]" --wheel-dir /wheels \
 && /opt/rule-sidecar/bin/python -m pip install --no-cache-dir --no-compile --no-index \
        --find-links /wheels /wheels/*.whl \
 && /opt/rule-sidecar/bin/python -m pip uninstall --yes pip setuptools \
 && /opt/rule-sidecar/bin/python trim-venv.py /opt/rule-sidecar \
 && /opt/rule-sidecar/bin/rule-sidecar validate /opt/rule-sidecar/lib/python3*/site-packages/sidecar/examples/rules

# ---------------------------------------------------------------------------------------
# runtime: the base plus the venv, nothing else (no compiler, no pip, no build files).
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE_URL=unknown

LABEL org.opencontainers.image.title="rule-sidecar" \
      org.opencontainers.image.description="Hot-reload rule service for Kubernetes: versioned CEL rule registry served to the application in the same pod" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# A numeric user and group, 10001:10001, with a passwd entry (libpq and getpass look the
# current user up; a uid without one makes them fail). Exec-form RUN: the base's useradd
# runs without a shell. --user-group gives the group the user's id (10001) when it is
# free; USER below is numeric either way. --no-log-init: no sparse lastlog entry.
RUN ["useradd", "--uid", "10001", "--user-group", "--no-log-init", "--no-create-home", \
     "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "rule-sidecar"]

# The venv is owned by root and read-only to the sidecar's user.
COPY --from=builder /opt/rule-sidecar /opt/rule-sidecar

# PATH is spelled out (an imported base may define none).
ENV PATH=/opt/rule-sidecar/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# readOnlyRootFilesystem: true works. Python writes no byte code (compiled above, and
# PYTHONDONTWRITEBYTECODE). The one thing the sidecar writes is the reload worker's:
# multiprocessing's forkserver puts its listening socket in a temporary directory, so
# /tmp must be writable (the chart mounts an emptyDir there; `podman run --read-only`
# mounts a tmpfs there by default). Its locks are POSIX semaphores in /dev/shm, which the
# container runtime always mounts as its own writable tmpfs. With
# RULE_SIDECAR_RELOAD_WORKER=false nothing needs /tmp. --state-dir, when used, is a
# mounted volume.
#
# No shell is needed at run time: the python slim base (and Debian's) still has /bin/sh,
# but the entrypoint is exec form and the probes are HTTP (/health/hot-reload, /livez),
# so the image never relies on it. No HEALTHCHECK: Kubernetes probes do that job.
#
# The sidecar listens on 127.0.0.1:8000 by default, which is what a sidecar needs (the
# application shares the pod's network namespace). The host is left to the deployment:
# set RULE_SIDECAR_HOST=0.0.0.0 only where something outside the pod must reach it
# (e.g. kubelet HTTP probes, which connect to the pod IP).
EXPOSE 8000

USER 10001:10001
ENTRYPOINT ["rule-sidecar", "serve"]
