#!/usr/bin/env bash
# Peak resident memory when a process loads all, the first half, or the second half of a model's
# layers (not run in CI; `cargo test` checks the same property on a smaller model).
# Makes a 16-layer, ~1 GB f32 model with safetensors, GGUF F32 and GGUF Q8_0 files.
# Usage: scripts/measure-shard-rss.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-$(mktemp -d)}
cargo build --release -q
bin=target/release/llmesh
[ -f "$dir/config.json" ] || $bin dev make-model --arch llama --out "$dir" --layers 16 --hidden 1024 \
    --heads 16 --kv-heads 4 --intermediate 4096 --gguf f32,q8_0 >/dev/null
printf '%-22s %-7s %12s %12s %8s %s\n' file layers weights_MiB peak_RSS_MiB ratio "limit (55% of full + 100 MiB)"
for model in "$dir" "$dir/model-f32.gguf" "$dir/model-q8_0.gguf"; do
    full=$($bin dev load --model "$model" --layers 0..16 | python3 -c 'import json,sys; print(json.load(sys.stdin)["weight_bytes"])')
    for layers in 0..16 0..8 8..16; do
        $bin dev load --model "$model" --layers "$layers" | python3 -c "
import json, sys
r = json.load(sys.stdin); full = $full; peak = r['peak_rss_bytes']
limit = full * 0.55 + 100 * 2**20
print(f\"{'$(basename "$model")':22} {r['layers']:7} {r['weight_bytes']/2**20:12.1f} {peak/2**20:12.1f} {peak/full:8.3f} {'ok' if r['layers'] == '0..16' or peak <= limit else 'OVER'}\")"
    done
done
