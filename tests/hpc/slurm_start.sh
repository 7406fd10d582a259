#!/usr/bin/env bash
# slurm_start.sh -- a real single-node SLURM cluster (Debian slurm-wlm: slurmctld + slurmd +
# a private munged) on 127.0.0.1, without systemd, every file under one directory.
#
# mpiengine's SLURM tests (tests/test_slurm.py) start one per test session with this script
# and stop it with slurm_stop.sh; it is also handy by hand to try the examples/slurm_*.sh
# scripts. Adapted from a recipe tested on Debian 12 (slurm-wlm 22.05.8, root, PID 1 not
# systemd, 2 cores, cgroups not delegated). Re-runnable: an instance already running from
# the same directory is stopped first.
#
# Usage (as root):   bash tests/hpc/slurm_start.sh
#                    export SLURM_CONF=/tmp/slurm-single/etc/slurm.conf   (or: source $DIR/env.sh)
#                    sbatch examples/slurm_interactive.sh; squeue; scancel ID
#                    bash tests/hpc/slurm_stop.sh
#
# Why the config looks the way it does (each item cost a failed run once):
#   * CPUs=8 on a 2-core box + SlurmdParameters=config_overrides: `sbatch -n 5` / `srun -n 5`
#     need 5 CPUs in the allocation; without config_overrides slurmctld DRAINs the node
#     ("Low socket*core*thread count"). task/none means no binding, so the fake CPUs are harmless.
#   * Every client command needs SLURM_CONF: without it scontrol/sbatch fall back to a DNS SRV
#     lookup. Jobs inherit it (default --export=ALL), which srun/hydra inside the job need.
#   * munged runs as root on a private socket (dir 0755, key in a 0700 subdir), so no
#     /run/munge and no clash with a system munged.
#   * proctrack/linuxproc + task/none: no cgroups needed (a sandbox or container has none).
#   * jobcomp/filetxt: without slurmdbd there is no sacct; $DIR/log/jobcomp.txt gets one line
#     per finished job (JobState, ExitCode), and `scontrol show job` works for MinJobAge=300 s.
#   * apt postinst would start the services: a temporary /usr/sbin/policy-rc.d (exit 101) stops it.
#   * CommunicationParameters=NoCtldInAddrAny,NoInAddrAny: the daemons listen on 127.0.0.1 only.
#
# Knobs (environment):
#   SLURM_SINGLE_DIR   everything lives here                 (default /tmp/slurm-single)
#   SLURM_AUTH         munge | none                          (default munge)
#   SLURM_NODE_CPUS    CPUs the node advertises              (default 8)
#   SLURMCTLD_PORT / SLURMD_PORT                             (default 6817 / 6818; the tests pick
#                      free ports so that two instances on one machine do not collide)
#   SLURM_SKIP_INSTALL=1   never apt-get install (fail if the packages are missing)
#   SLURM_KEEP_STATE=1     keep job ids / state from a previous run (default: wipe)
#   SLURM_WAIT_S           seconds to wait for the node to become idle (default 60)
#   SLURM_ACCOUNTING=1     also run mariadbd + slurmdbd so that sacct works (~30 s more install)
#   SLURM_FIRST_JOB_ID     first job id (default 1). The state is wiped at every start, so job
#                      ids repeat across runs; MPICH names its shared memory segment after the
#                      PMI job id ("<jobid>.<step>" under srun --mpi=pmi2:
#                      /dev/shm/mpich_shm_<fnv1a hash>_<node>), and a segment left by a killed
#                      (scancel-ed) job makes the next job with the same id hang or fail in
#                      MPI_Init. The tests pass a random first id.
set -euo pipefail

D=${SLURM_SINGLE_DIR:-/tmp/slurm-single}
AUTH=${SLURM_AUTH:-munge}
CPUS=${SLURM_NODE_CPUS:-8}
FIRST_JOB_ID=${SLURM_FIRST_JOB_ID:-1}
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
WAIT_S=${SLURM_WAIT_S:-60}
ACCT=${SLURM_ACCOUNTING:-0}
DBD_PORT=${SLURMDBD_PORT:-6819}
DB_PORT=${SLURM_DB_PORT:-6820}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[slurm_start %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

[ "$(id -u)" -eq 0 ] || die "run as root (slurmd must be able to setuid; use sudo -E)"
case "$AUTH" in munge|none) ;; *) die "SLURM_AUTH must be munge or none";; esac

# ---------------------------------------------------------------- 0. stop an old instance
if [ -f "$D/etc/slurm.conf" ] && [ -x "$HERE/slurm_stop.sh" ]; then
  SLURM_SINGLE_DIR="$D" bash "$HERE/slurm_stop.sh" --quiet || true
fi

# ---------------------------------------------------------------- 1. install (Debian packages)
PKGS="slurmctld slurmd slurm-client munge"
[ "$ACCT" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ] && [ "${SLURM_SKIP_INSTALL:-0}" != 1 ]; then
  t_inst=$(now)
  log "installing:$missing"
  # Keep postinst from starting munge/slurm services (systemd or sysv). Only if no policy exists.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >"${TMPDIR:-/tmp}/slurm-apt-install.log" 2>&1 \
    || { tail -30 "${TMPDIR:-/tmp}/slurm-apt-install.log" >&2; [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install failed"; }
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "apt-get update+install took $(elapsed "$t_inst")s"
elif [ -n "$missing" ]; then
  die "missing packages:$missing (and SLURM_SKIP_INSTALL=1)"
fi
command -v slurmctld >/dev/null || PATH=/usr/sbin:$PATH

# ---------------------------------------------------------------- 2. directories
H=$(hostname -s)
[ -n "$H" ] || die "empty hostname"
mkdir -p "$D"
chmod 0755 "$D"                       # munged needs o+x on every dir above its socket
if [ "${SLURM_KEEP_STATE:-0}" != 1 ]; then rm -rf "$D/state" "$D/spool" "$D/log" "$D/mysql"; fi
mkdir -p "$D/etc" "$D/state" "$D/spool" "$D/log" "$D/run" "$D/munge"
chmod 0755 "$D/etc" "$D/state" "$D/spool" "$D/log" "$D/run" "$D/munge"
rm -f "$D"/run/*.pid

# RealMemory: 90% of MemTotal so --mem requests are possible (default would be 1 MB)
MEM_MB=$(awk '/^MemTotal:/{printf "%d", $2/1024*0.9}' /proc/meminfo)

# exported before any daemon starts: every daemon/slurmstepd carries it in its environment,
# which is how slurm_stop.sh recognises the processes of this instance
export SLURM_CONF="$D/etc/slurm.conf"

# ---------------------------------------------------------------- 3. munge (private instance)
AUTH_LINES="AuthType=auth/none
CredType=cred/none"
if [ "$AUTH" = munge ]; then
  MSOCK="$D/munge/munge.socket"
  mkdir -p -m 0700 "$D/munge/key"
  if [ ! -s "$D/munge/key/munge.key" ]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile="$D/munge/key/munge.key"
    else dd if=/dev/urandom of="$D/munge/key/munge.key" bs=1 count=1024 status=none; fi
  fi
  chmod 0600 "$D/munge/key/munge.key"
  rm -f "$MSOCK" "$MSOCK.lock"
  # runs as root with its own key/socket: no /run/munge, no conflict with a system munged
  /usr/sbin/munged --socket="$MSOCK" --key-file="$D/munge/key/munge.key" \
    --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed" \
    || { cat "$D/log/munged.log" >&2 2>/dev/null; die "munged failed to start"; }
  for _ in $(seq 50); do [ -S "$MSOCK" ] && break; sleep 0.1; done
  munge -S "$MSOCK" -n | unmunge -S "$MSOCK" >/dev/null || die "munge self-test failed"
  AUTH_LINES="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MSOCK"
fi

# ---------------------------------------------------------------- 3b. optional accounting
ACCT_LINES="JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none"
if [ "$ACCT" = 1 ]; then
  t_db=$(now)
  mkdir -p "$D/mysql"
  if [ ! -d "$D/mysql/data/mysql" ]; then
    mariadb-install-db --no-defaults --user=root --datadir="$D/mysql/data" \
      --auth-root-authentication-method=socket --skip-test-db >"$D/log/mariadb-install.log" 2>&1 \
      || { tail -20 "$D/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  fi
  # private server: own datadir/socket, TCP only on 127.0.0.1:$DB_PORT; setsid+& = detached
  setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$D/mysql/data" \
    --socket="$D/mysql/mysqld.sock" --pid-file="$D/run/mariadbd.pid" --bind-address=127.0.0.1 \
    --port="$DB_PORT" --log-error="$D/log/mariadb.err" --innodb-buffer-pool-size=64M \
    --skip-name-resolve </dev/null >/dev/null 2>&1 &
  for _ in $(seq 300); do
    mariadb --no-defaults -S "$D/mysql/mysqld.sock" -uroot -e 'select 1' >/dev/null 2>&1 && break; sleep 0.1
  done
  mariadb --no-defaults -S "$D/mysql/mysqld.sock" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;" \
    || { tail -20 "$D/log/mariadb.err" >&2; die "mariadbd not reachable"; }
  # slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF; must be 0600, owned by SlurmUser
  { echo "$AUTH_LINES" | grep -v '^CredType='
    cat <<EOF
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  } > "$D/etc/slurmdbd.conf"
  chmod 0600 "$D/etc/slurmdbd.conf"
  slurmdbd || die "slurmdbd failed (see $D/log/slurmdbd.log)"
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$DBD_PORT") 2>/dev/null && break; sleep 0.1
  done
  (exec 3<>"/dev/tcp/127.0.0.1/$DBD_PORT") 2>/dev/null || { tail -20 "$D/log/slurmdbd.log" >&2; die "slurmdbd not listening"; }
  log "mariadbd + slurmdbd up after $(elapsed "$t_db")s"
  ACCT_LINES="JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT"
  # The slurmctld->slurmdbd connection (and sacct/sacctmgr) do NOT use AuthInfo's socket: they
  # use AccountingStoragePass as the munge socket, else the default /run/munge/munge.socket.2.
  [ "$AUTH" = munge ] && ACCT_LINES="$ACCT_LINES
AccountingStoragePass=$MSOCK"
fi

# ---------------------------------------------------------------- 4. slurm.conf
CONF="$D/etc/slurm.conf"
cat > "$CONF" <<EOF
# generated by slurm_start.sh
ClusterName=single
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=$H(127.0.0.1)
$AUTH_LINES
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# bind daemons/srun to the resolved address (127.0.0.1) instead of 0.0.0.0
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups in a sandbox: track processes via /proc parentage, no binding/confinement
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$ACCT_LINES
# without slurmdbd there is no sacct; completed jobs are appended here as well (one line per job)
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
InactiveLimit=0
# accept CPUs= larger than the hardware (no DRAIN "Low socket*core*thread count")
SlurmdParameters=config_overrides
NodeName=$H NodeAddr=127.0.0.1 NodeHostname=$H CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
EOF
cat > "$D/env.sh" <<EOF
export SLURM_CONF=$CONF
EOF

# ---------------------------------------------------------------- 5. start daemons
t_start=$(now)
echo "$t_start" > "$D/run/daemons_started_at"
# Without -D both daemons fork into the background and write their pid files.
# (Foreground alternative: setsid slurmctld -D -f "$CONF" >"$D/log/ctld.out" 2>&1 & echo \$! > pidfile)
slurmctld -f "$CONF" || die "slurmctld failed (see $D/log/slurmctld.log)"
slurmd -f "$CONF"    || die "slurmd failed (see $D/log/slurmd.log)"

for f in slurmctld slurmd; do
  for _ in $(seq 100); do [ -s "$D/run/$f.pid" ] && break; sleep 0.1; done
  [ -s "$D/run/$f.pid" ] || die "$f wrote no pid file; tail of log:$(echo; tail -20 "$D/log/$f.log")"
done

# ---------------------------------------------------------------- 6. wait for node idle
state=""
deadline=$((SECONDS + WAIT_S))
while [ $SECONDS -lt $deadline ]; do
  # a dead daemon makes every sinfo wait for MessageTimeout; fail fast instead
  for f in slurmctld slurmd; do
    s=$(ps -o stat= -p "$(cat "$D/run/$f.pid" 2>/dev/null || echo 0)" 2>/dev/null || true)
    if [ -z "$s" ] || [ "${s:0:1}" = Z ]; then
      tail -20 "$D/log/$f.log" >&2; die "$f exited during startup (log above)"
    fi
  done
  state=$(timeout 10 sinfo -h -n "$H" -o '%T' 2>/dev/null || true)
  [ "$state" = idle ] && break
  sleep 0.2
done
if [ "$state" != idle ]; then
  log "node state '$state' after ${WAIT_S}s; slurmctld log tail:"; tail -20 "$D/log/slurmctld.log" >&2
  log "slurmd log tail:"; tail -20 "$D/log/slurmd.log" >&2
  die "node not idle"
fi
log "daemons up, node '$H' idle after $(elapsed "$t_start")s (slurmctld pid $(cat "$D/run/slurmctld.pid"), slurmd pid $(cat "$D/run/slurmd.pid")$( [ "$AUTH" = munge ] && echo ", munged pid $(cat "$D/run/munged.pid")"))"
log "now: source $D/env.sh   (SLURM_CONF=$CONF)"
sinfo
