#!/usr/bin/env bash
# The end-to-end demo (`make demo`): real image-caption data -> shards -> 2-process DDP training of a tiny
# DiffCLIP on CPU (torchrun, gloo) -> zero-shot classification and retrieval on held-out images.
#
#   1. the environment (`make venv`: .venv with torch and the project);
#   2. the sources (scripts/get_demo_data.sh): Google Noto emoji and Twitter emoji (npm packages);
#   3. shards in the img2dataset layout from the Noto set (training/make_shards.py), 64 px, 5% held out;
#   4. training: torchrun --nproc_per_node 2 training/main.py (DiffCLIP-Tiny-64, CPU, gloo);
#   5. evaluation on the Twitter emoji: the same emoji drawn by another artist, never seen in training:
#      zero-shot classification into the 98 emoji subcategories and the 9 categories (eval/zeroshot.py)
#      and caption <-> image retrieval over the 1,906 base emoji (eval/retrieval.py).
#
# Everything goes to $DEMO_OUT (default demo_out/). Re-running continues an interrupted training
# (--resume latest) and re-evaluates; `rm -rf demo_out` starts over. Knobs (environment): DEMO_EPOCHS,
# DEMO_BATCH (per process), DEMO_LR, DEMO_WARMUP, DEMO_MODEL, DEMO_NPROC.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${DEMO_OUT:-demo_out}"
MODEL="${DEMO_MODEL:-DiffCLIP-Tiny-64}"
EPOCHS="${DEMO_EPOCHS:-10}"
BATCH="${DEMO_BATCH:-64}"
LR="${DEMO_LR:-1e-3}"
WARMUP="${DEMO_WARMUP:-40}"
NPROC="${DEMO_NPROC:-2}"
SOURCES="${DEMO_SOURCES:-data/sources}"
PY=.venv/bin/python
RUN_NAME="${MODEL}-noto"
RUN="$OUT/logs/$RUN_NAME"
START=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - START ))s] $*"; }

stamp "1/5 environment (make venv)"
make -s venv

stamp "2/5 demo sources -> $SOURCES"
OPENCLIPART=0 scripts/get_demo_data.sh "$SOURCES"

stamp "3/5 shards from the Noto emoji -> $OUT/shards/noto"
if [ ! -f "$OUT/shards/noto/sizes.json" ]; then
    "$PY" training/make_shards.py --source noto-emoji --input "$SOURCES/emoji-datasource-google" \
        --output "$OUT/shards/noto" --image-size 64 --val-fraction 0.05 --samples-per-shard 500 --no-progress
else
    echo "shards already in $OUT/shards/noto"
fi

stamp "4/5 training $MODEL: $NPROC processes x batch $BATCH, $EPOCHS epochs (torchrun, gloo, CPU)"
export OMP_NUM_THREADS=1
.venv/bin/torchrun --standalone --nproc_per_node "$NPROC" training/main.py \
    --model "$MODEL" --train-data "$OUT/shards/noto" --val-data "$OUT/shards/noto/val" \
    --batch-size "$BATCH" --epochs "$EPOCHS" --lr "$LR" --warmup "$WARMUP" --wd 0.1 --precision fp32 \
    --workers 1 --seed 0 --logs-dir "$OUT/logs" --name "$RUN_NAME" --resume latest \
    --save-frequency 1 --save-every-n-steps 50 --delete-previous-checkpoint --val-frequency 5 \
    --log-every-n-steps 10 --report-to tensorboard

stamp "5/5 evaluation on the held-out Twitter emoji"
mkdir -p "$OUT/results"
export OMP_NUM_THREADS=2
EVAL_ARGS=(--model "$MODEL" --pretrained "$RUN/final_model" --data-root "$SOURCES" --split all --workers 2
           --batch-size 256 --no-progress)
for ds in emoji-twitter-subcategory emoji-twitter; do
    "$PY" eval/zeroshot.py "${EVAL_ARGS[@]}" --dataset "$ds" --output "$OUT/results/zeroshot_${ds//-/_}.json" >/dev/null
done
if [ -f eval/retrieval.py ]; then
    "$PY" eval/retrieval.py "${EVAL_ARGS[@]}" --dataset emoji-twitter \
        --output "$OUT/results/retrieval_emoji_twitter.json" >/dev/null
fi

ELAPSED=$(( $(date +%s) - START ))
"$PY" - "$OUT" "$RUN" "$ELAPSED" <<'EOF'
import json
import sys
from pathlib import Path

out, run, elapsed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
train = [r for r in records if r["type"] == "train"]
val = [r for r in records if r["type"] == "val"]
print("\n==================== diffclip demo: results ====================")
if train:
    print(f"training: {train[-1]['step']} steps, loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> "
          f"{train[-1]['loss']:.3f}, logit scale {train[-1]['logit_scale']:.1f}")
if val:
    v = val[-1]
    print(f"held-out Noto captions ({v['num_samples']} pairs): val loss {v['val_loss']:.3f}, image R@1 "
          f"{100 * v['image_retrieval_recall@1']:.1f}% (chance {100 / v['num_samples']:.1f}%)")
for name, title, n_cls in (("zeroshot_emoji_twitter_subcategory", "98 subcategories", 98),
                            ("zeroshot_emoji_twitter", "9 categories", 9)):
    path = out / "results" / f"{name}.json"
    if path.is_file():
        m = json.loads(path.read_text())["metrics"]
        print(f"zero-shot, Twitter emoji -> {title}: top-1 {100 * m['acc1']:.1f}%, top-5 {100 * m['acc5']:.1f}%, "
              f"mean per-class recall {100 * m['mean_per_class_recall']:.1f}% (uniform chance: top-1 "
              f"{100 / n_cls:.1f}%, top-5 {500 / n_cls:.1f}%)")
ret_path = out / "results" / "retrieval_emoji_twitter.json"
if ret_path.is_file():
    m = json.loads(ret_path.read_text())["metrics"]
    n = 1906
    print(f"retrieval, Twitter emoji ({n} images): caption->image R@1 {100 * m['image_retrieval_recall@1']:.1f}% "
          f"R@5 {100 * m['image_retrieval_recall@5']:.1f}% R@10 {100 * m['image_retrieval_recall@10']:.1f}%; "
          f"image->caption R@1 {100 * m['text_retrieval_recall@1']:.1f}% R@5 {100 * m['text_retrieval_recall@5']:.1f}% "
          f"R@10 {100 * m['text_retrieval_recall@10']:.1f}% (chance R@1 {100 / n:.2f}%, R@10 {1000 / n:.2f}%)")
print(f"\nweights     {run / 'final_model'}  (diffclip.create_model('{run.name.rsplit('-noto', 1)[0]}', "
      f"pretrained='{run / 'final_model'}'))")
print(f"checkpoints {run / 'checkpoints'}")
print(f"logs        {run / 'out.log'}, {run / 'results.jsonl'}, {run / 'params.txt'}")
print(f"TensorBoard {run / 'tensorboard'}  (tensorboard --logdir {run / 'tensorboard'})")
print(f"results     {out / 'results'}")
print(f"total time  {elapsed // 60} min {elapsed % 60} s")
EOF
