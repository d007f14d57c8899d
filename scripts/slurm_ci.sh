#!/usr/bin/env bash
# Start or stop the real one-node SLURM used by the slurm-marked tests (CI and developers, as root).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
shared="${DINOSPEC_SHARED:-$here/../shared}"
case "${1:-up}" in
  up) bash "$shared/slurm/up.sh" ;;
  down) bash "$shared/slurm/down.sh" ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
