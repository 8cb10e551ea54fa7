#!/usr/bin/env bash
# Submit a seqface training run to a running Ray cluster as a Ray job.
#
#   RAY_ADDRESS=http://127.0.0.1:8265 CONFIG=configs/cluster-8gpu.yaml \
#       bash launch/submit.sh [section.key=value ...]
#
# Extra arguments are config overrides passed to `seqface train`. RUNTIME_ENV picks the
# runtime env (default launch/runtime_env.yaml; launch/runtime_env_cpu.yaml on CPU).
#
# Token auth (Ray 2.60): the job server refuses requests without the cluster's token.
# This script passes RAY_AUTH_MODE (default: token) and the token through to `ray`, and
# never turns auth off. Where the token is:
#   - `ray up` clusters: ~/.ray/auth_token on the head node. If you ran
#     `ray get-auth-token --generate` before `ray up`, it is already in your ~/.ray; else
#       export RAY_AUTH_TOKEN="$(ray exec cluster/ray-cluster-gpu.yaml 'cat ~/.ray/auth_token' | tail -n1)"
#   - KubeRay (authOptions.mode: token): in the Secret named after the cluster:
#       export RAY_AUTH_TOKEN="$(kubectl get secret seqface -o jsonpath='{.data.auth_token}' | base64 -d)"
#   - a local `ray start --head`: it wrote ~/.ray/auth_token on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray job server, e.g. http://127.0.0.1:8265}"
CONFIG="${CONFIG:-configs/cluster-8gpu.yaml}"
RUNTIME_ENV="${RUNTIME_ENV:-launch/runtime_env.yaml}"
RAY="${RAY:-ray}"

if [[ ! -f "$CONFIG" ]]; then
    echo "submit.sh: config file $CONFIG not found (run from any folder; paths are repo-relative)" >&2
    exit 2
fi
if [[ ! -f "$RUNTIME_ENV" ]]; then
    echo "submit.sh: runtime env $RUNTIME_ENV not found" >&2
    exit 2
fi

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == "token" && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" \
      && ! -s "${HOME}/.ray/auth_token" ]]; then
    echo "submit.sh: RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH" \
         "or ~/.ray/auth_token (see the comment at the top of this script)" >&2
    exit 2
fi

exec "$RAY" job submit --address "$RAY_ADDRESS" --runtime-env "$RUNTIME_ENV" \
    -- seqface train --config "$CONFIG" "$@"
