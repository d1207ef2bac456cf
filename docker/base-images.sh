#!/usr/bin/env bash
# Builds (or reuses) the base images the idverify images and the compose stack need, from Debian
# packages only, for hosts where no image registry answers:
#   idverify-base/debian:bookworm      debootstrap --variant=minbase + `docker import`
#   idverify-base/python:3.11-bookworm Debian's python3.11 + python3-venv   (docker/base/python.Dockerfile)
#   idverify-base/postgres:15-bookworm Debian's postgresql-15 + an initdb entrypoint (docker/base/postgres.Dockerfile)
# Each image carries the label idverify.recipe (a hash of what it was built from); an image whose
# label matches is reused, so only the first run pays for debootstrap.
#
# Environment: DOCKER (client, default: Debian's /usr/bin/docker when present), DEBIAN_MIRROR
# (default: the first Debian mirror in this host's apt sources), DEBIAN_SECURITY_MIRROR,
# DEBIAN_SUITE (default bookworm), NICE (default "nice -n 10"), REBUILD_BASE=1 (ignore the cache).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=docker/lib.sh
. "$HERE/lib.sh"

SUITE="${DEBIAN_SUITE:-bookworm}"
DEBIAN_IMAGE="idverify-base/debian:$SUITE"
PYTHON_IMAGE="idverify-base/python:3.11-$SUITE"
POSTGRES_IMAGE="idverify-base/postgres:15-$SUITE"

recipe_of() { cat "$@" | sha256sum | cut -c1-16; }
image_id() { "$DOCKER" image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
drop_superseded() {  # drop_superseded OLD_ID IMAGE: remove the image IMAGE's tag moved away from
    # (removing a child image already takes its untagged parents with it)
    if [ -n "$1" ] && [ "$1" != "$(image_id "$2")" ] && [ -n "$(image_id "$1")" ]; then
        "$DOCKER" image rm "$1" >/dev/null 2>&1 || log "note: could not remove the superseded $2 ($1)"
    fi
}
cached() {  # cached IMAGE RECIPE: the image exists and was built from RECIPE
    [ "${REBUILD_BASE:-0}" != 1 ] || return 1
    [ "$("$DOCKER" image inspect -f '{{ index .Config.Labels "idverify.recipe" }}' "$1" 2>/dev/null)" = "$2" ]
}

# --- Debian root filesystem ------------------------------------------------------------------
build_debian() {
    local mirror security recipe rootfs old
    mirror="${DEBIAN_MIRROR:-$(host_debian_mirror "$SUITE")}"
    security="${DEBIAN_SECURITY_MIRROR:-$(host_debian_mirror "$SUITE-security")}"
    [ -n "$mirror" ] || die "no Debian mirror for $SUITE in this host's apt sources; set DEBIAN_MIRROR"
    recipe="$(printf 'minbase %s dpkg-slim-v2\n' "$SUITE" | recipe_of -)"
    if cached "$DEBIAN_IMAGE" "$recipe"; then log "reuse $DEBIAN_IMAGE"; return; fi
    command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
    log "debootstrap $SUITE from $mirror (a few minutes, once)"
    rootfs="$(mktemp -d /tmp/idverify-rootfs.XXXXXX)"
    # shellcheck disable=SC2064
    trap "rm -rf '$rootfs'" RETURN
    $NICE debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
    rm -f "$rootfs.log"
    {
        echo "deb $mirror $SUITE main"
        echo "deb $mirror $SUITE-updates main"
        [ -z "$security" ] || echo "deb $security $SUITE-security main"
    } >"$rootfs/etc/apt/sources.list"
    # what the official slim images leave out: docs, man pages, locales (copyright files stay)
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/01-idverify-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
    # and what the official Debian images' docker-clean does: no package caches left in a layer
    cat >"$rootfs/etc/apt/apt.conf.d/01-idverify-slim" <<'CFG'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
CFG
    find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/*
    old="$(image_id "$DEBIAN_IMAGE")"
    tar --numeric-owner -C "$rootfs" -c . \
        | "$DOCKER" import --change 'CMD ["/bin/bash"]' --change "LABEL idverify.recipe=$recipe" \
            - "$DEBIAN_IMAGE" >/dev/null
    OLD_DEBIAN="$old"  # removed once the images built on it are rebuilt
    log "built $DEBIAN_IMAGE"
}

# --- python and postgres, FROM the Debian image ------------------------------------------------
build_from_dockerfile() {  # IMAGE DOCKERFILE [EXTRA CONTEXT FILES...]
    local image="$1" dockerfile="$2" recipe ctx old
    shift 2
    ctx="$(mktemp -d /tmp/idverify-basectx.XXXXXX)"
    # shellcheck disable=SC2064
    trap "rm -rf '$ctx'" RETURN
    cp "$dockerfile" "$ctx/Dockerfile"
    mkdir -p "$ctx/ca"
    # the CAs this host adds to Debian's bundle (a TLS-inspecting proxy, a private index), so the
    # images reach PyPI and the mirrors the way the host does
    cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/" 2>/dev/null || true
    [ $# -eq 0 ] || cp "$@" "$ctx/"
    recipe="$( (echo "$DEBIAN_IMAGE $(image_id "$DEBIAN_IMAGE")"; cat "$ctx"/Dockerfile "$ctx"/ca/* "$@") | recipe_of -)"
    if cached "$image" "$recipe"; then log "reuse $image"; return; fi
    log "build $image"
    old="$(image_id "$image")"
    $NICE "$DOCKER" build -q --build-arg "BASE_IMAGE=$DEBIAN_IMAGE" --label "idverify.recipe=$recipe" \
        -t "$image" "$ctx" >/dev/null
    drop_superseded "$old" "$image"
    log "built $image"
}

OLD_DEBIAN=""
main() {
    local want="${1:-all}"
    build_debian
    case "$want" in all|python) build_from_dockerfile "$PYTHON_IMAGE" "$HERE/base/python.Dockerfile" ;; esac
    case "$want" in all|postgres) build_from_dockerfile "$POSTGRES_IMAGE" "$HERE/base/postgres.Dockerfile" "$HERE/base/postgres-entrypoint.sh" ;; esac
    drop_superseded "$OLD_DEBIAN" "$DEBIAN_IMAGE"
}
main "$@"
