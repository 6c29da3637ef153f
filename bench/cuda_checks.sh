#!/usr/bin/env bash
# Every check that needs a CUDA device, in one go (docs/performance.md): the CUDA tests of stacks
# and graphs, bench_epoch in its eager/graphed × alone/stacked modes, bench_probe (the probes of a
# stack taken together, against each alone), a short real paper-shaped
# sweep on CIFAR-10-shaped data, and bench_study's projection of the paper profile, stacked and
# graphed. Each stage has its own time limit and writes its output under OUT as it goes.
#
#   bash bench/cuda_checks.sh OUT [python]      (run from the repository root)
#
# Knobs (environment): STACK (16), WORKERS (4), SWEEP_EPOCHS (2), STUDY_STEPS (8), DEVICE (cuda),
# STUDY_SETTINGS (all), EXTRA (key=value items for every run, e.g. train_subset=512 to try the
# script on a CPU first), STAGES (default "tests epochs probes sweep study": a subset runs those only).
set -u
OUT=${1:?usage: bash bench/cuda_checks.sh OUT [python]}
PY=${2:-python3}
STACK=${STACK:-16}; WORKERS=${WORKERS:-4}; SWEEP_EPOCHS=${SWEEP_EPOCHS:-2}; STUDY_STEPS=${STUDY_STEPS:-8}
DEVICE=${DEVICE:-cuda}; STUDY_SETTINGS=${STUDY_SETTINGS:-all}; EXTRA=${EXTRA:-}
STAGES=${STAGES:-tests epochs probes sweep study}
want() { [[ " $STAGES " == *" $1 "* ]]; }
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export CREDITAUDIT_DATA_DIR="$OUT/data"
stage() {  # stage NAME SECONDS command...: output to OUT/NAME.txt, exit code and seconds appended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "rc=$rc seconds=$((SECONDS - t0))" >> "$OUT/$name.txt"
  tail -n 4 "$OUT/$name.txt"
}

stage env 30 bash -c "nvidia-smi --query-gpu=name,memory.total --format=csv; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; nproc"
stage data 60 "$PY" bench/write_cifar_shaped.py "$OUT/data"
want tests && stage tests 120 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_stack.py -k "graphed or one_stacked_step or never_waits or a_run_trained or diverges or probe"
if want epochs; then
  for mode in "stack=1 graph=0" "stack=1 graph=1" "stack=18 graph=0" "stack=18 graph=1" "stack=64 graph=1" "stack=18 graph=1 rule=ep"; do
    stage "epoch_${mode// /_}" 45 "$PY" bench/bench_epoch.py dataset=cifar10 device="$DEVICE" repeats=2 $mode $EXTRA
  done
fi
if want probes; then
  for mode in "arch=resmlp" "arch=resmlp rule=ep" "arch=smallcnn" "arch=vit_mini" "arch=resmlp full=1" "arch=vit_mini full=1"; do
    stage "probe_${mode// /_}" 60 "$PY" bench/bench_probe.py dataset=cifar10 device="$DEVICE" stack=8 repeats=1 $mode $EXTRA
  done
fi
if want sweep; then
  stage sweep 100 "$PY" -c 'from creditaudit.cli import main; main()' sweep main_audit --profile paper "epochs=$SWEEP_EPOCHS" \
    "device=$DEVICE" --workers "$WORKERS" --stack "$STACK" --graph "results=$OUT/results" $EXTRA
  grep -q " 0 failed" "$OUT/sweep.txt" || stage sweep_eager 100 "$PY" -c 'from creditaudit.cli import main; main()' sweep main_audit \
    --profile paper "epochs=$SWEEP_EPOCHS" "device=$DEVICE" --workers "$WORKERS" --stack "$STACK" "results=$OUT/results_eager" $EXTRA
fi
want study && stage study 420 "$PY" bench/bench_study.py profile=paper with_baselines=1 "device=$DEVICE" "workers=$WORKERS" \
  "stack=$STACK" graph=1 "steps=$STUDY_STEPS" "settings=$STUDY_SETTINGS" "json=$OUT/study.json" $EXTRA
rm -rf "$OUT/data" "$OUT"/results*/*/*/checkpoints
