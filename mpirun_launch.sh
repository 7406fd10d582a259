#!/usr/bin/env bash
# mpirun_launch.sh -n N [serve options] -- start a controller and N engines in the foreground.
#
# For batch scripts and login shells alike: -n counts ENGINES; the script adds the
# controller rank (mpiexec gets N+1 ranks). Every other option goes to
# 'python -m mpiengine serve' (--profile, --connection-file, --ip, --port, ...).
#
# Environment:
#   PYTHON      the Python that has mpiengine installed       (default: python3 on PATH)
#   MPIEXEC     the launcher to use, e.g. "mpiexec" or "mpirun --oversubscribe"
#               (default: srun inside a SLURM job, otherwise mpiexec)
#   SRUN_MPI    srun's --mpi plugin                           (default: pmi2)
#   SRUN_FLAGS  extra srun flags, e.g. "--overcommit"
#
# Examples:
#   ./mpirun_launch.sh -n 4
#   ./mpirun_launch.sh -n 64 --ip ib0 --connection-file $HOME/jobs/$SLURM_JOB_ID.json
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'; exit "${1:-2}"; }

engines=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -n|--engines) [ $# -ge 2 ] || usage; engines="$2"; shift 2 ;;
        -n*) engines="${1#-n}"; shift ;;
        --engines=*) engines="${1#--engines=}"; shift ;;
        -h|--help) usage 0 ;;
        *) args+=("$1"); shift ;;
    esac
done
case "$engines" in
    ''|*[!0-9]*) echo "mpirun_launch.sh: -n N (the number of engines, at least 1) is required" >&2; exit 2 ;;
esac
[ "$engines" -ge 1 ] || { echo "mpirun_launch.sh: -n must be at least 1" >&2; exit 2; }
ranks=$((engines + 1))
python="${PYTHON:-python3}"

if [ -n "${MPIEXEC:-}" ]; then
    # shellcheck disable=SC2086  # MPIEXEC may carry its own flags
    exec $MPIEXEC -n "$ranks" "$python" -m mpiengine serve ${args[@]+"${args[@]}"}
elif [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    exec srun --mpi="${SRUN_MPI:-pmi2}" ${SRUN_FLAGS:-} -n "$ranks" "$python" -m mpiengine serve ${args[@]+"${args[@]}"}
else
    exec mpiexec -n "$ranks" "$python" -m mpiengine serve ${args[@]+"${args[@]}"}
fi
