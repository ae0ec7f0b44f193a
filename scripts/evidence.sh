#!/usr/bin/env bash
# The evidence rerun with a stronger expert (issue 19), every step resumable: run it again after an
# interruption and it goes on where it stopped (training from its last checkpoint, evaluations from their
# finished examples). Outputs go to runs/evidence/; results/ gets copies once they are final.
#
#   THREADS=1 bash scripts/evidence.sh      # one torch thread (another job on the other core)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
THREADS=${THREADS:-2}
PY=${PYTHON:-python}
OUT=runs/evidence
mkdir -p "$OUT"

# 1. the recipe, chosen on validation templates; the best candidate replaces the shipped expert only if it beats
#    the shipped recipe (retrained on FIT templates) there. The rerun uses the best on >= 1,500 examples either way.
$PY scripts/choose_demo_recipe.py --threads "$THREADS"
$PY scripts/choose_demo_recipe.py --report --ship --threads "$THREADS" || echo "the shipped expert stays"
read -r EXPERT LR RANK EPOCHS N < <($PY - <<'EOF'
import json, pathlib
rows = json.loads(pathlib.Path("results/recipe/summary.json").read_text())["candidates"]
best = next(row for row in rows if row["train_examples"] >= 1500)  # sorted best first
expert = pathlib.Path.home() / ".cache/proxytune/recipes" / best["directory"]
print(expert, best["learning_rate"], best["rank"], best["epochs"], best["train_examples"])
EOF
)

# 2. the anchor: the 1.5B base tuned with the same recipe on the same examples
ANCHOR=$HOME/.cache/proxytune/adapters/gsm-qwen2.5-coder-1.5b-anchor-$(basename "$EXPERT")
if [ ! -f "$ANCHOR/tune_summary.json" ]; then
    RESUME=$([ -d "$ANCHOR/checkpoint" ] || [ -d "$ANCHOR/checkpoint.old" ] && echo --resume || true)
    $PY scripts/train_demo_expert.py --anchor --split fit --train-examples "$N" --learning-rate "$LR" --rank "$RANK" \
        --epochs "$EPOCHS" --output "$ANCHOR" --threads "$THREADS" $RESUME
fi

TRIO=(--base qwen2.5-coder-1.5b-instruct --expert "$EXPERT" --anti-expert qwen2.5-coder-0.5b-instruct
      --dtype bfloat16 --max-new-tokens 384 --batch-size 32 --threads "$THREADS")

# 3. the headline: base, expert, proxy and anchor on 200 held-out problems
proxytune eval gsm "${TRIO[@]}" --limit 200 --tuned "$ANCHOR" --by steps --by template --output "$OUT/gsm"

# 4. the α sweep and the token-level analysis on the first 100
proxytune sweep-alpha gsm "${TRIO[@]}" --alphas 0,0.25,0.5,1,1.5,2 --limit 100 --tuned "$ANCHOR" --reuse "$OUT/gsm" \
    --output "$OUT/sweep"
proxytune analyze "$OUT/gsm" --limit 100 --output "$OUT/analysis"

# 5. where α is spent: more α while the proxy reasons (until its "####" line), early, or late; base, expert and
#    anchor do not depend on the proxy's α, so their results are reused for the paired comparisons
for schedule in "0:2,####:1" "0:2,64:1" "0:1,64:2"; do
    proxytune eval gsm "${TRIO[@]}" --limit 100 --tuned "$ANCHOR" --alpha-schedule "$schedule" --by steps \
        --reuse "$OUT/gsm" --output "$OUT/schedule-$(echo "$schedule" | tr ':,#' '-_h')"
done
