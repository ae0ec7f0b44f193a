#!/usr/bin/env bash
# The evidence rerun with a stronger expert (issue 19), in three stages, each resumable: run a stage again after an
# interruption and it goes on where it stopped (training from its last checkpoint, evaluations from their finished
# examples). Records go straight to results/evidence/ (they are the results; commit them as they grow), so a later
# session on a fresh machine continues from them.
#
#   bash scripts/evidence.sh expert    # choose the recipe on validation templates; ship the winner if it beats the baseline
#   bash scripts/evidence.sh proxy     # expert and proxy on 200 held-out problems (the base's rows reused from
#                                      # results/gsm-demo), token-level analysis, three α schedules and the α sweep
#                                      # on the first 100 (everything that needs the expert)
#   bash scripts/evidence.sh anchor    # the 1.5B tuned with the same recipe on the same examples, and its rows
#   THREADS=1 bash scripts/evidence.sh proxy    # one torch thread (another job on the other core)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
THREADS=${THREADS:-2}
PY=${PYTHON:-python}
OUT=results/evidence
STAGE=${1:?"which stage: expert, proxy or anchor"}

# the best candidate on >= 1,500 examples (the table is sorted best first): the shipped expert when it won, else
# its run directory (retrained from its recipe if this machine lacks it)
read -r CANDIDATE LR RANK EPOCHS N SHIPPED < <($PY - <<'EOF'
import json, pathlib
summary = json.loads(pathlib.Path("results/recipe/summary.json").read_text())
best = next(row for row in summary["candidates"] if row["train_examples"] >= 1500)
shipped = summary["shipped"].get("label", "").endswith(best["directory"])
print(best["directory"], best["learning_rate"], best["rank"], best["epochs"], best["train_examples"], int(shipped))
EOF
)
if [ "$SHIPPED" = 1 ]; then EXPERT=gsm-qwen2.5-coder-0.5b; else EXPERT=$HOME/.cache/proxytune/recipes/$CANDIDATE; fi
ANCHOR=$HOME/.cache/proxytune/adapters/gsm-qwen2.5-coder-1.5b-anchor-$CANDIDATE
TRIO=(--base qwen2.5-coder-1.5b-instruct --expert "$EXPERT" --anti-expert qwen2.5-coder-0.5b-instruct
      --dtype bfloat16 --max-new-tokens 384 --batch-size 64 --threads "$THREADS" --no-progress)
SCHEDULES=("0:2,####:1" "0:2,64:1" "0:1,64:2")
schedule_dir() { echo "$OUT/schedule-$(echo "$1" | tr ':,#' '-_h')"; }

case $STAGE in
expert)
    $PY scripts/choose_demo_recipe.py --threads "$THREADS"
    $PY scripts/choose_demo_recipe.py --report --ship --threads "$THREADS" || echo "the shipped expert stays"
    ;;
proxy)
    if [ "$SHIPPED" != 1 ] && [ ! -f "$EXPERT/tune_summary.json" ]; then
        $PY scripts/choose_demo_recipe.py --learning-rates "$LR" --ranks "$RANK" --epochs "$EPOCHS" \
            --train-examples "$N" --no-baseline --threads "$THREADS"
    fi
    # the base alone does not depend on the expert: its 200 rows come from the first headline run
    $PY -m proxytune eval gsm "${TRIO[@]}" --limit 200 --roles base,expert,proxy --by steps --by template \
        --reuse results/gsm-demo --output "$OUT/gsm"
    $PY -m proxytune analyze "$OUT/gsm" --limit 100 --threads "$THREADS" --output runs/evidence/analysis
    cp runs/evidence/analysis/analysis.json "$OUT/analysis.json"
    # where α is spent: more α while the proxy reasons (until its "####" line), early, or late; base and expert are
    # reused from the headline run, so every schedule is paired against the same answers
    for schedule in "${SCHEDULES[@]}"; do
        $PY -m proxytune eval gsm "${TRIO[@]}" --limit 100 --roles base,expert,proxy --alpha-schedule "$schedule" \
            --by steps --reuse "$OUT/gsm" --output "$(schedule_dir "$schedule")"
    done
    $PY -m proxytune sweep-alpha gsm "${TRIO[@]}" --alphas 0,0.25,0.5,1,1.5,2 --limit 100 --reuse "$OUT/gsm" \
        --output "$OUT/sweep"
    ;;
anchor)
    if [ ! -f "$ANCHOR/tune_summary.json" ]; then
        RESUME=$([ -d "$ANCHOR/checkpoint" ] || [ -d "$ANCHOR/checkpoint.old" ] && echo --resume || true)
        $PY scripts/train_demo_expert.py --anchor --split fit --train-examples "$N" --learning-rate "$LR" \
            --rank "$RANK" --epochs "$EPOCHS" --output "$ANCHOR" --threads "$THREADS" $RESUME
    fi
    cp "$ANCHOR/tune_summary.json" "$OUT/anchor_tune_summary.json"
    $PY -m proxytune eval gsm "${TRIO[@]}" --limit 200 --roles tuned --tuned "$ANCHOR" --by steps --by template \
        --output "$OUT/gsm"
    # the sweep and the schedules take the anchor's rows from the headline run (gap closed in their tables); without
    # the expert here, the sweep is summarised over the α values it has finished (no model loads for those)
    ALPHAS=0,0.25,0.5,1,1.5,2
    if [ "$SHIPPED" != 1 ] && [ ! -f "$EXPERT/tune_summary.json" ]; then
        ALPHAS=$($PY -c 'import collections
from proxytune.evaluation.records import read_records
rows = collections.Counter(record["role"] for record in read_records("results/evidence/sweep"))
print(",".join(["0"] + [r.split("@")[1] for r in rows if r.startswith("proxy@") and rows[r] >= 100]))')
    fi
    $PY -m proxytune sweep-alpha gsm "${TRIO[@]}" --alphas "$ALPHAS" --limit 100 --tuned "$ANCHOR" \
        --reuse "$OUT/gsm" --output "$OUT/sweep"
    for schedule in "${SCHEDULES[@]}"; do
        $PY -m proxytune eval gsm "${TRIO[@]}" --limit 100 --tuned "$ANCHOR" --alpha-schedule "$schedule" \
            --by steps --reuse "$OUT/gsm" --output "$(schedule_dir "$schedule")"
    done
    ;;
*) echo "unknown stage $STAGE: expert, proxy or anchor" >&2; exit 2 ;;
esac
