#!/usr/bin/env bash
# Build a local Debian base image from Debian's own packages, without any image registry.
#
#   docker/build-base.sh            # ensure a Docker daemon, then build t2/debian-base:bookworm if missing
#   FORCE=1 docker/build-base.sh    # rebuild the image even if the tag exists
#   docker/build-base.sh --daemon   # only make sure a Docker daemon is installed and running
#
# Why: the CPU image (docker/Dockerfile.cpu) needs a Debian + Python base, and on machines that reach
# Debian's package mirrors but no image registry (docker.io, ghcr.io, ...) `FROM debian:bookworm` cannot
# be pulled. debootstrap assembles the same root filesystem from .deb packages; `docker import` turns
# that tarball into an image. Bookworm's python3 is 3.11, the Python our torch CPU wheel is built for.
#
# Environment (all optional):
#   BASE_IMAGE     tag to create                   (default t2/debian-base:bookworm)
#   SUITE          Debian release                  (default bookworm)
#   MIRROR         Debian mirror                   (default: debootstrap's own default mirror)
#   SECURITY_MIRROR mirror of the security suite   (default: the mirror's URL + "-security")
#   FORCE=1        rebuild even if BASE_IMAGE exists
#   STORAGE_DRIVER dockerd storage driver if this script starts the daemon (default: overlay2, then vfs)
#
# Needs root (debootstrap, chroot, starting dockerd). Idempotent: a second run only checks.
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-t2/debian-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-}
FORCE=${FORCE:-0}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}

# Packages on top of debootstrap's minbase variant: Python with venv (for the app's virtual environment)
# and CA certificates (pip over HTTPS). Everything else the image needs is installed by its Dockerfile.
INCLUDE=python3,python3-venv,ca-certificates

log() { printf '[build-base] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot and dockerd need it)"; }

# Install a Debian package if its command is missing.
apt_install() {  # apt_install COMMAND PACKAGE...
    local cmd=$1; shift
    command -v "$cmd" >/dev/null 2>&1 && return 0
    log "installing $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Start dockerd in the background with the given storage driver; succeed once the API answers.
start_dockerd() {  # start_dockerd DRIVER
    local driver=$1 i
    log "starting dockerd (storage driver $driver, log $DOCKERD_LOG)"
    # setsid + nohup: the daemon outlives this script and the terminal that ran it.
    setsid nohup dockerd --storage-driver="$driver" >>"$DOCKERD_LOG" 2>&1 < /dev/null &
    local pid=$!
    for i in $(seq 1 60); do
        if docker info >/dev/null 2>&1; then
            log "dockerd is up (pid $pid, after ${i}s)"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break   # the daemon died: this driver does not work here
        sleep 1
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 1
}

# Make sure a Docker daemon answers. Debian's docker.io package brings dockerd, containerd and runc;
# its systemd unit is used where systemd runs, otherwise (containers, minimal VMs: no init system)
# dockerd is started by hand in the background. overlay2 needs a kernel with overlayfs and a backing
# filesystem such as ext4 or xfs (true on this VM); vfs works everywhere but copies every layer in full.
ensure_docker() {
    if docker info >/dev/null 2>&1; then
        return 0
    fi
    need_root
    apt_install dockerd docker.io
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        log "starting docker with systemd"
        systemctl start docker
        docker info >/dev/null 2>&1 && return 0
        die "systemctl start docker did not bring up the daemon (journalctl -u docker)"
    fi
    if [ -n "${STORAGE_DRIVER:-}" ]; then
        start_dockerd "$STORAGE_DRIVER" || die "dockerd failed with $STORAGE_DRIVER; see $DOCKERD_LOG"
    elif grep -qw overlay /proc/filesystems && start_dockerd overlay2; then
        :
    else
        log "overlay2 unavailable, falling back to vfs (slower, larger on disk)"
        start_dockerd vfs || die "dockerd did not start; see $DOCKERD_LOG"
    fi
}

# Always remove the temporary root filesystem, whatever happens (the chroot's /proc mount included).
WORK=
cleanup() {
    [ -n "$WORK" ] || return 0
    umount "$WORK/rootfs/proc" 2>/dev/null || true
    rm -rf "$WORK"
}

build_base() {
    need_root
    apt_install debootstrap debootstrap

    local rootfs
    WORK=$(mktemp -d /var/tmp/t2-base.XXXXXX)
    rootfs=$WORK/rootfs
    trap cleanup EXIT

    log "debootstrap $SUITE (minbase + $INCLUDE) from ${MIRROR:-the default mirror} into $rootfs"
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$rootfs" ${MIRROR:+"$MIRROR"} \
        > "$WORK/debootstrap.log" 2>&1 || { tail -30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }

    # Apt sources with the security and updates suites, so the image's apt-get sees fixes too; the mirror
    # is the one debootstrap used (it wrote it into the root filesystem's sources.list).
    local url
    url=$(awk '$1 == "deb" {print $2; exit}' "$rootfs/etc/apt/sources.list")
    [ -n "$url" ] || die "no mirror in $rootfs/etc/apt/sources.list"
    cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $url $SUITE main
deb $url $SUITE-updates main
deb ${SECURITY_MIRROR:-$url-security} $SUITE-security main
EOF

    # Keep docs, man pages and translations out of later installs (what Debian's -slim images do).
    cat > "$rootfs/etc/dpkg/dpkg.cfg.d/01-t2-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
    # Apt in the image: no recommends, no cached .debs left behind.
    cat > "$rootfs/etc/apt/apt.conf.d/01-t2-docker" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
EOF

    # Pull in the point-release and security updates published since the suite's release.
    log "applying $SUITE updates inside the root filesystem"
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    mount -t proc proc "$rootfs/proc"
    chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -ec \
        'apt-get update -qq && apt-get -y -qq upgrade && apt-get clean' > "$WORK/upgrade.log" 2>&1 \
        || { tail -30 "$WORK/upgrade.log" >&2; die "apt-get upgrade in the root filesystem failed"; }
    umount "$rootfs/proc"

    # Trim what a container never needs; docker provides resolv.conf, hosts and hostname at run time.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
        "$rootfs"/tmp/* "$rootfs"/var/tmp/*
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    : > "$rootfs/etc/resolv.conf"
    : > "$rootfs/etc/hostname"

    log "importing as $BASE_IMAGE"
    tar --numeric-owner -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase --include=$INCLUDE $SUITE $url" \
        - "$BASE_IMAGE" >/dev/null
    log "done: $(docker image ls --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' "$BASE_IMAGE")"
}

main() {
    case "${1:-}" in
        --daemon) ensure_docker; return 0 ;;
        "") ;;
        *) die "usage: $0 [--daemon]" ;;
    esac
    ensure_docker
    if [ "$FORCE" != 1 ] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "$BASE_IMAGE exists (FORCE=1 rebuilds it)"
        return 0
    fi
    build_base
}

main "$@"
