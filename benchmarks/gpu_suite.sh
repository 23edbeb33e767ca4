#!/usr/bin/env bash
# The GPU measurements of issue 5 in one command, for a lent accelerator machine:
#   bash benchmarks/gpu_suite.sh OUT_DIR
# Runs benchmarks.gpu_throughput at the gpu100m preset (about 100M parameters, T=2048, bf16)
# in four configurations, each in its own process under a time limit so that one failure
# leaves the others' results; the lines land in benchmarks/results/gpu_throughput.jsonl and a
# copy of that file and of the log goes to OUT_DIR.
set -u
out=${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$out/suite.log"
run() {
  echo "== gpu_throughput $*" | tee -a "$out/suite.log"
  timeout "${LIMIT_S:-170}" "$py" -m benchmarks.gpu_throughput "$@" 2>&1 | tee -a "$out/suite.log"
}
run --batch_size=16                                  # the reference configuration
run --batch_size=32                                  # more tokens per step
run --batch_size=16 --vocab=100277 --loss_impl=chunked   # the full cl100k vocabulary
run --batch_size=16 --attention=xla                  # XLA attention instead of cuDNN's
cp benchmarks/results/gpu_throughput.jsonl "$out/" 2>/dev/null || echo "no result lines" | tee -a "$out/suite.log"
