#!/usr/bin/env bash
# Reproduce a row block of docs/results.md: for each scenario, choose each regularizer's strength
# on a validation split (ewc sweep, seed 0), then run every strategy on the given seeds with the
# chosen value (ewc compare), and write one report per scenario.
#
#   bash scripts/reproduce.sh CONFIG "SCENARIOS" "STRATEGIES" SEEDS OUT
#   bash scripts/reproduce.sh configs/split-mnist-hsu2018.yaml "task domain class" \
#        "naive,joint,ewc,online-ewc,si,mas,l2" 0,1,2 runs/split-mnist
#
# Grids (our convention: (λ/2)·Σ Ω (θ-θ*)², mean Fisher) can be overridden: GRID_EWC=... etc.
set -euo pipefail
config=$1 scenarios=$2 strategies=$3 seeds=$4 out=$5
EWC=${EWC:-.venv/bin/ewc}
PY=${PY:-.venv/bin/python}
grid_for() {
  case $1 in
    ewc | online-ewc) echo "${GRID_EWC:-1e2,1e3,1e4,1e5,1e6}" ;;
    si) echo "${GRID_SI:-1e-1,1,1e1,1e2,1e3}" ;;
    mas) echo "${GRID_MAS:-1e-2,1e-1,1,1e1,1e2}" ;;
    l2) echo "${GRID_L2:-1e-3,1e-2,1e-1,1,1e1}" ;;
  esac
}
for scenario in $scenarios; do
  dir=$out/$scenario
  for strategy in ${strategies//,/ }; do
    lam=()
    if [ -n "$(grid_for "$strategy")" ]; then
      "$EWC" sweep --config "$config" --scenario "$scenario" --strategy "$strategy" \
        --grid "$(grid_for "$strategy")" --out "$dir/sweep-$strategy" --quiet --no-report
      lam=(--lam "$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen'])" \
        "$dir/sweep-$strategy/sweep.json")")
      # The sweep's final run is seed 0 at the chosen value: compare resumes from it.
      case ",$seeds," in *,0,*)
        mkdir -p "$dir/runs"
        cp "$dir/sweep-$strategy/final.json" "$dir/runs/$strategy-seed0.json" ;;
      esac
    fi
    "$EWC" compare --config "$config" --scenario "$scenario" --strategies "$strategy" \
      "${lam[@]}" --seeds "$seeds" --out "$dir/runs" --quiet --no-report
  done
  "$EWC" report "$dir"/runs/*-seed*.json --out "$dir/report.html"
done
