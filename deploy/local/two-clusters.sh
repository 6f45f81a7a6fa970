#!/usr/bin/env bash
# A two-cluster, two-network Istio mesh on this machine, in network namespaces (root and iproute2 needed).
#
#   deploy/local/two-clusters.sh                builds, starts the mesh, calls helloworld 10 times from
#                                               cluster1, tears everything down; exits 0 only if both
#                                               clusters answered
#   CG_STATE=DIR deploy/local/two-clusters.sh up | check [N] | down | ...   step by step (see usage below);
#                                               tests/two_clusters.rs drives the mesh this way
#
# Topology (PREFIX is cg<pid of `up`>, so that runs side by side never collide):
#
#   PREFIX-net1: cluster1, network1       PREFIX-inet: the internet          PREFIX-net2: cluster2, network2
#     pods, their addresses on lo:          crossgate-control on 172.31.0.10   pods, their addresses on lo:
#       helloworld-v1 10.244.1.11:5000      (:15010 discovery, :15014 admin)     helloworld-v2 10.244.2.11:5000
#       crossgate-sleep (the client)        forwards between its two legs
#     gateway1 *:15443                                                         gateway2 *:15443
#     wan 172.31.1.1 <-- veth --> c1 172.31.1.254            c2 172.31.2.254 <-- veth --> wan 172.31.2.1
#
# A cluster's network routes only to 172.31.0.0/16: cluster1 reaches cluster2's pods only through gateway2's
# address, as two clusters whose pod networks do not route to each other. Certificates come from
# `crossgate-control certs`: one root, one intermediate per cluster (Istio's cacerts), a leaf per workload.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CONTROL_ADDR=172.31.0.10
GATEWAY_PORT=15443
HELLO_PORT=5000
SERVICE_ACCOUNT=spiffe://cluster.local/ns/sample/sa

usage() {
    cat <<EOF
usage: $0 [run]                  build, up, check 10, down
       CG_STATE=DIR $0 COMMAND     with the mesh's state (logs, certificates, mesh file) in DIR:
  preflight                      exits non-zero, saying why, if namespaces cannot be made here
  up                             build (unless CG_BIN_DIR names the binaries), start the mesh
  check [N]                      cluster1's client calls helloworld N times (default 10)
  client CLUSTER [FLAGS...]      run crossgate-sleep in CLUSTER (CG_CLIENT_CERTS: another cert dir)
  helloworld CLUSTER VERSION NAME IP   start one more workload and add it to the mesh file
  stop-workloads CLUSTER         kill CLUSTER's helloworlds (the mesh file still lists them)
  restart-gateway CLUSTER        SIGTERM CLUSTER's gateway, start a new one once the port is free
  stop-control                   kill crossgate-control (SIGKILL)
  metrics CLUSTER                the running gateway's /stats/prometheus
  down                           kill every process in the namespaces, delete them
env: CG_RELEASE=1 builds with --release; CG_DRAIN_DURATION (default 1s) is the gateways' --drain-duration;
     CG_KEEP_STATE=1 keeps the state directory of a plain run; CG_ENVOY="cluster2" (or "cluster1 cluster2") runs
     a real Envoy (envoy on PATH) as those clusters' gateway, fed by the same control service from the bootstrap
     of `crossgate-control bootstrap envoy`.
EOF
}

die() {
    echo "two-clusters: $*" >&2
    exit 1
}

now_ms() {
    date +%s%3N
}

# --- state -----------------------------------------------------------------------------------------------

need_state() {
    [[ -n ${CG_STATE:-} ]] || die "set CG_STATE to the mesh's state directory"
    STATE=$CG_STATE
}

load_state() {
    need_state
    [[ -f $STATE/env ]] || die "no mesh in $STATE (run up first)"
    # shellcheck source=/dev/null
    source "$STATE/env"
}

ns_of() {
    case $1 in
    cluster1 | cluster2) echo "$PREFIX-net${1#cluster}" ;;
    inet) echo "$PREFIX-inet" ;;
    *) die "no cluster $1 (cluster1 or cluster2)" ;;
    esac
}

# The gateway's address on the internet: what the other cluster's clients dial.
gateway_addr() {
    echo "172.31.${1#cluster}.1:$GATEWAY_PORT"
}

# --- processes -------------------------------------------------------------------------------------------

# spawn NAME CLUSTER|inet COMMAND...: runs COMMAND in the namespace, detached, logging to logs/NAME.log.
# `ip netns exec` execs COMMAND, so the pid recorded is COMMAND's own.
spawn() {
    local name=$1 ns
    ns=$(ns_of "$2")
    shift 2
    ip netns exec "$ns" "$@" </dev/null >"$STATE/logs/$name.log" 2>&1 &
    echo $! >"$STATE/pids/$name"
    # Ours to kill, not bash's to report.
    disown $!
}

# wait_for WHAT PROCESS COMMAND...: polls COMMAND for up to 30 s, and gives up at once if PROCESS (a name
# in pids/; - for none) has exited.
wait_for() {
    local what=$1 name=$2 deadline problem=""
    shift 2
    deadline=$(($(now_ms) + 30000))
    until "$@"; do
        if [[ $name != - ]] && ! kill -0 "$(cat "$STATE/pids/$name")" 2>/dev/null; then
            problem="$name exited"
        elif (($(now_ms) > deadline)); then
            problem="not within 30 s"
        fi
        if [[ -n $problem ]]; then
            [[ $name == - ]] || tail -n 20 "$STATE/logs/$name.log" >&2 || true
            die "$what: $problem"
        fi
        sleep 0.01
    done
}

# http_get CLUSTER|inet ADDR PORT PATH: a plain HTTP/1.1 GET (Envoy refuses HTTP/1.0) from inside the namespace,
# with bash alone.
http_get() {
    local ns
    ns=$(ns_of "$1")
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 5 ip netns exec "$ns" bash -c \
        'exec 3<>"/dev/tcp/$1/$2" && printf "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" "$3" "$1" >&3 && cat <&3' _ "$2" "$3" "$4"
}

answers_200() {
    http_get "$@" 2>/dev/null | head -n 1 | grep -q ' 200 '
}

# listening CLUSTER ADDR: something listens on ADDR (IP:PORT, or :PORT for any address).
listening() {
    local ns
    ns=$(ns_of "$1")
    [[ -n $(ip netns exec "$ns" ss -Hltn "src $2") ]]
}

not_listening() {
    ! listening "$@"
}

# --- the network -----------------------------------------------------------------------------------------

make_network() {
    local n ns inet
    inet=$(ns_of inet)
    ip netns add "$inet"
    ip -n "$inet" link set lo up
    ip -n "$inet" addr add "$CONTROL_ADDR/32" dev lo
    # The internet forwards between the clusters' networks.
    ip netns exec "$inet" sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'
    for n in 1 2; do
        ns=$(ns_of "cluster$n")
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip -n "$ns" link add wan type veth peer name "c$n" netns "$inet"
        ip -n "$ns" addr add "172.31.$n.1/24" dev wan
        ip -n "$inet" addr add "172.31.$n.254/24" dev "c$n"
        ip -n "$ns" link set wan up
        ip -n "$inet" link set "c$n" up
        ip -n "$ns" route add 172.31.0.0/16 via "172.31.$n.254"
    done
}

# --- certificates ----------------------------------------------------------------------------------------

make_pki() {
    local certs=$STATE/certs cluster
    "$BIN/crossgate-control" certs root-ca --out "$certs" >/dev/null
    for cluster in cluster1 cluster2; do
        "$BIN/crossgate-control" certs intermediate "$cluster" --out "$certs" >/dev/null
        leaf "$cluster" "sleep-$cluster" sleep
    done
}

# leaf CLUSTER NAME SERVICE_ACCOUNT: a workload certificate from CLUSTER's intermediate, in certs/NAME.
leaf() {
    "$BIN/crossgate-control" certs leaf --ca-dir "$STATE/certs/$1" --uri "$SERVICE_ACCOUNT/$3" \
        --out "$STATE/certs/$2" >/dev/null
}

# --- the mesh --------------------------------------------------------------------------------------------

# The mesh file, from the workloads list (lines: CLUSTER VERSION NAME IP); renamed into place, so that the
# control service never reads half a file.
write_mesh() {
    local n cluster version name ip endpoints
    {
        echo "# Written by two-clusters.sh: helloworld in two clusters on two networks."
        echo "clusters:"
        for n in 1 2; do
            endpoints=""
            while read -r cluster version name ip; do
                [[ $cluster == "cluster$n" ]] || continue
                endpoints+="
    - address: $ip
      labels: { app: helloworld, version: $version, security.istio.io/tlsMode: istio }
      workload_name: $name"
            done <"$STATE/workloads"
            cat <<EOF
- name: cluster$n
  network: network$n
  services:
  - name: helloworld
    namespace: sample
    ports: [{ name: http, port: $HELLO_PORT, target_port: $HELLO_PORT }]
    endpoints:${endpoints:- []}
EOF
        done
    } >"$STATE/.mesh.yaml.new"
    mv "$STATE/.mesh.yaml.new" "$STATE/mesh.yaml"
}

start_helloworld() {
    local cluster=$1 version=$2 name=$3 ip=$4
    leaf "$cluster" "$name" helloworld
    ip -n "$(ns_of "$cluster")" addr add "$ip/32" dev lo
    spawn "$name" "$cluster" "$BIN/crossgate-helloworld" --listen "$ip:$HELLO_PORT" --cert-dir "$STATE/certs/$name" \
        --version "$version" --instance "$name" --cluster "$cluster"
    wait_for "$name listening" "$name" listening "$cluster" "$ip:$HELLO_PORT"
}

start_control() {
    spawn control inet "$BIN/crossgate-control" run --mesh "$STATE/mesh.yaml" --cluster-id cluster1 \
        --listen "$CONTROL_ADDR:15010" --admin-addr "$CONTROL_ADDR:15014" --debounce 20ms
    wait_for "crossgate-control ready" control answers_200 inet "$CONTROL_ADDR" 15014 /ready
}

# Each gateway process of a cluster is a generation. The listener is always :15443; the status, metrics and
# admin ports move on with each generation, because a draining gateway keeps its own until it exits.
start_gateway() {
    local cluster=$1 generation=$2 n=${1#cluster}
    local offset=$((generation * 1000))
    echo "$generation" >"$STATE/gateway-$cluster.generation"
    if [[ " ${CG_ENVOY:-} " == *" $cluster "* ]]; then
        start_envoy "$cluster" "$generation" "$offset"
        return
    fi
    # One worker each: two gateways, a control service and the workloads share the machine.
    spawn "gateway-$cluster-$generation" "$cluster" "$BIN/crossgate-proxy" \
        --xds "http://$CONTROL_ADDR:15010" --cluster-id "$cluster" --network "network$n" \
        --requested-network-view "network$n" --node-id "gateway-$cluster-$generation" \
        --listen "0.0.0.0:$GATEWAY_PORT" --status-addr "0.0.0.0:$((15021 + offset))" \
        --metrics-addr "0.0.0.0:$((15090 + offset))" --admin-addr "127.0.0.1:$((15000 + offset))" \
        --drain-duration "${CG_DRAIN_DURATION:-1s}" --workers 1
    ln -sfn "gateway-$cluster-$generation" "$STATE/pids/gateway-$cluster"
    wait_for "gateway of $cluster ready" "gateway-$cluster-$generation" \
        answers_200 "$cluster" 127.0.0.1 $((15021 + offset)) /healthz/ready
}

# A real Envoy as the cluster's gateway: the same identity, ports and readiness as crossgate's, from the control
# service's bootstrap (delta ADS; it learns the :15443 listener over LDS).
start_envoy() {
    local cluster=$1 generation=$2 offset=$3 n=${1#cluster}
    local bootstrap="$STATE/envoy-$cluster-$generation.json"
    command -v envoy >/dev/null || die "CG_ENVOY names $cluster, but envoy is not on PATH (benches/install-peers.sh)"
    "$BIN/crossgate-control" bootstrap envoy --node-id "gateway-$cluster-$generation" --cluster-id "$cluster" \
        --network "network$n" --requested-network-view "network$n" --xds "$CONTROL_ADDR:15010" \
        --admin-port $((15000 + offset)) --status-port $((15021 + offset)) --metrics-port $((15090 + offset)) \
        >"$bootstrap" || die "cannot write the Envoy bootstrap"
    # A base id of its own per process: two Envoys on one machine must not share shared memory.
    spawn "gateway-$cluster-$generation" "$cluster" envoy -c "$bootstrap" --concurrency 1 -l warning \
        --base-id $((n * 100 + generation)) --drain-time-s 1
    ln -sfn "gateway-$cluster-$generation" "$STATE/pids/gateway-$cluster"
    wait_for "Envoy gateway of $cluster ready" "gateway-$cluster-$generation" \
        answers_200 "$cluster" 127.0.0.1 $((15021 + offset)) /healthz/ready
    echo "== gateway of $cluster: a real Envoy ($(envoy --version | grep -o 'version: [^ ]*')), fed by crossgate-control"
}

build() {
    local profile=debug flags=()
    if [[ ${CG_RELEASE:-} == 1 ]]; then
        profile=release
        flags=(--release)
    fi
    local build=(cargo build "${flags[@]}" -p crossgate-proxy -p crossgate-control -p crossgate-e2e --bins)
    echo "== ${build[*]}"
    (cd "$REPO" && "${build[@]}")
    BIN=${CARGO_TARGET_DIR:-$REPO/target}/$profile
}

up() {
    need_state
    [[ ! -e $STATE/env ]] || die "$STATE already holds a mesh (run down first)"
    mkdir -p "$STATE/pids" "$STATE/logs"
    if [[ -n ${CG_BIN_DIR:-} ]]; then BIN=$CG_BIN_DIR; else build; fi
    local bin
    for bin in crossgate-proxy crossgate-control crossgate-helloworld crossgate-sleep; do
        [[ -x $BIN/$bin ]] || die "$BIN/$bin is missing: cargo build -p crossgate-proxy -p crossgate-control -p crossgate-e2e --bins"
    done
    PREFIX=cg$$
    printf 'PREFIX=%q\nBIN=%q\n' "$PREFIX" "$BIN" >"$STATE/env"
    echo "== namespaces $PREFIX-net1, $PREFIX-net2, $PREFIX-inet; state in $STATE"
    make_network
    make_pki
    printf '%s\n' "cluster1 v1 helloworld-v1 10.244.1.11" "cluster2 v2 helloworld-v2 10.244.2.11" >"$STATE/workloads"
    local cluster version name ip
    while read -r cluster version name ip <&3; do
        start_helloworld "$cluster" "$version" "$name" "$ip"
    done 3<"$STATE/workloads"
    write_mesh
    start_control
    start_gateway cluster1 0
    start_gateway cluster2 0
    echo "== up: gateway1 $(gateway_addr cluster1), gateway2 $(gateway_addr cluster2), control $CONTROL_ADDR:15010"
}

down() {
    need_state
    [[ -f $STATE/env ]] || return 0
    # shellcheck source=/dev/null
    source "$STATE/env"
    local ns pids deadline
    for ns in "$PREFIX-net1" "$PREFIX-net2" "$PREFIX-inet"; do
        [[ -e /run/netns/$ns ]] || continue
        # Everything in these namespaces was started here; `ip netns pids` finds it, by id, even a process
        # whose pid file is gone.
        deadline=$(($(now_ms) + 5000))
        while pids=$(ip netns pids "$ns") && [[ -n $pids ]] && (($(now_ms) < deadline)); do
            # shellcheck disable=SC2086 # one pid per word
            kill -KILL $pids 2>/dev/null || true
            sleep 0.05
        done
        ip netns del "$ns"
    done
    rm -f "$STATE/env"
    echo "== down: $PREFIX"
}

client() {
    local cluster=$1 n=${1#cluster}
    shift
    ip netns exec "$(ns_of "$cluster")" "$BIN/crossgate-sleep" --mesh "$STATE/mesh.yaml" --network "network$n" \
        --gateway "network1=$(gateway_addr cluster1)" --gateway "network2=$(gateway_addr cluster2)" \
        --cert-dir "${CG_CLIENT_CERTS:-$STATE/certs/sleep-$cluster}" "$@"
}

restart_gateway() {
    local cluster=$1 generation old closed ready
    generation=$(cat "$STATE/gateway-$cluster.generation")
    old=$(cat "$STATE/pids/gateway-$cluster")
    kill -TERM "$old"
    echo "gateway of $cluster: SIGTERM to pid $old (it drains: the listener closes after ${CG_DRAIN_DURATION:-1s})"
    wait_for "the old gateway's listener closed" - not_listening "$cluster" ":$GATEWAY_PORT"
    closed=$(now_ms)
    start_gateway "$cluster" $((generation + 1))
    ready=$(now_ms)
    echo "gateway of $cluster: pid $(cat "$STATE/pids/gateway-$cluster") serving; for $((ready - closed)) ms no" \
        "gateway took new connections on :$GATEWAY_PORT"
}

stop_workloads() {
    local cluster version name ip
    while read -r cluster version name ip <&3; do
        [[ $cluster == "$1" ]] || continue
        kill -KILL "$(cat "$STATE/pids/$name")" 2>/dev/null || true
        wait_for "$name stopped" - not_listening "$cluster" "$ip:$HELLO_PORT"
        echo "stopped $name ($ip); the mesh file still lists it"
    done 3<"$STATE/workloads"
}

run() {
    CG_STATE=$(mktemp -d "${TMPDIR:-/tmp}/crossgate-two-clusters.XXXXXX")
    export CG_STATE
    trap finish EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    up
    echo "== cluster1's client calls helloworld"
    load_state
    client cluster1 --calls 10
}

# The EXIT trap of a plain run: logs on failure, then down, whatever happened.
finish() {
    local status=$?
    if ((status != 0)) && [[ -d $CG_STATE/logs ]]; then
        local log
        for log in "$CG_STATE"/logs/*.log; do
            [[ -e $log ]] && { echo "--- $log"; tail -n 5 "$log"; } >&2
        done
    fi
    down || true
    if [[ ${CG_KEEP_STATE:-} == 1 ]]; then echo "state kept in $CG_STATE"; else rm -rf "$CG_STATE"; fi
    exit "$status"
}

preflight() {
    ((EUID == 0)) || die "network namespaces need root (running as uid $EUID)"
    command -v ip >/dev/null || die "iproute2's ip is not installed"
    local probe=cgprobe$$
    ip netns add "$probe" 2>/dev/null || die "cannot create a network namespace here"
    if ! ip -n "$probe" link add probe0 type veth peer name probe1 2>/dev/null; then
        ip netns del "$probe"
        die "cannot create veth pairs here"
    fi
    ip netns del "$probe"
}

command=${1:-run}
[[ $# == 0 ]] || shift
case $command in
run) run ;;
preflight) preflight ;;
up)
    # A failed start leaves nothing behind.
    trap 'status=$?; ((status == 0)) || down; exit $status' EXIT
    up
    ;;
down) down ;;
check) load_state && client cluster1 --calls "${1:-10}" ;;
client)
    load_state
    [[ $# -ge 1 ]] || die "client CLUSTER [FLAGS...]"
    client "$@"
    ;;
helloworld)
    load_state
    [[ $# == 4 ]] || die "helloworld CLUSTER VERSION NAME IP"
    start_helloworld "$@"
    echo "$*" >>"$STATE/workloads"
    write_mesh
    echo "started $3 at $4:$HELLO_PORT in $1; mesh file updated"
    ;;
stop-workloads) load_state && ns_of "${1:-}" >/dev/null && stop_workloads "$1" ;;
restart-gateway) load_state && ns_of "${1:-}" >/dev/null && restart_gateway "$1" ;;
stop-control)
    load_state
    kill -KILL "$(cat "$STATE/pids/control")"
    echo "crossgate-control killed"
    ;;
metrics)
    load_state
    generation=$(cat "$STATE/gateway-${1:-}.generation")
    http_get "$1" 127.0.0.1 $((15090 + generation * 1000)) /stats/prometheus
    ;;
-h | --help | help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
