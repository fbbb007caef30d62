#!/usr/bin/env bash
# Second device call: prefix cache and structured outputs on the GPU (random:1b), after gpu-check's setup.
set -uo pipefail
PY=/opt/torch/.venv/bin/python3
SITE="$($PY -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')"
LIBDIRS=$(find "$SITE/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)
FIX=$(mktemp -d); ln -sf "$(find "$SITE/nvidia" -name libnccl.so.2 | head -n1)" "$FIX/libnccl.so"
export LD_LIBRARY_PATH="$FIX:$LIBDIRS" HERD_CACHE=$PWD/.gpu/cache RUST_LOG=info
H=.gpu/herd
run() { local tag=$1; shift; echo "== $tag"; $H batch --model random:1b --device cuda "$@" 2>&1 | grep -E "batch done|prefix cache|wall|error|mask" | tee -a "$OUT/extra.log"; }
run "prefix cache on"  --input .gpu/shared_prefix.jsonl --output $OUT/sp-cache.jsonl --seed 1
run "prefix cache off" --input .gpu/shared_prefix.jsonl --output $OUT/sp-nocache.jsonl --seed 1 --no-prefix-cache
cmp <(sed -E 's/,"prompt_tokens_details":\{"cached_tokens":[0-9]+\}//' $OUT/sp-cache.jsonl) <(sed -E 's/,"prompt_tokens_details":\{"cached_tokens":[0-9]+\}//' $OUT/sp-nocache.jsonl) && echo "sp outputs identical but for cached_tokens" | tee -a "$OUT/extra.log"
run "unconstrained (64 records, 96 tokens, ignore_eos)" --input .gpu/free.jsonl --output $OUT/free.jsonl
run "json_schema (64 records)" --input .gpu/schema.jsonl --output $OUT/schema.jsonl
$PY - "$OUT/schema.jsonl" <<'PY' | tee -a "$OUT/extra.log"
import json, sys
ok = n = 0
for line in open(sys.argv[1]):
    r = json.loads(line); n += 1
    try:
        v = json.loads(r["text"]); ok += isinstance(v, dict) and set(v) == {"name", "age", "city", "tags", "active"}
    except Exception:
        pass
print(f"schema outputs parsed with all keys: {ok} of {n}")
PY
rm -f $OUT/sp-*.jsonl $OUT/free.jsonl
