#!/usr/bin/env bash
# Start, stop or show the real one-node SLURM cluster that tests/test_slurm.py runs against (CI and developers).
#
#   bash scripts/slurm_ci.sh up       # as root (or with passwordless sudo); Debian 12; idempotent; ~45 s the first
#                                     # time (apt install of slurm + munge + MariaDB), 2-4 s afterwards
#   bash scripts/slurm_ci.sh status   # sinfo + squeue
#   bash scripts/slurm_ci.sh down     # cancels every job, stops the daemons
#
# The recipe is shared/slurm/{up,down}.sh (its README lists the knobs: SLURM_CI_CPUS, SLURM_CI_CRED_EXPIRE, ...).
# It is looked for in $DINOSPEC_SHARED, then ./shared and ../shared next to this repository. The cluster is
# machine-wide state: two sessions on one machine share it, and `down` stops it for both.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

shared=""
for candidate in "${DINOSPEC_SHARED:-}" "$repo/shared" "$repo/../shared"; do
    if [ -n "$candidate" ] && [ -f "$candidate/slurm/up.sh" ]; then shared="$(cd "$candidate" && pwd)"; break; fi
done

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo -n --preserve-env "$@"
    else echo "slurm_ci.sh: needs root (or passwordless sudo) to run the SLURM daemons" >&2; return 1
    fi
}

need_recipe() {
    [ -n "$shared" ] && return 0
    echo "slurm_ci.sh: shared/slurm/up.sh not found (set DINOSPEC_SHARED to the folder holding slurm/)" >&2
    exit 1
}

case "${1:-up}" in
    up)
        need_recipe
        as_root bash "$shared/slurm/up.sh"
        sinfo
        ;;
    down)
        need_recipe
        as_root bash "$shared/slurm/down.sh"
        ;;
    status)
        sinfo && squeue
        ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
