#!/usr/bin/env bash
# End-to-end check of the compose deployment (`make deploy-test`):
#   base images (a registry's, or built here from Debian packages and cached) -> build the CPU
#   image (<= DEPLOY_TEST_MAX_IMAGE_MB) -> postgres + migrate + api under a unique project name ->
#   a kiosk key made inside the stack -> POST /verify with a real LFW pair through the published
#   port -> restart postgres, the API recovers -> `idverify audit verify` inside the stack ->
#   teardown with volumes. The trap tears down on every exit, so a failed run leaves nothing.
#
# Environment (all optional):
#   DOCKER, COMPOSE           clients (default: Debian's /usr/bin/docker; `docker compose`, else docker-compose)
#   DEPLOY_TEST_BASE          auto | registry | debian: where the base images come from (default auto:
#                             registry images already here, else a pull, else docker/base-images.sh)
#   IDV_BASE_IMAGE, IDV_POSTGRES_IMAGE  use these base images as they are
#   DEPLOY_TEST_LFW           LFW folder with pairs.txt and images/ (default ../shared/data/lfw)
#   DEPLOY_TEST_PORT          published port (default: a free one on 127.0.0.1)
#   DEPLOY_TEST_MAX_IMAGE_MB  size limit of the CPU image (default 700)
#   DEPLOY_TEST_KEEP_BUILD_CACHE=1  keep the untagged build layers (faster reruns)
#   DEPLOY_TEST_PULL_TIMEOUT  seconds a `docker pull` may take in auto mode (default 30)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
# shellcheck source=docker/lib.sh
. "$HERE/lib.sh"
cd "$ROOT"

T0=$SECONDS
STEP=0
STEPS=9
declare -a TIMES=()
step() {
    STEP=$((STEP + 1))
    STEP_T0=$SECONDS
    log "step $STEP/$STEPS: $*"
}
done_step() {
    TIMES+=("$(printf '%-3s %4ss  %s' "$STEP" "$((SECONDS - STEP_T0))" "$1")")
}

# --- clients ------------------------------------------------------------------------------------
"$DOCKER" info >/dev/null 2>&1 || die "no Docker engine answers ($DOCKER info failed)"
if [ -z "${COMPOSE:-}" ]; then
    if "$DOCKER" compose version >/dev/null 2>&1; then COMPOSE="$DOCKER compose"
    elif command -v docker-compose >/dev/null; then COMPOSE="docker-compose"
    else die "neither 'docker compose' (v2) nor docker-compose (v1) is installed"; fi
fi
command -v curl >/dev/null || die "curl is needed to call the API"

PROJECT="idvdt$(date +%y%m%d%H%M%S)$$"
IMAGE="idverify-deploytest:$PROJECT"
WORK="$(mktemp -d "/tmp/$PROJECT.XXXXXX")"
ENV_FILE="$WORK/env"
LFW="${DEPLOY_TEST_LFW:-$ROOT/../shared/data/lfw}"
MAX_MB="${DEPLOY_TEST_MAX_IMAGE_MB:-700}"
DANGLING_BEFORE="$("$DOCKER" images -q --filter dangling=true | sort -u)"
# shellcheck disable=SC2206
DC=($COMPOSE --ansi never -p "$PROJECT" --env-file "$ENV_FILE" -f "$ROOT/docker-compose.yml")

teardown() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ] && [ -f "$ENV_FILE" ]; then
        log "failed (rc $rc); last log lines of the stack:"
        "${DC[@]}" logs --tail 40 >&2 2>&1 || true
    fi
    log "teardown: containers, network and volumes of $PROJECT"
    [ -f "$ENV_FILE" ] && "${DC[@]}" down -v --remove-orphans --timeout 20 >/dev/null 2>&1 || true
    log "teardown: image $IMAGE and its build layers"
    "$DOCKER" image rm "$IMAGE" >/dev/null 2>&1 || true
    if [ "${DEPLOY_TEST_KEEP_BUILD_CACHE:-0}" != 1 ]; then
        # the build stage's untagged layers this run made (the legacy builder keeps them as images)
        comm -13 <(echo "$DANGLING_BEFORE") <("$DOCKER" images -q --filter dangling=true | sort -u) \
            | xargs -r "$DOCKER" image rm >/dev/null 2>&1 || true
    fi
    local left
    left="$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT"; \
            "$DOCKER" volume ls -q --filter "label=com.docker.compose.project=$PROJECT"; \
            "$DOCKER" images -q "$IMAGE")"
    [ -z "$left" ] || { log "error: teardown left $left"; rc=1; }
    rm -rf "$WORK"
    if [ "$rc" -eq 0 ]; then
        TIMES+=("$(printf '%-3s %4ss  %s' "$STEP" "$((SECONDS - STEP_T0))" "teardown")")
        log "timings (step, seconds):"
        printf '  %s\n' "${TIMES[@]}" >&2
        log "deploy-test passed in $((SECONDS - T0)) s (compose: $COMPOSE)"
    else
        log "deploy-test FAILED after $((SECONDS - T0)) s"
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# --- 1. base images -------------------------------------------------------------------------------
step "base images"
have() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }
pull() { have "$1" || timeout "${DEPLOY_TEST_PULL_TIMEOUT:-30}" "$DOCKER" pull -q "$1" >/dev/null 2>&1; }
mode="${DEPLOY_TEST_BASE:-auto}"
if [ -n "${IDV_BASE_IMAGE:-}" ] && [ -n "${IDV_POSTGRES_IMAGE:-}" ]; then
    BASE="$IDV_BASE_IMAGE" PG="$IDV_POSTGRES_IMAGE"
    log "given: $BASE, $PG"
elif [ "$mode" != debian ] && pull python:3.11-slim && pull postgres:16-alpine; then
    BASE=python:3.11-slim PG=postgres:16-alpine
    log "from a registry: $BASE, $PG"
else
    [ "$mode" != registry ] || die "DEPLOY_TEST_BASE=registry, but python:3.11-slim/postgres:16-alpine cannot be pulled"
    log "no registry image: building from Debian packages (cached as idverify-base/*)"
    "$HERE/base-images.sh" all
    BASE=idverify-base/python:3.11-bookworm PG=idverify-base/postgres:15-bookworm
fi
done_step "base images ($BASE, $PG)"

# --- 2. env file (random secrets, never on a command line) -----------------------------------------
step "env file and a free port"
if [ -n "${DEPLOY_TEST_PORT:-}" ]; then PORT="$DEPLOY_TEST_PORT"; else
    PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
(
    # shellcheck disable=SC2046  # KEY=VALUE words
    export $(host_pip_settings | tr '\n' ' ')
    COMPOSE_PROJECT_NAME="$PROJECT" IDV_IMAGE="$IMAGE" IDV_IMAGE_GPU="$IMAGE-gpu" \
    IDV_BASE_IMAGE="$BASE" IDV_POSTGRES_IMAGE="$PG" \
    IDV_PUBLISH_ADDRESS=127.0.0.1 IDV_PUBLISH_PORT="$PORT" IDV_PUBLISH_PORT_GPU=0 \
        "$HERE/make-env.sh" "$ENV_FILE" 2>/dev/null
)
# compose lets the shell's environment override the env file: drop every setting it names
while read -r key; do unset "$key"; done < <(sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' "$ROOT/.env.example")
ADMIN_KEY="$(sed -n 's/^IDV_BOOTSTRAP_ADMIN_KEY=//p' "$ENV_FILE")"
"${DC[@]}" config -q
"${DC[@]}" --profile gpu config -q
log "project $PROJECT, API on 127.0.0.1:$PORT, pip: $(host_pip_settings | cut -d= -f1 | paste -sd' ' - || true)"
done_step "env file, compose config (cpu and gpu profile)"

# --- 3. build -----------------------------------------------------------------------------------
step "build the CPU image $IMAGE"
"${DC[@]}" build api >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; die "the build failed"; }
# the Dockerfile's steps (legacy builder) or BuildKit's
sed 's/\x1b\[[0-9;]*m//g' "$WORK/build.log" | grep -E '^Step [0-9]+/|^#[0-9]+ \[|requirements-from-pyproject' \
    | cut -c1-110 | sed 's/^/  /' >&2 || true
have "$IMAGE" || die "the build did not produce $IMAGE"
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
size_mb=$((size / 1000 / 1000))
log "$IMAGE: $size_mb MB (limit $MAX_MB MB), user $("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")"
[ "$size_mb" -le "$MAX_MB" ] || die "the CPU image is $size_mb MB, over $MAX_MB MB"
[ "$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE" | cut -d: -f1)" != 0 ] || die "the image runs as root"
done_step "build ($size_mb MB)"

# --- 4. up --------------------------------------------------------------------------------------
wait_ready() {  # wait_ready SECONDS: /readyz answers 200 through the published port
    local deadline=$((SECONDS + $1))
    until curl -fsS -o /dev/null "http://127.0.0.1:$PORT/readyz" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die "the API did not become ready on :$PORT within $1 s"
        sleep 2
    done
}
step "up: postgres -> migrate -> api"
"${DC[@]}" up -d 2>&1 | sed 's/^/  /' >&2
wait_ready 240
migrate_rc="$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$("${DC[@]}" ps -a -q migrate)")"
[ "$migrate_rc" = 0 ] || die "migrate exited $migrate_rc"
published="$("$DOCKER" port "$("${DC[@]}" ps -q postgres)" || true)"
[ -z "$published" ] || die "postgres publishes a port: $published"
log "ready: $(curl -fsS "http://127.0.0.1:$PORT/readyz")"
done_step "up until /readyz is 200"

# --- 5. kiosk key -------------------------------------------------------------------------------
step "create a kiosk key inside the stack"
KIOSK_KEY="$("${DC[@]}" exec -T api idverify keys create --role kiosk --name deploy-test | tail -n 1 | tr -d '\r')"
[ -n "$KIOSK_KEY" ] || die "no key printed"
# the bootstrap admin key from the env file works, and lists the new key
curl -fsS -H "X-API-Key: $ADMIN_KEY" "http://127.0.0.1:$PORT/admin/keys" >"$WORK/keys.json" \
    || die "GET /admin/keys with IDV_BOOTSTRAP_ADMIN_KEY failed"
grep -q '"deploy-test"' "$WORK/keys.json" || die "GET /admin/keys does not list the kiosk key"
log "kiosk key ${KIOSK_KEY:0:8}...; GET /admin/keys with the bootstrap admin key lists it"
done_step "kiosk key"

# --- 6. verify ----------------------------------------------------------------------------------
step "POST /verify with an LFW pair (pairs.txt fold 1) on 127.0.0.1:$PORT"
[ -f "$LFW/pairs.txt" ] || die "no $LFW/pairs.txt (set DEPLOY_TEST_LFW)"
read -r NAME N1 N2 < <(sed -n 2p "$LFW/pairs.txt")
IMG1="$(printf '%s/images/%s/%s_%04d.jpg' "$LFW" "$NAME" "$NAME" "$N1")"
IMG2="$(printf '%s/images/%s/%s_%04d.jpg' "$LFW" "$NAME" "$NAME" "$N2")"
verify() {  # verify OUT: POST the pair, the body to OUT, print the status
    curl -sS -o "$1" -w '%{http_code}' -H "X-API-Key: $KIOSK_KEY" \
        -F "id_photo=@$IMG1;type=image/jpeg" -F "live_photo=@$IMG2;type=image/jpeg" \
        "http://127.0.0.1:$PORT/verify"
}
summary() { python3 -c 'import json, sys; b = json.load(open(sys.argv[1])); print({k: b.get(k) for k in ("decision", "score", "threshold", "request_id")})' "$1"; }
status="$(verify "$WORK/verify1.json")"
[ "$status" = 200 ] || { cat "$WORK/verify1.json" >&2; die "/verify answered $status"; }
log "$NAME $N1 vs $N2: $(summary "$WORK/verify1.json")"
done_step "/verify"

# --- 7. postgres restart ------------------------------------------------------------------------
step "restart postgres; the API recovers"
"${DC[@]}" restart postgres 2>&1 | sed 's/^/  /' >&2
wait_ready 120
status="$(verify "$WORK/verify2.json")"
[ "$status" = 200 ] || { cat "$WORK/verify2.json" >&2; die "/verify after the restart answered $status"; }
log "after the restart: $(summary "$WORK/verify2.json")"
done_step "postgres restart, /verify again"

# --- 8. audit chain -----------------------------------------------------------------------------
step "idverify audit verify inside the stack"
"${DC[@]}" exec -T api idverify audit verify 2>&1 | sed 's/^/  /' >&2
[ "${PIPESTATUS[0]}" = 0 ] || die "idverify audit verify failed"
done_step "audit verify"

# --- 9. teardown (the trap) ---------------------------------------------------------------------
step "teardown"
