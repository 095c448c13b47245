#!/usr/bin/env bash
# End-to-end check of the CPU image on this machine: build (base if missing, then the image), run it,
# wait until Docker reports it healthy, ask SmolLM2 a question over the published port, check that the
# server runs as a non-root user, then stop and remove the container (the images are kept).
#
#   docker/smoke-test.sh                  # build + run + check
#   SKIP_BUILD=1 docker/smoke-test.sh     # use the existing image as it is
#
# Environment (all optional): IMAGE (t2/server:cpu), PORT (host port on 127.0.0.1, default 8080),
# HEALTH_TIMEOUT (seconds to wait for healthy, default 600), SKIP_BUILD=1.
# Prints a summary: image size, build time, time to healthy, the answer. Exit status 0 = all checks passed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
IMAGE=${IMAGE:-t2/server:cpu}
PORT=${PORT:-8080}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-600}
NAME=t2-smoke-$$
URL=http://127.0.0.1:$PORT

log() { printf '[smoke] %s\n' "$*" >&2; }
fail() {
    log "FAIL: $*"
    if docker container inspect "$NAME" >/dev/null 2>&1; then
        log "last container logs:"
        docker logs --tail 40 "$NAME" >&2 || true
    fi
    exit 1
}

# Remove the container (and its anonymous volumes) however the script ends.
cleanup() {
    if docker container inspect "$NAME" >/dev/null 2>&1; then
        docker rm -f -v "$NAME" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }

# 1. daemon, base image, CPU image
"$here/build-base.sh" --daemon
build_s=skipped
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    start=$(date +%s)
    IMAGE=$IMAGE "$here/build-cpu.sh"
    build_s=$(( $(date +%s) - start ))
fi
docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "no image $IMAGE"
size=$(docker image ls --format '{{.Size}}' "$IMAGE" | head -1)

# 2. run it, published on loopback only
log "starting $NAME from $IMAGE on $URL"
start=$(date +%s)
docker run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null

# 3. wait for Docker's own health status (the image's HEALTHCHECK on /health)
status=starting
while [ "$status" != healthy ]; do
    state=$(docker inspect -f '{{.State.Status}}' "$NAME")
    status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$NAME")
    [ "$state" = running ] || fail "container is $state"
    [ "$status" != unhealthy ] || fail "container is unhealthy"
    [ "$status" != none ] || fail "the image has no HEALTHCHECK"
    [ $(( $(date +%s) - start )) -lt "$HEALTH_TIMEOUT" ] || fail "not healthy after ${HEALTH_TIMEOUT}s"
    sleep 1
done
healthy_s=$(( $(date +%s) - start ))
log "healthy after ${healthy_s}s: $(curl -fsS "$URL/health")"

# 4. the server process (PID 1 in the container) runs as a non-root user
uid=$(docker exec "$NAME" awk '/^Uid:/ {print $2}' /proc/1/status)
user=$(docker exec "$NAME" id -un)
[ "$uid" != 0 ] || fail "the server runs as root"
cmdline=$(docker exec "$NAME" sh -c 'tr "\0" " " < /proc/1/cmdline')
log "server process (PID 1): uid $uid ($user): $cmdline"

# 5. a real chat completion from SmolLM2 through the published port
models=$(curl -fsS "$URL/v1/models" | python3 -c 'import json,sys; print(" ".join(m["id"] for m in json.load(sys.stdin)["data"]))')
log "models: $models"
request='{"model": "auto", "messages": [{"role": "user", "content": "What is the capital of France?"}],
          "max_tokens": 48, "temperature": 0}'
start_req=$(date +%s.%N)
response=$(curl -fsS --max-time 300 "$URL/v1/chat/completions" -H 'content-type: application/json' -d "$request") \
    || fail "the chat completion failed"
request_s=$(python3 -c "import time; print(f'{time.time() - $start_req:.1f}')")
answer=$(printf '%s' "$response" | python3 -c '
import json, sys
r = json.load(sys.stdin)
content, t2 = r["choices"][0]["message"]["content"], r.get("t2", {})
assert content.strip(), "empty answer"
print(repr(content), "| model", r["model"], "| strategy", t2.get("strategy"), "| label", t2.get("label"),
      "| usage", r.get("usage"))') || fail "unexpected response: $response"
log "answer in ${request_s}s: $answer"

# 6. stop (SIGTERM, as `docker stop` and orchestrators do) and clean up; the image stays
start_stop=$(date +%s)
docker stop -t 60 "$NAME" >/dev/null
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
stop_s=$(( $(date +%s) - start_stop ))
docker rm -v "$NAME" >/dev/null

cat <<EOF
smoke test passed
  image:           $IMAGE ($size)
  build time:      ${build_s}$([ "$build_s" = skipped ] || echo ' s')
  time to healthy: ${healthy_s} s (docker run → health status 'healthy')
  request time:    ${request_s} s
  user:            uid $uid ($user)
  answer:          $answer
  stop:            exit code $exit_code after ${stop_s} s
EOF
