#!/usr/bin/env bash
# Writes an env file for docker-compose.yml from .env.example, filling each empty secret
# (POSTGRES_PASSWORD, IDV_BOOTSTRAP_ADMIN_KEY, IDV_IMAGE_KEY, IDV_KEY_PEPPER) with a fresh random value, so no
# secret is typed on a command line. Never overwrites: an existing file is left as it is.
#   docker/make-env.sh [OUT]            # OUT defaults to .env beside docker-compose.yml
#   KEY=VALUE ... docker/make-env.sh    # other settings from .env.example, taken from the environment
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$ROOT/.env}"
if [ -e "$out" ]; then
    echo "make-env: $out exists; left unchanged" >&2
    exit 0
fi
hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
urlsafe_b64() { head -c "$1" /dev/urandom | base64 -w0 | tr '+/' '-_'; }
umask 077
tmp="$(mktemp "$out.XXXXXX")"
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        POSTGRES_PASSWORD=) line="POSTGRES_PASSWORD=$(hex 24)" ;;
        IDV_BOOTSTRAP_ADMIN_KEY=) line="IDV_BOOTSTRAP_ADMIN_KEY=$(hex 32)" ;;
        IDV_IMAGE_KEY=) line="IDV_IMAGE_KEY=$(urlsafe_b64 32)" ;;
        IDV_KEY_PEPPER=) line="IDV_KEY_PEPPER=$(hex 32)" ;;
        [A-Z]*=*)
            key="${line%%=*}"
            if [ -n "${!key+set}" ]; then line="$key=${!key}"; fi ;;
    esac
    printf '%s\n' "$line"
done <"$ROOT/.env.example" >"$tmp"
mv "$tmp" "$out"
echo "make-env: wrote $out (mode 600); back it up: the secrets in it are the only copy" >&2
