#!/usr/bin/env bash
# slurm_stop.sh -- stop what slurm_start.sh started, by pid only (never by name).
#  1. cancel all jobs of this cluster and wait for their slurmstepd to finish
#  2. SIGTERM slurmd, slurmctld, [slurmdbd, mariadbd,] munged (pids from $D/run/*.pid, checked
#     against the command name)
#  3. SIGKILL after a timeout; leftover slurmstepd of *this* instance (found by SLURM_CONF in
#     their environment) are killed by pid
#  4. report anything of this instance still alive
# A process that has exited but whose parent (PID 1 in some sandboxes) never reaps it stays
# a zombie ("<defunct>"); it holds no resources and is treated as stopped.
# Order matters: slurmd ignores SIGTERM for >15 s once slurmctld is gone, so slurmd goes first;
# jobs outlive the daemons (slurmstepd is independent), so jobs are cancelled before anything.
# Usage: bash slurm_stop.sh [--quiet]      (SLURM_SINGLE_DIR as for start)
set -uo pipefail

D=${SLURM_SINGLE_DIR:-/tmp/slurm-single}
CONF="$D/etc/slurm.conf"
QUIET=0; [ "${1:-}" = --quiet ] && QUIET=1
log() { [ $QUIET = 1 ] || printf '[slurm_stop %s] %s\n' "$(date +%T)" "$*" >&2; }
command -v slurmctld >/dev/null 2>&1 || PATH=/usr/sbin:$PATH

# alive = exists and is not a zombie
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) || return 1; [ -n "$s" ] && [ "${s:0:1}" != Z ]; }
# the pid really is program $2 (guards against a recycled pid in a stale pid file)
is_prog() { [ "$(cat /proc/"$1"/comm 2>/dev/null)" = "$2" ]; }

wait_gone() {  # pid timeout_s
  local i
  for i in $(seq $(( $2 * 10 ))); do alive "$1" || return 0; sleep 0.1; done
  return 1
}

# process $1 was started with this instance's SLURM_CONF in its environment
ours() { { tr '\0' '\n' < /proc/"$1"/environ; } 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; }

# pids of slurmstepd processes belonging to this instance
our_stepds() {
  local p
  for p in $(ps -C slurmstepd -o pid= 2>/dev/null); do
    alive "$p" && ours "$p" && echo "$p"
  done
}

[ -f "$CONF" ] || { log "no $CONF; nothing to stop"; exit 0; }
export SLURM_CONF="$CONF"

# ---- 1. cancel jobs while the controller is still up
ctld_pid=$(cat "$D/run/slurmctld.pid" 2>/dev/null || true)
if [ -n "$ctld_pid" ] && alive "$ctld_pid" && is_prog "$ctld_pid" slurmctld; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 150); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && [ -z "$(our_stepds)" ] && break
      sleep 0.2
    done
  fi
fi

# ---- 2./3. daemons: slurmd first (so it does not get 'controller gone' errors), then ctld, munged
rc=0
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  pf="$D/run/$name.pid"
  [ -s "$pf" ] || continue
  pid=$(cat "$pf")
  if ! alive "$pid"; then rm -f "$pf"; continue; fi
  if ! is_prog "$pid" "$name"; then log "pid $pid in $pf is not $name; not touching it"; rm -f "$pf"; continue; fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null
  if ! wait_gone "$pid" 15; then
    log "$name (pid $pid) ignored SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null; wait_gone "$pid" 5 || { log "$name pid $pid still alive"; rc=1; }
  fi
  rm -f "$pf"
done

for p in $(our_stepds); do
  log "killing leftover slurmstepd pid $p"
  kill -KILL "$p" 2>/dev/null; wait_gone "$p" 5 || rc=1
done

# ---- 4. report
left=""
for p in $(ps -C slurmctld,slurmd,slurmstepd,slurmdbd,mariadbd,munged -o pid= 2>/dev/null); do
  alive "$p" && ours "$p" && left="$left $p"
done
if [ -n "$left" ]; then log "still alive from this instance:$left"; rc=1; else log "all stopped"; fi
exit $rc
