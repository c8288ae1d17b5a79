#!/usr/bin/env bash
# Operator: write the `flwr` CLI's SuperLink connection (used by `flwr run`, `flwr supernode
# register`, `flwr ls`), into $FLWR_HOME/config.toml (default ~/.flwr/config.toml).
#
#   deploy/flower/connection.sh NAME ADDRESS CA_CERT
#
# ADDRESS is the SuperLink's host:port as the operator reaches it (the Control API).
set -euo pipefail
# Flower phones home (telemetry, update checks) unless told not to; a consortium host should not.
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0} FLWR_DISABLE_UPDATE_CHECK=${FLWR_DISABLE_UPDATE_CHECK:-1}
if [[ $# -ne 3 ]]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
name=$1 address=$2 ca=$(realpath "$3")
home=${FLWR_HOME:-$HOME/.flwr}
mkdir -p "$home"
config=$home/config.toml
if [[ -f $config ]] && grep -q "^\[superlink\.$name\]" "$config"; then
  echo "error: $config already has a connection named $name" >&2
  exit 2
fi
if [[ ! -f $config ]] || ! grep -q '^\[superlink\]' "$config"; then
  printf '[superlink]\ndefault = "%s"\n' "$name" >>"$config"
fi
printf '\n[superlink.%s]\naddress = "%s"\nroot-certificates = "%s"\n' \
  "$name" "$address" "$ca" >>"$config"
echo "wrote SuperLink connection $name ($address) to $config"
