#!/usr/bin/env bash
# Make a local Debian bookworm image with Python 3.11 for machines that cannot pull from a registry.
#
#   bash scripts/make-base-os-image.sh [IMAGE]        # default IMAGE: infra-os:bookworm
#
# debootstrap (minbase + python3, venv, pip) into a scratch dir, then `docker import` it with PATH,
# LANG and CMD set (an imported image has none). Skips everything when IMAGE already exists, so it
# is cheap to call from CI on every run. Needs root and a running Docker engine.
# Env: INFRA_DEBIAN_MIRROR (default http://deb.debian.org/debian), DOCKER (CLI to use).
set -euo pipefail

IMAGE=${1:-infra-os:bookworm}
MIRROR=${INFRA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-/usr/bin/docker}
[ -x "$DOCKER" ] || DOCKER=docker

if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "make-base-os-image: debootstrap not found: install it with 'apt-get install -y debootstrap'" >&2
    exit 1
}

# One maker at a time: a second caller waits, then finds the image.
exec 9>/tmp/infra-make-base-os-image.lock
flock 9
if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
    exit 0
fi

ROOT=$(mktemp -d /tmp/infra-os-rootfs.XXXXXX)
LOG=$(mktemp /tmp/infra-os-debootstrap.XXXXXX.log)
trap 'rm -rf "$ROOT" "$LOG"' EXIT

if ! debootstrap --variant=minbase --include=python3,python3-venv,python3-pip \
    bookworm "$ROOT" "$MIRROR" >"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2
    echo "make-base-os-image: debootstrap of bookworm from $MIRROR failed (set INFRA_DEBIAN_MIRROR?)" >&2
    exit 1
fi
# Drop the package caches and lists: nothing in the image runs apt.
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/tmp/*

tar --numeric-owner -C "$ROOT" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase bookworm (infra scripts/make-base-os-image.sh)" \
    - "$IMAGE" >/dev/null
