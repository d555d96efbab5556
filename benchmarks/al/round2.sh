#!/usr/bin/env bash
# Round 2 of the evidence (PREREGISTRATION.md): the two lanes in the pre-registered order, one torch
# thread each. Every run resumes (finished JSONs are skipped, unfinished runs continue from their
# checkpoints), so rerun a lane after an interruption.
#   benchmarks/al/round2.sh A    # E1c: the primary comparison
#   benchmarks/al/round2.sh B    # E1, random_extended, secondary methods, E2, E3
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
R=../results/al
run() { "$PY" harness.py run --threads 1 "$@"; }
case "${1:-}" in
  A)
    # E1 and E1c share splits and selector options: one content-addressed feature cache
    mkdir -p "$R/acac_large/.features" "$R/acac_large_converged"
    [ -e "$R/acac_large_converged/.features" ] \
      || ln -s ../acac_large/.features "$R/acac_large_converged/.features"
    run configs/acac_large_converged.toml --methods random pv_lcmd lcmd ;;
  B)
    mkdir -p "$R/acac_large/.features"
    run configs/acac_large.toml --methods pv_lcmd random lcmd
    run configs/acac_large.toml --methods random_extended
    run configs/acac_large.toml --methods pool_variance_reduction maxdist_embedding committee \
      --seeds 0 1 2
    for cfg in ethanol_large ethanol_methanol; do
      run "configs/$cfg.toml" --methods pv_lcmd random lcmd random_extended \
        pool_variance_reduction maxdist_embedding committee
    done
    run configs/acac_large.toml --methods pool_variance_reduction maxdist_embedding committee \
      --seeds 3 4 ;;
  *) echo "usage: $0 A|B" >&2; exit 2 ;;
esac
