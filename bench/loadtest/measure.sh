#!/usr/bin/env bash
# The load-test measurement of docs/benchmarks.md ("Load test"): for each workload, the saturation rate
# from a burst under fcfs, then skip-join-mlfq, mlfq, fcfs and rtc side by side at 50/80/95% of it.
# Default model, 2-stage CPU stack. NUM requests per run (the first WARMUP not measured).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
NUM=${NUM:-32}
WARMUP=${WARMUP:-2}
SLO=${SLO:-ttft=2,tpot=0.2}
declare -A WORKLOAD=(
  [zipf]="--cv 2 --input-zipf 1.1,16,2048 --output-zipf 1.1,1,2048"
  [azure_conv]="--trace azure-conv"
  [azure_code]="--trace azure-code"
)
for name in ${NAMES:-zipf azure_conv azure_code}; do
  args="${WORKLOAD[$name]} --num $NUM --seed 0 --no-progress"
  if [ -z "${REUSE_SATURATION:-}" ] || [ ! -f "bench/results/loadtest_saturation_${name}.json" ]; then
    $PY -m services.cli loadtest --launch --policies fcfs --saturation $args \
        --out "bench/results/loadtest_saturation_${name}.json"
  fi
  sat=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['runs'][0]['summary']['saturation']['requests_per_s'])" \
        "bench/results/loadtest_saturation_${name}.json")
  rates=$($PY -c "import sys; s=float(sys.argv[1]); print(','.join(f'{s*f:.4f}' for f in (0.5, 0.8, 0.95)))" "$sat")
  echo "== $name: saturation $sat req/s, rates $rates"
  $PY -m services.cli loadtest --launch --policies skip-join-mlfq,mlfq,fcfs,rtc --rates "$rates" $args \
      --warmup "$WARMUP" --slo "$SLO" --out "bench/results/loadtest_${name}.json" --plots "docs/img/loadtest_${name}"
done
