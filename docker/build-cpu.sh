#!/usr/bin/env bash
# Build the CPU image (docker/Dockerfile.cpu) on this machine, with no image registry:
#
#   docker/build-cpu.sh                 # → t2/server:cpu
#   IMAGE=t2/server:dev docker/build-cpu.sh --no-cache
#
# Steps: 1. make sure a Docker daemon runs and the local Debian base exists (docker/build-base.sh);
#        2. stage the torch CPU wheel into docker/wheels/ (gitignored): pip finds it where this machine's
#           pip configuration points (a local wheel folder here), since PyPI's Linux torch is a CUDA build;
#           it also stages this machine's local CA certificates (docker/certs/, gitignored) for pip;
#        3. docker build with the repository root as context. Extra arguments go to `docker build`.
#
# Environment (all optional): IMAGE (default t2/server:cpu), BASE_IMAGE (default t2/debian-base:bookworm),
# TORCH_SPEC (default torch==2.13.0), DOCKER_NETWORK (docker build --network, e.g. host; default: the
# daemon's default bridge, which reaches the package mirrors on this VM).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
IMAGE=${IMAGE:-t2/server:cpu}
export BASE_IMAGE=${BASE_IMAGE:-t2/debian-base:bookworm}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

log() { printf '[build-cpu] %s\n' "$*" >&2; }

# 1. daemon + base image (both idempotent)
"$here/build-base.sh"

# 2. the torch CPU wheel, for CPython 3.11 on this architecture (the base is bookworm: Python 3.11)
wheels=$here/wheels
mkdir -p "$wheels"
version=${TORCH_SPEC#torch==}
if compgen -G "$wheels/torch-${version}+cpu-cp311-*.whl" >/dev/null; then
    log "torch CPU wheel already staged in $wheels"
else
    log "staging the torch CPU wheel ($TORCH_SPEC) into $wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --platform "manylinux_2_28_$(uname -m)" -d "$wheels" "$TORCH_SPEC"
fi
# Refuse a CUDA wheel (several GB); the CPU build carries a '+cpu' local version.
for whl in "$wheels"/torch-*.whl; do
    case $whl in
        *+cpu-*) ;;
        *) log "error: $whl is not a CPU build of torch; remove it and stage a +cpu wheel"; exit 1 ;;
    esac
done

# Local CA certificates of this machine (e.g. a TLS-intercepting proxy in front of PyPI), trusted by the
# image's build stage only; an empty folder when there are none. Staged afresh on every build.
certs=$here/certs
mkdir -p "$certs"
find "$certs" -mindepth 1 -name '*.crt' -delete
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$certs/"
    log "staged $(find "$certs" -name '*.crt' | wc -l) local CA certificate(s) for the build stage"
fi

# 3. the image
args=(-f "$here/Dockerfile.cpu" --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_SPEC=$TORCH_SPEC"
      -t "$IMAGE")
if [ -n "${DOCKER_NETWORK:-}" ]; then
    args+=(--network "$DOCKER_NETWORK")
fi
log "docker build ${args[*]} $* $root"
start=$(date +%s)
docker build "${args[@]}" "$@" "$root"
log "built $IMAGE in $(( $(date +%s) - start )) s: $(docker image ls --format '{{.Size}}' "$IMAGE")"
