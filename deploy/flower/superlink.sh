#!/usr/bin/env bash
# Operator: start the consortium's Flower SuperLink (the control plane).
#
#   deploy/flower/superlink.sh STATE_DIR TLS_CERT TLS_KEY CA_CERT [HOST] [PORT]
#
# TLS with the consortium CA's server certificate (the coordinator's: its SANs must name the
# address SuperNodes dial); SuperNode authentication on (only nodes whose public key was
# registered with `flwr supernode register` may connect); runtime dependency installation
# off (nothing is downloaded when a run starts); state in STATE_DIR/superlink.db.
#
# Flower 1.42 serves the Fleet, Control and Runtime APIs on ONE HTTPS port (HOST:PORT,
# default 127.0.0.1:8000, as Flower). Expose only /v1/fleet/ to data owners through a reverse proxy;
# see docs/flower.md ("Exposing only the Fleet API").
set -euo pipefail
# Flower phones home (telemetry, update checks) unless told not to; a consortium host should not.
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0} FLWR_DISABLE_UPDATE_CHECK=${FLWR_DISABLE_UPDATE_CHECK:-1}
if [[ $# -lt 4 ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
state=$1 cert=$2 key=$3 ca=$4 host=${5:-127.0.0.1} port=${6:-8000}
mkdir -p "$state"
exec flower-superlink \
  --ssl-certfile "$cert" --ssl-keyfile "$key" --ssl-ca-certfile "$ca" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --isolation subprocess \
  --database "$state/superlink.db" \
  --host "$host" --port "$port"
