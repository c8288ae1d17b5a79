#!/usr/bin/env bash
# Operator: run a campaign on the connected SuperNodes and wait for its report.
#
#   deploy/flower/campaign.sh CONNECTION KEY=VALUE...
#
# e.g. deploy/flower/campaign.sh consortium campaign='"train"' \
#        consortium-address='"coord.example:7443"' anchor-digest='"sha256:..."' min-nodes=3
# Values are TOML (strings quoted). Settings: deploy/flower-app/pyproject.toml.
set -euo pipefail
# Flower phones home (telemetry, update checks) unless told not to; a consortium host should not.
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0} FLWR_DISABLE_UPDATE_CHECK=${FLWR_DISABLE_UPDATE_CHECK:-1}
if [[ $# -lt 1 ]]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
connection=$1
shift
exec flwr run "$here/../flower-app" "$connection" --run-config "$*" --stream
