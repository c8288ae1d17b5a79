#!/usr/bin/env bash
# Make every key and certificate deploy/docker-compose.yml mounts, with flexfed's own CA.
#
#   deploy/certs.sh [SECRETS_DIR] [EXTRA_SAN ...]
#
# SECRETS_DIR defaults to deploy/secrets (gitignored). EXTRA_SAN: more DNS names (or IPs) the
# operator certificate must carry, e.g. coordinator.example.org. Writes (nothing is overwritten;
# a second run only fills in what is missing):
#   ca/                    the consortium CA (ca.key stays here: never mounted into a container)
#   public/ca.pem, crl.pem the trust anchor and the CRL, mounted everywhere
#   operator/              key.pem, cert.pem: coordinator + SuperLink TLS and release signing
#                          (SANs coordinator, superlink, fleet-proxy, localhost, 127.0.0.1, EXTRA_SAN)
#   acme/, globex/         each owner's key.pem, cert.pem and Flower node key (node-key, .pub)
# and deploy/.env with FLEXFED_UID (the uid the containers run as: yours, so they can read
# the 0600 keys; 10001 when run as root, after chown). Needs `flexfed` (FLEXFED=path or PATH;
# the repository's .venv is used when present). Run from anywhere.
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,17p' "$0" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/secrets}
shift $(($# > 0 ? 1 : 0))
owners=(acme globex)

if [[ -n ${FLEXFED:-} ]]; then
  flexfed=$FLEXFED
elif [[ -x $here/../.venv/bin/flexfed ]]; then
  flexfed=$here/../.venv/bin/flexfed
else
  flexfed=$(command -v flexfed) || {
    echo "error: flexfed not found (pip install flexfed, or set FLEXFED)" >&2
    exit 2
  }
fi
python=$(dirname "$(realpath "$flexfed")")/python
[[ -x $python ]] || python=python3

umask 077
mkdir -p "$out"
chmod 0700 "$out"
out=$(cd "$out" && pwd)
ca=$out/ca

if [[ ! -f $ca/ca.pem ]]; then
  "$flexfed" ca init --out "$ca" --name "flexfed Consortium CA"
fi

# issue DIR ORG ROLE [SAN options...]: a key and CSR made in DIR, then the CA's certificate.
issue() {
  local dir=$1 org=$2 role=$3
  shift 3
  if [[ ! -f $dir/key.pem ]]; then
    "$flexfed" client keygen --org "$org" --role "$role" --out "$dir"
  fi
  if [[ ! -f $dir/cert.pem ]]; then
    "$flexfed" ca issue "$dir/csr.pem" --ca "$ca" --role "$role" --out "$dir/cert.pem" "$@"
  fi
}

sans=(--san-dns coordinator --san-dns superlink --san-dns fleet-proxy --san-dns localhost --san-ip 127.0.0.1)
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
    sans+=(--san-ip "$name")
  else
    sans+=(--san-dns "$name")
  fi
done
issue "$out/operator" consortium operator "${sans[@]}"

for org in "${owners[@]}"; do
  issue "$out/$org" "$org" owner
  if [[ ! -f $out/$org/node-key ]]; then
    "$python" -m flexfed.client.flower_node keygen "$out/$org/node-key"
  fi
done

# What every container may see: the CA certificate and the CRL, never ca.key.
mkdir -p "$out/public"
cp "$ca/ca.pem" "$out/public/ca.pem"
cp "$ca/crl.pem" "$out/public/crl.pem"
chmod 0755 "$out/public" && chmod 0644 "$out/public/ca.pem" "$out/public/crl.pem"

# The containers run as FLEXFED_UID (group 0) and must read the 0600 keys they mount.
if [[ $(id -u) -eq 0 ]]; then
  uid=10001
  for dir in operator public "${owners[@]}"; do
    chown -R "$uid:0" "$out/$dir"
  done
else
  uid=$(id -u)
fi
env_file=$here/.env
if [[ ! -f $env_file ]] || ! grep -q '^FLEXFED_UID=' "$env_file"; then
  echo "FLEXFED_UID=$uid" >>"$env_file"
fi

"$flexfed" ca show --ca "$ca" >/dev/null
echo "secrets in $out (containers run as uid $uid, see $env_file)"
