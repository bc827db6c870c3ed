#!/bin/bash
# =============================================================================
# hncse-dist scaling study: the same config at several node counts (and/or processes
# per node), one slurm/train.sbatch job per point, each with its own output_dir, plus a
# report job that runs when all of them have finished:
#
#   slurm/scaling.sh --nodes "1 2 4 8" configs/x.yaml max_steps=500
#   slurm/scaling.sh --nodes "1 2 4" --global-batch 512 configs/x.yaml       # strong scaling
#   slurm/scaling.sh --nodes 1 --procs-per-node "1 2 4 8" configs/x.yaml     # GPUs in one node
#   slurm/scaling.sh --cpu --nodes 1 --procs-per-node "1 2" configs/x.yaml   # CPU-only machine
#
# Default is weak scaling: batch_size (per process) stays as configured, so the global batch
# grows with the world size.  --global-batch G keeps the global batch fixed instead
# (batch_size = G / world size; train.sbatch checks that it divides).
#
# Options:
#   --nodes LIST           node counts (default "1 2 4 8")
#   --procs-per-node LIST  processes per node; each value p also asks for p GPUs per node
#                          (--gpus-per-node=p) unless --cpu.  Default: whatever
#                          train.sbatch's header / the allocation gives.
#   --global-batch G       strong scaling (see above)
#   --out DIR              root of the run directories (default runs/scaling-<date>-<time>);
#                          each point writes DIR/n<nodes>-p<procs>  (or DIR/n<nodes>)
#   --cpu                  CPU-only cluster: --gpus-per-node=0 (set --procs-per-node too)
#   --sbatch "ARGS"        extra sbatch options for every job (e.g. "--time=1:00:00 -p gpu")
#   --no-report            do not submit the dependent `hncse-dist report` job
#   --dry-run              print the sbatch commands, submit nothing
# Everything after the options is passed to train.sbatch: CONFIG [key=value ...].
# Site defaults also come from sbatch's environment (SBATCH_PARTITION, SBATCH_ACCOUNT, ...).
#
# The report (DIR/report.md, .csv, .png) can be rebuilt any time with
#   hncse-dist report DIR/n* --output DIR/report
# =============================================================================
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODES_LIST="1 2 4 8"
PROCS_LIST=""
GLOBAL_BATCH=""
OUT_ROOT=""
CPU=0
EXTRA_SBATCH=""
REPORT=1
DRY_RUN=0

usage() { sed -n '2,/^# =====/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//; /^=====/d'; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) NODES_LIST=$2; shift 2 ;;
        --procs-per-node) PROCS_LIST=$2; shift 2 ;;
        --global-batch) GLOBAL_BATCH=$2; shift 2 ;;
        --out) OUT_ROOT=$2; shift 2 ;;
        --cpu) CPU=1; shift ;;
        --sbatch) EXTRA_SBATCH=$2; shift 2 ;;
        --no-report) REPORT=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) echo "scaling.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done
[[ $# -gt 0 ]] || { echo "scaling.sh: give a config file and/or key=value overrides (see --help)" >&2; exit 2; }
for arg in "$@"; do
    [[ $arg == output_dir=* ]] && { echo "scaling.sh: output_dir is set per run; use --out DIR" >&2; exit 2; }
    if [[ -n $GLOBAL_BATCH && $arg == batch_size=* ]]; then
        echo "scaling.sh: --global-batch and batch_size= exclude each other" >&2; exit 2
    fi
done
OUT_ROOT=${OUT_ROOT:-runs/scaling-$(date +%Y%m%d-%H%M%S)}
read -r -a EXTRA <<< "$EXTRA_SBATCH"
read -r -a NODES <<< "$NODES_LIST"
read -r -a PROCS <<< "${PROCS_LIST:-default}"

submit() {  # prints the job id
    if [[ $DRY_RUN == 1 ]]; then
        { env | grep -E '^HNCSE_(OUTPUT_DIR|PROCS_PER_NODE|GLOBAL_BATCH)=' | tr '\n' ' '
          printf 'sbatch'; printf ' %q' "$@"; echo; } >&2
        echo "DRYRUN"
    else
        sbatch --parsable "$@" | cut -d';' -f1
    fi
}

[[ $DRY_RUN == 1 ]] || mkdir -p "$OUT_ROOT"
JOB_IDS=()
RUN_DIRS=()
for n in "${NODES[@]}"; do
    for p in "${PROCS[@]}"; do
        if [[ $p == default ]]; then
            name=n$n
            gpu_opt=(); [[ $CPU == 1 ]] && gpu_opt=(--gpus-per-node=0)
        else
            name=n$n-p$p
            if [[ $CPU == 1 ]]; then gpu_opt=(--gpus-per-node=0); else gpu_opt=(--gpus-per-node="$p"); fi
        fi
        run_dir=$OUT_ROOT/$name
        id=$(
            export HNCSE_OUTPUT_DIR=$run_dir
            [[ $p == default ]] || export HNCSE_PROCS_PER_NODE=$p
            [[ -z $GLOBAL_BATCH ]] || export HNCSE_GLOBAL_BATCH=$GLOBAL_BATCH
            submit --nodes="$n" "${gpu_opt[@]}" --job-name="hncse-scale-$name" "${EXTRA[@]}" \
                "$HERE/train.sbatch" "$@"
        )
        echo "submitted $name: job $id -> $run_dir"
        JOB_IDS+=("$id")
        RUN_DIRS+=("$run_dir")
    done
done

if [[ $REPORT == 1 ]]; then
    deps=$(IFS=:; echo "${JOB_IDS[*]}")
    report_cmd="${HNCSE_REPORT_CMD:-hncse-dist report} $(printf '%q ' "${RUN_DIRS[@]}")--output $(printf '%q' "$OUT_ROOT/report")"
    id=$(submit --dependency="afterok:$deps" --kill-on-invalid-dep=yes --nodes=1 --ntasks=1 \
        --cpus-per-task=1 --time=00:10:00 --job-name=hncse-scale-report \
        --output="$OUT_ROOT/report-%j.out" "${EXTRA[@]}" --wrap="$report_cmd")
    echo "report job $id (after ${JOB_IDS[*]}) -> $OUT_ROOT/report.{md,csv,png}"
fi
echo "runs: ${RUN_DIRS[*]}"
