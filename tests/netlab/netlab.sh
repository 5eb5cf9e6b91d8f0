#!/usr/bin/env bash
# tincan's NAT lab: a small internet of network namespaces (docs/netlab.md).
#
#   netlab.sh up   --prefix P [--state DIR] [--delay-ms N] [--loss PCT]
#                  [--udp-timeout S] [--delay-bin PATH] NODE...
#   netlab.sh down --prefix P [--state DIR]
#   netlab.sh gc                    # removes labs of test processes that died
#   netlab.sh exec --prefix P NODE [router] -- CMD...   # for debugging by hand
#
# NODE is NAME:KIND[:delay=MS][:loss=PCT][:udp_timeout=S], KIND one of
#   public       a host with an address on the internet (203.0.113.10+i)
#   cone-drop    behind a port-preserving NAT (nft masquerade) that drops
#                unsolicited inbound packets
#   cone-reject  the same NAT, but unsolicited inbound is rejected (ICMP)
#   symmetric    nft masquerade fully-random (new random port per flow); drops
#   udp-blocked  cone NAT whose router lets no UDP out except to the tracker
#
# Namespaces (all named P-...): P-inet holds the bridge "internet"
# 203.0.113.0/24; P-trk is the tracker host 203.0.113.1; node i gets the
# namespace P-NAME (its host) and, behind a NAT, P-NAME-r (its router, WAN
# 203.0.113.(10+i), LAN 10.i.0.0/24, host 10.i.0.2). Nothing is connected to the
# namespace the script runs in, so no packet leaves the lab.
#
# Delay: the node's edge (the router, or the public host itself) queues every
# packet it receives (and a public host every packet it sends) with an iptables
# NFQUEUE rule in the raw table; netlab-delay (tests/src/bin/netlab-delay.rs)
# holds each one for the delay. So 20 ms means +20 ms each way through that
# router. Loss: an nft `numgen random` drop rule at the same place.
#
# `up` prints one line per node; `down` is idempotent and stops only the
# netlab-delay processes that `up` started (their pids are in the state
# directory); processes started inside the lab by others must be stopped by
# whoever started them, before `down` (a running process keeps its namespace).
set -euo pipefail

TRACKER_ADDR=203.0.113.1
GATEWAY_ADDR=203.0.113.254

die() {
    echo "netlab: $*" >&2
    exit 1
}

usage() {
    sed -n '2,9p' "$0" >&2
    exit 2
}

need_tools() {
    local t
    for t in ip nft iptables sysctl; do
        command -v "$t" >/dev/null 2>&1 || die "missing $t (apt-get install iproute2 nftables iptables procps)"
    done
    [ "$(id -u)" = 0 ] || die "must run as root"
}

valid_prefix() {
    [[ "$1" =~ ^[a-z0-9]{1,20}$ ]] || die "prefix must be 1-20 characters of a-z 0-9, got '$1'"
}

ns_exists() {
    [ -e "/run/netns/$1" ]
}

nsx() { # nsx NS CMD... : run CMD inside NS
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

new_ns() {
    local ns=$1
    ns_exists "$ns" && die "namespace $ns already exists (run down first)"
    ip netns add "$ns"
    nsx "$ns" ip link set lo up
    nsx "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    nsx "$ns" sysctl -qw net.ipv6.conf.lo.disable_ipv6=1 2>/dev/null || true
}

# wire NS IFNAME ADDR/LEN: a veth from the internet bridge into NS.
wire() {
    local ns=$1 ifname=$2 addr=$3 port=$4
    ip -n "$INET" link add "$port" type veth peer name "$ifname" netns "$ns"
    ip -n "$INET" link set "$port" master br0 up
    ip -n "$ns" addr add "$addr" dev "$ifname"
    ip -n "$ns" link set "$ifname" up
}

# start_delay NS MS : starts netlab-delay in NS on queue 0, waits until it is bound.
start_delay() {
    local ns=$1 ms=$2 log pid i
    [ -n "$DELAY_BIN" ] || die "a delay needs --delay-bin PATH (the netlab-delay binary)"
    [ -x "$DELAY_BIN" ] || die "$DELAY_BIN is not an executable"
    log="$STATE/$ns.delay.log"
    ip netns exec "$ns" "$DELAY_BIN" --queue 0 --delay-ms "$ms" </dev/null >"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$STATE/$ns.delay.pid"
    for i in $(seq 1 100); do
        grep -q '^ready' "$log" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || die "netlab-delay in $ns exited: $(cat "$log")"
        sleep 0.05
    done
    die "netlab-delay in $ns not ready after 5 s: $(cat "$log")"
}

# shape NS MS PCT IS_HOST : delay and loss at a node's edge.
shape() {
    local ns=$1 ms=$2 pct=$3 is_host=$4
    if [ "$ms" != 0 ]; then
        start_delay "$ns" "$ms"
        nsx "$ns" iptables -t raw -A PREROUTING ! -i lo -j NFQUEUE --queue-num 0 --queue-bypass
        if [ "$is_host" = 1 ]; then
            nsx "$ns" iptables -t raw -A OUTPUT ! -o lo -j NFQUEUE --queue-num 0 --queue-bypass
        fi
    fi
    if [ "$pct" != 0 ]; then
        local out=""
        if [ "$is_host" = 1 ]; then
            out="chain out { type filter hook output priority raw; oifname != \"lo\" numgen random mod 100 < $pct drop; }"
        fi
        nsx "$ns" nft -f - <<EOF
table ip netlab_loss {
    chain pre { type filter hook prerouting priority raw; iifname != "lo" numgen random mod 100 < $pct drop; }
    $out
}
EOF
    fi
}

# router RNS KIND : NAT and filter rules of a router namespace.
router_rules() {
    local ns=$1 kind=$2 masq="masquerade" inbound="drop" udp_rule=""
    case "$kind" in
    cone-drop) ;;
    cone-reject) inbound="reject" ;;
    symmetric) masq="masquerade fully-random" ;;
    udp-blocked) udp_rule="iifname \"lan\" meta l4proto udp ip daddr != $TRACKER_ADDR drop" ;;
    *) die "unknown kind $kind" ;;
    esac
    nsx "$ns" nft -f - <<EOF
table ip netlab_nat {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" $masq
    }
}
table inet netlab_fw {
    chain input {
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        ct state established,related accept
        iifname "lan" accept
        iifname "wan" $inbound
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        $udp_rule
        ct state established,related accept
        iifname "lan" oifname "wan" accept
        iifname "wan" $inbound
    }
}
EOF
}

cmd_up() {
    need_tools
    [ -n "$PREFIX" ] || die "up needs --prefix"
    valid_prefix "$PREFIX"
    [ ${#NODES[@]} -gt 0 ] || die "up needs at least one NODE (NAME:KIND)"
    [ ${#NODES[@]} -le 200 ] || die "at most 200 nodes"
    STATE=${STATE:-/run/tincan-netlab/$PREFIX}
    mkdir -p "$STATE"
    INET="$PREFIX-inet"
    # Whatever fails half-way is torn down again.
    trap 'echo "netlab: up failed, tearing down" >&2; cmd_down >/dev/null 2>&1 || true' ERR

    new_ns "$INET"
    ip -n "$INET" link add br0 type bridge
    ip -n "$INET" addr add "$GATEWAY_ADDR/24" dev br0
    ip -n "$INET" link set br0 up
    # The "ISP" beyond the lab: packets for anything outside 203.0.113.0/24
    # (say a peer's 10.x LAN address) vanish silently, as on the internet.
    nsx "$INET" sysctl -qw net.ipv4.ip_forward=1
    nsx "$INET" sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null || true
    nsx "$INET" nft -f - <<EOF
table ip netlab_isp {
    chain forward {
        type filter hook forward priority filter; policy drop;
        # Bridged packets between lab hosts (seen here when br_netfilter is loaded).
        ip saddr 203.0.113.0/24 ip daddr 203.0.113.0/24 accept
    }
}
EOF

    local trk="$PREFIX-trk"
    new_ns "$trk"
    wire "$trk" eth0 "$TRACKER_ADDR/24" vt
    ip -n "$trk" route add default via "$GATEWAY_ADDR"
    echo "tracker ns=$trk addr=$TRACKER_ADDR"

    local i=0 spec name kind rest opt delay loss udpt
    for spec in "${NODES[@]}"; do
        i=$((i + 1))
        IFS=: read -r name kind rest <<<"$spec"
        [[ "$name" =~ ^[a-z0-9]{1,12}$ ]] || die "node name must be 1-12 characters of a-z 0-9, got '$name'"
        [[ "$name" != inet && "$name" != trk ]] || die "node name $name is reserved"
        delay=$DELAY_MS loss=$LOSS udpt=$UDP_TIMEOUT
        local IFS_SAVE=$IFS
        IFS=:
        for opt in $rest; do
            case "$opt" in
            delay=*) delay=${opt#delay=} ;;
            loss=*) loss=${opt#loss=} ;;
            udp_timeout=*) udpt=${opt#udp_timeout=} ;;
            *) die "unknown node option '$opt' in $spec" ;;
            esac
        done
        IFS=$IFS_SAVE
        [[ "$delay" =~ ^[0-9]+$ && "$loss" =~ ^[0-9]+$ && "$udpt" =~ ^[0-9]*$ ]] ||
            die "delay, loss and udp_timeout are whole numbers in $spec"
        [ "$loss" -le 100 ] || die "loss is a percentage in $spec"
        local host="$PREFIX-$name" wan="203.0.113.$((10 + i))"
        new_ns "$host"
        if [ "$kind" = public ]; then
            wire "$host" eth0 "$wan/24" "v$i"
            ip -n "$host" route add default via "$GATEWAY_ADDR"
            shape "$host" "$delay" "$loss" 1
            echo "node $name kind=$kind ns=$host addr=$wan public=$wan delay_ms=$delay loss_pct=$loss"
        else
            local router="$PREFIX-$name-r" lan="10.$i.0"
            new_ns "$router"
            wire "$router" wan "$wan/24" "v$i"
            ip -n "$router" route add default via "$GATEWAY_ADDR"
            ip -n "$router" link add lan type veth peer name eth0 netns "$host"
            ip -n "$router" addr add "$lan.1/24" dev lan
            ip -n "$router" link set lan up
            ip -n "$host" addr add "$lan.2/24" dev eth0
            ip -n "$host" link set eth0 up
            ip -n "$host" route add default via "$lan.1"
            nsx "$router" sysctl -qw net.ipv4.ip_forward=1
            if [ -n "$udpt" ]; then
                nsx "$router" sysctl -qw "net.netfilter.nf_conntrack_udp_timeout=$udpt" \
                    "net.netfilter.nf_conntrack_udp_timeout_stream=$udpt"
            fi
            router_rules "$router" "$kind"
            shape "$router" "$delay" "$loss" 0
            echo "node $name kind=$kind ns=$host addr=$lan.2 public=$wan router=$router delay_ms=$delay loss_pct=$loss udp_timeout=${udpt:-default}"
        fi
    done
    trap - ERR
}

cmd_down() {
    [ -n "$PREFIX" ] || die "down needs --prefix"
    valid_prefix "$PREFIX"
    STATE=${STATE:-/run/tincan-netlab/$PREFIX}
    local f pid ns pids
    # Our own delay processes, by pid, only if that pid is still netlab-delay.
    if [ -d "$STATE" ]; then
        for f in "$STATE"/*.delay.pid; do
            [ -e "$f" ] || continue
            pid=$(cat "$f")
            if [[ "$pid" =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = netlab-delay ]; then
                kill -KILL "$pid" 2>/dev/null || true
            fi
            rm -f "$f"
        done
    fi
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-" || true); do
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)
        if [ -n "${pids// /}" ]; then
            echo "netlab: warning: processes still running in $ns (pids $pids); not ours to stop" >&2
        fi
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$STATE"
}

# Labs whose owner process is gone: prefixes tcnl<pid>x<n> from the Rust harness.
cmd_gc() {
    local ns owner p
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^tcnl[0-9]+x[0-9]+-' || true); do
        p=${ns%%-*}
        owner=${p#tcnl}
        owner=${owner%%x*}
        if ! kill -0 "$owner" 2>/dev/null; then
            PREFIX=$p STATE="" cmd_down
        fi
    done
}

cmd_exec() {
    [ -n "$PREFIX" ] || die "exec needs --prefix"
    [ ${#NODES[@]} -ge 1 ] || die "exec needs a NODE"
    local ns="$PREFIX-${NODES[0]}"
    [ "${NODES[1]:-}" = router ] && ns="$ns-r"
    exec ip netns exec "$ns" "${EXTRA[@]}"
}

[ $# -ge 1 ] || usage
CMD=$1
shift
PREFIX="" STATE="" DELAY_MS=0 LOSS=0 UDP_TIMEOUT="" DELAY_BIN=""
NODES=() EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
    --prefix) PREFIX=$2; shift 2 ;;
    --state) STATE=$2; shift 2 ;;
    --delay-ms) DELAY_MS=$2; shift 2 ;;
    --loss) LOSS=$2; shift 2 ;;
    --udp-timeout) UDP_TIMEOUT=$2; shift 2 ;;
    --delay-bin) DELAY_BIN=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown option $1" ;;
    *) NODES+=("$1"); shift ;;
    esac
done

case "$CMD" in
up) cmd_up ;;
down) cmd_down ;;
gc) cmd_gc ;;
exec) cmd_exec ;;
*) usage ;;
esac
