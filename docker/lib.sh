# shellcheck shell=bash
# Shared by docker/base-images.sh and docker/deploy-test.sh (sourced, not run).

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Debian's client first: /usr/local/bin/docker may be another build without the compose plugin
if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER="$(command -v docker || echo docker)"; fi
fi
NICE="${NICE-nice -n 10}"

# host_debian_mirror SUITE: the first URI this host's apt sources (one-line and deb822) give for SUITE
host_debian_mirror() {
    local suite="$1" f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v s="$suite" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                           if ($(i + 1) == s) { print $i; exit } }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" }
            { uri = ""; hit = 0; deb = 0
              for (i = 1; i <= NF; i++) {
                  if ($i ~ /^URIs:/) { split($i, a, " "); uri = a[2] }
                  if ($i ~ /^Types:.*deb( |$)/) deb = 1
                  if ($i ~ /^Suites:/) { n = split($i, b, " "); for (j = 2; j <= n; j++) if (b[j] == s) hit = 1 }
              }
              if (deb && hit && uri != "") { print uri; exit } }' "$f"
    done | head -n 1
}

# host_pip_settings: PIP_INDEX_URL=..., PIP_EXTRA_INDEX_URL=..., PIP_TRUSTED_HOST=..., PIP_CERT=...
# lines for what this host's pip uses (its environment first, then `pip config`), to hand to the
# image builds as build arguments; file:// indexes and find-links stay on the host
host_pip_settings() {
    local py key env val
    py="$(command -v python3 || true)"
    for key in index-url extra-index-url trusted-host cert; do
        env="PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')"
        val="${!env:-}"
        if [ -z "$val" ] && [ -n "$py" ]; then
            val="$("$py" -m pip config list 2>/dev/null | sed -n "s/^\(global\|install\)\.$key='\(.*\)'\$/\2/p" | head -n 1)"
        fi
        # shellcheck disable=SC2086  # split the space-separated list
        val="$(printf '%s\n' $val | grep -v '^file:' | paste -sd' ' - || true)"
        [ -z "$val" ] || printf '%s=%s\n' "$env" "$val"
    done
}
