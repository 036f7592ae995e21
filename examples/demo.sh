#!/usr/bin/env bash
# The whole pipeline, so far, on the bundled clips: extract -> inspect --verify -> report.
# Run through `make demo` (it creates .venv and installs the pinned stack first).
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
echo "Outputs:"
echo "  shards:        $OUT/shards/*.tar  (one JSON sidecar per shard)"
echo "  clip statuses: $OUT/shards/status.jsonl"
echo "  dataset card:  $OUT/shards/dataset.json  (feature set, hash, counts, train-split mean/std)"
echo "  report:        $OUT/report/index.html"
