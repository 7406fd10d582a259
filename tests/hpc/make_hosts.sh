#!/bin/bash
# make_hosts.sh - build a fake 3-host "cluster" on one Linux box with network namespaces.
#
# For tests/test_multihost.py: a login node and two compute nodes with their own
# addresses, host names and a real (virtual) network between them, so that an mpiengine
# job can put its controller on node1, engines on node1 and node2, and a client on login.
# The filesystem stays shared (like NFS homes on a cluster): connection files written on
# node1 are read on login. The tests use a unique MH_PREFIX/MH_RUN per run and always call
# teardown_hosts.sh afterwards. Needs root; the tests skip when `ip netns add` fails.
#
#   login 10.77.0.10   node1 10.77.0.11   node2 10.77.0.12   (all /24, no default route)
#
# Topology: a private "switch" namespace (${MH_PREFIX}sw) holds a Linux bridge br0;
# each host namespace gets a veth "eth0" whose peer sits in the switch namespace,
# enslaved to br0.  The root namespace is never touched (no bridge, no route, no IP),
# so nothing can leak to the real network.  Each host also gets a persistent UTS
# namespace (own hostname) bound at $MH_RUN/uts/<host>; enter a host with
#   nsenter --net=/run/netns/<ns> --uts=$MH_RUN/uts/<host> CMD     (or ./hostexec <host> CMD)
#
# Name resolution: unless MH_ETC_HOSTS=0, writes /etc/netns/<ns>/hosts (localhost + all fake
# hosts); `ip netns exec` (used by hostexec/fake_ssh) bind-mounts it over /etc/hosts, so
# "node1" resolves inside the fake hosts while the real /etc/hosts is never modified.
#
# Re-runnable: tears down any previous instance first.  Needs root (or CAP_SYS_ADMIN+CAP_NET_ADMIN).
# Env: MH_PREFIX (namespace name prefix, default ""), MH_RUN (state dir, default /run/mhhosts),
#      MH_HOSTS (default "login:10 node1:11 node2:12"), MH_NET (default 10.77.0), MH_ETC_HOSTS (default 1)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MH_PREFIX="${MH_PREFIX:-}"
MH_RUN="${MH_RUN:-/run/mhhosts}"
MH_HOSTS="${MH_HOSTS:-login:10 node1:11 node2:12}"
MH_NET="${MH_NET:-10.77.0}"
MH_ETC_HOSTS="${MH_ETC_HOSTS:-1}"
SW="${MH_PREFIX}sw"

"$HERE/teardown_hosts.sh" >/dev/null 2>&1 || true

mkdir -p "$MH_RUN/uts"
# A private bind mount so per-host UTS namespace bind mounts do not propagate anywhere.
if ! mountpoint -q "$MH_RUN/uts"; then
    mount --bind "$MH_RUN/uts" "$MH_RUN/uts"
fi
mount --make-private "$MH_RUN/uts"

ip netns add "$SW"
ip -n "$SW" link add br0 type bridge
ip -n "$SW" link set br0 up
ip -n "$SW" link set lo up

: > "$MH_RUN/hosts"           # "ip name" lines, handy for a fake /etc/hosts
for spec in $MH_HOSTS; do
    h="${spec%%:*}"; octet="${spec##*:}"; ns="${MH_PREFIX}$h"; ip="$MH_NET.$octet"
    ip netns add "$ns"
    # veth: "eth0" inside the host, "<host>" inside the switch namespace
    ip link add name eth0 netns "$ns" type veth peer name "$h" netns "$SW"
    ip -n "$SW" link set "$h" master br0
    ip -n "$SW" link set "$h" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set eth0 up
    # persistent UTS namespace holding the hostname
    touch "$MH_RUN/uts/$h"
    unshare --uts="$MH_RUN/uts/$h" hostname "$h"
    echo "$ip $h" >> "$MH_RUN/hosts"
    echo "$h ns=$ns ip=$ip"
done

if [ "$MH_ETC_HOSTS" = 1 ]; then
    for spec in $MH_HOSTS; do
        h="${spec%%:*}"; ns="${MH_PREFIX}$h"
        mkdir -p "/etc/netns/$ns"
        { printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n'; cat "$MH_RUN/hosts"; } > "/etc/netns/$ns/hosts"
    done
fi

# wait for links (bridge ports go forwarding immediately: STP is off by default)
for spec in $MH_HOSTS; do
    h="${spec%%:*}"; ns="${MH_PREFIX}$h"
    for i in $(seq 50); do
        ip -n "$ns" -br addr show dev eth0 | grep -q "UP" && break; sleep 0.1
    done
done
echo "ok: namespaces $(ip netns list | awk '{print $1}' | tr '\n' ' ')"
