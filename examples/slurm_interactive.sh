#!/bin/bash
# slurm_interactive.sh -- an mpiengine cluster as a SLURM batch job, driven from the login node.
#
#   sbatch examples/slurm_interactive.sh                 (from the repository, or copy it anywhere)
#   mpiengine wait --profile slurm-<JOBID>               returns when the engines answer
#   python -c "from mpiengine import client; mec = client.MultiEngineClient(profile='slurm-<JOBID>')"
#   mpiengine stop --profile slurm-<JOBID>               ends the job (or: scancel <JOBID>)
#
# The job is one MPI job of SLURM_NTASKS ranks: rank 0 is the controller, the others are
# engines 0..SLURM_NTASKS-2. The controller writes the connection file (address, port,
# key and the TLS fingerprint) to a path that the login node sees too: by default
# ~/.mpiengine/security/controller-slurm-$SLURM_JOB_ID.json, i.e. profile slurm-$SLURM_JOB_ID.
#
# Environment read at submit time (sbatch passes the submitting shell's environment on):
#   MPIENGINE_CONNECTION_FILE  write the connection file here instead of the profile's file
#   MPIENGINE_IP               what the controller listens on (default '*': every interface,
#                              TLS on, clients are told the address of this node's host name;
#                              name the interface instead when the host name resolves to a
#                              loopback address or to a network the login node cannot reach,
#                              e.g. MPIENGINE_IP=ib0 or eth0)
#   PYTHON                     the Python with mpiengine + mpi4py (default: python3 on PATH)
#   MPIRUN_LAUNCH              mpirun_launch.sh to use (default: the one in the submit directory;
#                              without it, srun --mpi=pmi2 is called directly)
#   SRUN_MPI, SRUN_FLAGS       passed on to mpirun_launch.sh (srun --mpi=..., extra srun flags)
#
#SBATCH --job-name=mpiengine
#SBATCH --ntasks=5
#SBATCH --time=01:00:00
#SBATCH --output=mpiengine-%j.out
set -euo pipefail

ranks=${SLURM_NTASKS:-5}
engines=$((ranks - 1))
python=${PYTHON:-python3}
where=(--profile "slurm-$SLURM_JOB_ID")
if [ -n "${MPIENGINE_CONNECTION_FILE:-}" ]; then
    where+=(--connection-file "$MPIENGINE_CONNECTION_FILE")
fi
# One write() per output line: with PYTHONUNBUFFERED=1, print() writes the text and the
# newline separately and the ranks' lines interleave in the job's output file.
unset PYTHONUNBUFFERED

echo "mpiengine: job $SLURM_JOB_ID on $(hostname): $engines engines + controller"
launch=${MPIRUN_LAUNCH:-${SLURM_SUBMIT_DIR:-.}/mpirun_launch.sh}
if [ -x "$launch" ]; then
    # mpirun_launch.sh -n counts ENGINES and runs srun --mpi=${SRUN_MPI:-pmi2} inside a job
    PYTHON=$python exec "$launch" -n "$engines" "${where[@]}" --ip "${MPIENGINE_IP:-*}"
else
    exec srun --mpi="${SRUN_MPI:-pmi2}" -n "$ranks" "$python" -m mpiengine serve \
        "${where[@]}" --ip "${MPIENGINE_IP:-*}"
fi
