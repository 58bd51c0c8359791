# syntax=docker/dockerfile:1.7
# Images from one tree:
#   docker build --target operator -t idpo-operator .   # slim: decides, no torch
#   docker build --target jobs -t idpo-jobs .           # CUDA: generate (vLLM), rank, train
#   docker build --target e2e -t idpo-jobs-e2e .        # the jobs image with the test suite's modules
# Versions are pinned here and in pyproject.toml; tests/test_dockerfile.py keeps them in step. `pip install
# ".[extra]"` installs this package, whose dependencies pyproject.toml pins (hence the DL3013 ignores).

FROM python:3.11.11-slim-bookworm AS operator
# MALLOC_MMAP_THRESHOLD_: glibc's default threshold, fixed. Dynamic, it rises after a large watch event (a run
# near etcd's 1.5 MiB) is parsed and freed, and later such buffers stay in the heap: docs/operator-scale.md.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_MMAP_THRESHOLD_=131072
WORKDIR /app
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY jobs ./jobs
COPY crds ./crds
# hadolint ignore=DL3013
RUN pip install ".[operator]" \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin idpo
USER 1000:1000
EXPOSE 8080
ENTRYPOINT ["idpo", "operator"]
CMD ["--all-namespaces", "--liveness", "http://0.0.0.0:8080/healthz"]

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS jobs
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HF_HUB_DISABLE_TELEMETRY=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
WORKDIR /app
# Heavy, rarely changing layers first, one layer each so a vLLM bump keeps the torch layer cached.
# hadolint ignore=DL3059
RUN pip install torch==2.13.0
# hadolint ignore=DL3059
RUN pip install vllm==0.32.0
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY jobs ./jobs
# hadolint ignore=DL3013
RUN pip install ".[jobs,tracking]" \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin idpo
USER 1000:1000
# The operator supplies the command (python -m idpo_jobs.<stage> --config ...).
CMD ["python", "-m", "idpo_jobs.generate", "--help"]

# The e2e suite's stage image (IDPO_E2E_IMAGE, docs/testing.md): the jobs image with the test rankers
# (tests/rewards.py) and the test hooks (tests/hooks/sitecustomize.py) in its site-packages, as a platform
# adds its own ranker module. Stages run isolated (python -I): a module reaches them only through the image.
FROM jobs AS e2e
# A test node runs many small stage pods on a few cores. torch's default, a thread per core in each process,
# oversubscribes them, and OpenMP's spin-waiting then burns the CPU the other pods need (a tiny train step:
# about 13 times the CPU seconds of one thread on a loaded 2-core machine; bench/threads.py).
ENV OMP_NUM_THREADS=1
COPY tests/rewards.py tests/hooks/sitecustomize.py /opt/venv/lib/python3.12/site-packages/
