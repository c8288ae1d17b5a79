#!/usr/bin/env bash
# Data owner: start this organisation's Flower SuperNode (dials out to the SuperLink).
#
#   deploy/flower/supernode.sh SUPERLINK CA_CERT NODE_KEY DATA CERT KEY WORK_DIR [PORT]
#
# SUPERLINK  host:port of the consortium's SuperLink (Fleet API), verified with CA_CERT
# NODE_KEY   this node's key (deploy/flower/node-key.sh), registered by the operator
# DATA       your training data (file or folder); it never leaves this machine
# CERT, KEY  your consortium certificate and private key (Consortium API, signing)
# WORK_DIR   where anchors, experts and released models are kept
# PORT       this node's local Runtime API port (default 9094; one per SuperNode on a host)
#
# Optional: FLEXFED_COORDINATOR=host:port pins the Consortium API address (plans naming
# another one are refused); FLEXFED_DEVICE=cpu|cuda|auto. The owner's consent:
# FLEXFED_ANCHORS=DIGEST[,DIGEST] (the anchors you approved; others are refused),
# FLEXFED_MAX_STEPS, FLEXFED_MAX_SEQ_LEN, FLEXFED_MAX_TOKENS (what a campaign may ask for).
set -euo pipefail
# Flower phones home (telemetry, update checks) unless told not to; a consortium host should not.
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0} FLWR_DISABLE_UPDATE_CHECK=${FLWR_DISABLE_UPDATE_CHECK:-1}
if [[ $# -lt 7 ]]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
superlink=$1 ca=$2 node_key=$3 data=$4 cert=$5 key=$6 work=$7 port=${8:-9094}
config="data-path=\"$data\" cert=\"$cert\" key=\"$key\" ca=\"$ca\" work-dir=\"$work\""
config+=" device=\"${FLEXFED_DEVICE:-auto}\""
if [[ -n ${FLEXFED_COORDINATOR:-} ]]; then
  config+=" coordinator=\"$FLEXFED_COORDINATOR\""
fi
for pair in anchors:FLEXFED_ANCHORS max-steps:FLEXFED_MAX_STEPS max-seq-len:FLEXFED_MAX_SEQ_LEN \
            max-tokens:FLEXFED_MAX_TOKENS; do
  name=${pair%%:*} var=${pair#*:}
  if [[ -n ${!var:-} ]]; then
    config+=" $name=\"${!var}\""
  fi
done
exec flower-supernode \
  --superlink "$superlink" \
  --root-certificates "$ca" \
  --auth-supernode-private-key "$node_key" \
  --node-config "$config" \
  --isolation subprocess \
  --host 127.0.0.1 --port "$port"
