#!/usr/bin/env bash
# Production path: stock tensorflow_model_server (Google's APT repo `tensorflow-model-server`, or the docker
# image, see run_docker.sh) serving the SavedModels written by `mmv-tf export --export_dir $MODELS/mmv`.
#   MODELS=/srv/models ./export/run_tensorflow_model_server.sh
# gRPC on 8500, REST on 8501. Version dirs appear atomically, so new exports are picked up by polling.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
MODELS="${MODELS:-/models}"
exec tensorflow_model_server \
  --port="${GRPC_PORT:-8500}" \
  --rest_api_port="${REST_PORT:-8501}" \
  --model_config_file="${MODEL_CONFIG:-$HERE/models.config}" \
  --model_config_file_poll_wait_seconds=60 \
  --file_system_poll_wait_seconds=5 \
  --enable_batching=true \
  --batching_parameters_file="$HERE/batching_parameters.txt" \
  --enable_model_warmup=true \
  --tensorflow_intra_op_parallelism="${INTRA_OP:-0}" \
  --tensorflow_inter_op_parallelism="${INTER_OP:-0}" \
  --monitoring_config_file="$HERE/monitoring.config" \
  "$@"
