#!/usr/bin/env bash
# Data owner: make this SuperNode's authentication key (ECDSA P-384, OpenSSH format).
#
#   deploy/flower/node-key.sh KEY_PATH
#
# Keep KEY_PATH on the node; send KEY_PATH.pub to the consortium operator, who registers it
# with deploy/flower/register-node.sh. This is not your consortium signing key.
set -euo pipefail
if [[ $# -ne 1 ]]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
exec python -m flexfed.client.flower_node keygen "$1"
