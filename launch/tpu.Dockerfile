# Training image for GKE TPU slices (launch/gke_tpu_jobset.yaml, launch/gke_xpk.sh): this
# checkout at /app with requirements.txt and the TPU runtime (jax[tpu]) of the pinned jax.
#
#   docker build -f launch/tpu.Dockerfile -t REGISTRY/fusion-jax:TAG . && docker push ...
#
# (run from the repository root; launch/tpu.Dockerfile.dockerignore keeps .venv, .cache and
# run directories out of the build context)
FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir "jax[tpu]==$(sed -n 's/^jax==//p' requirements.txt)"
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
