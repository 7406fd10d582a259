#!/bin/bash
# teardown_hosts.sh - undo make_hosts.sh: kill processes left inside the host namespaces
# (by pid, found via `ip netns pids`: never by name), delete the namespaces (which deletes their veths
# and the bridge), unmount the UTS namespace files, remove /etc/netns/<ns>/hosts.  Safe to run repeatedly.
# Use the same MH_PREFIX / MH_RUN / MH_HOSTS as make_hosts.sh.
set -uo pipefail
MH_PREFIX="${MH_PREFIX:-}"
MH_RUN="${MH_RUN:-/run/mhhosts}"
MH_HOSTS="${MH_HOSTS:-login:10 node1:11 node2:12}"
SW="${MH_PREFIX}sw"
for spec in $MH_HOSTS; do
    h="${spec%%:*}"; ns="${MH_PREFIX}$h"
    if [ -e "/run/netns/$ns" ]; then
        pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
        if [ -n "${pids// /}" ]; then
            echo "killing leftover pids in $ns: $pids"
            kill -TERM $pids 2>/dev/null; sleep 0.5
            pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
            [ -n "${pids// /}" ] && kill -KILL $pids 2>/dev/null
        fi
        ip netns del "$ns" && echo "deleted netns $ns"
    fi
    if [ -f "/etc/netns/$ns/hosts" ]; then
        rm -f "/etc/netns/$ns/hosts"; rmdir "/etc/netns/$ns" 2>/dev/null
    fi
    if [ -e "$MH_RUN/uts/$h" ]; then
        umount "$MH_RUN/uts/$h" 2>/dev/null; rm -f "$MH_RUN/uts/$h"
    fi
done
[ -e "/run/netns/$SW" ] && ip netns del "$SW" && echo "deleted netns $SW"
if [ -d "$MH_RUN/uts" ]; then
    umount "$MH_RUN/uts" 2>/dev/null; rmdir "$MH_RUN/uts" 2>/dev/null
fi
rm -f "$MH_RUN/hosts"; rmdir "$MH_RUN" 2>/dev/null
rmdir /etc/netns 2>/dev/null
true
