#!/usr/bin/env bash
# The same server from the official image (TF Serving 2.17 matches the TF 2.17 export; its TF Text ops are
# linked statically, see docs/serving.md). models.config expects the model under /models/mmv.
#   MODELS=$PWD/exported ./export/run_docker.sh        # exported/mmv/<version>/saved_model.pb
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
MODELS="${MODELS:?set MODELS to the directory that contains mmv/<version>/}"
exec docker run --rm --name mmv-serving \
  -p "${GRPC_PORT:-8500}:8500" -p "${REST_PORT:-8501}:8501" \
  -v "$MODELS:/models:ro" \
  -v "$HERE:/config:ro" \
  "${IMAGE:-tensorflow/serving:2.17.1}" \
  --model_config_file=/config/models.config \
  --enable_batching=true --batching_parameters_file=/config/batching_parameters.txt \
  --monitoring_config_file=/config/monitoring.config \
  --file_system_poll_wait_seconds=5 \
  "$@"
