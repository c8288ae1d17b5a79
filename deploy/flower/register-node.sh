#!/usr/bin/env bash
# Operator: allow a data owner's SuperNode to connect (SuperNode authentication).
#
#   deploy/flower/register-node.sh PUBLIC_KEY ORG [CONNECTION]
#
# PUBLIC_KEY is the owner's node-key .pub file; ORG names the node in campaign reports.
# CONNECTION is the `flwr` SuperLink connection (default: the default one). Flower 1.42 has
# no `flower-superlink --auth-list-public-keys` any more: keys are registered at run time
# through the Control API and kept in the SuperLink's database.
set -euo pipefail
# Flower phones home (telemetry, update checks) unless told not to; a consortium host should not.
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0} FLWR_DISABLE_UPDATE_CHECK=${FLWR_DISABLE_UPDATE_CHECK:-1}
if [[ $# -lt 2 ]]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
exec flwr supernode register "$1" ${3:+"$3"} --name "$2"
