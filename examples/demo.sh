#!/usr/bin/env bash
# The whole story on the bundled clips: extract -> inspect -> report -> train (end to end) -> eval -> predict.
# Run through `make demo` (it creates .venv and installs the pinned stack first). A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== extract: 4 bundled clips (text: bundled all-MiniLM-L6-v2, audio: random-init small wav2vec 2.0, video: FaceMesh)"
mmfuse extract examples/media/manifest.csv --media-root examples/media --out "$OUT/shards" --workers 1 --shard-size 2

echo
echo "== inspect --verify"
mmfuse inspect "$OUT/shards" --verify

echo
echo "== report"
mmfuse report "$OUT/shards" --out "$OUT/report"

echo
echo "== train: TCMax, text and audio encoders fine-tuned end to end from the token ids and waveforms in the shards"
mmfuse train --shards "$OUT/shards" --model tcmax --run-dir "$OUT/run" \
    mode=end_to_end epochs=3 batch_size=2 num_workers=0 log_every=1

echo
echo "== eval: the selected checkpoint on the test split, then with every subset of modalities removed"
mmfuse eval --checkpoint "$OUT/run/checkpoints/best.pt" --shards "$OUT/shards" --split test --json
mmfuse eval --checkpoint "$OUT/run/checkpoints/best.pt" --shards "$OUT/shards" --split train --missing all

echo
echo "== predict: one raw clip through the checkpoint's own extraction pipeline"
mmfuse predict --checkpoint "$OUT/run/checkpoints/best.pt" examples/media/grid/bbaf2n.mpg --text "bin blue at f two now"

echo
echo "Outputs:"
echo "  shards:        $OUT/shards/*.tar  (one JSON sidecar per shard)"
echo "  clip statuses: $OUT/shards/status.jsonl"
echo "  dataset card:  $OUT/shards/dataset.json  (feature set, hash, counts, train-split mean/std)"
echo "  report:        $OUT/report/index.html"
echo "  training run:  $OUT/run/  (config.json, metrics.jsonl, curves.png, events/ for TensorBoard, final.json)"
echo "  checkpoints:   $OUT/run/checkpoints/best.pt (selected on validation), last.pt (resume with --resume)"
