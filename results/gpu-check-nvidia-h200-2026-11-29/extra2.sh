#!/usr/bin/env bash
set -uo pipefail
PY=/opt/torch/.venv/bin/python3
SITE="$($PY -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')"
LIBDIRS=$(find "$SITE/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)
FIX=$(mktemp -d); ln -sf "$(find "$SITE/nvidia" -name libnccl.so.2 | head -n1)" "$FIX/libnccl.so"
export LD_LIBRARY_PATH="$FIX:$LIBDIRS" HERD_CACHE=$PWD/.gpu/cache RUST_LOG=info
H=.gpu/herd
run() { local tag=$1; shift; echo "== $tag"; $H batch --model random:1b --device cuda "$@" 2>&1 | grep -E "batch done|prefix cache served|error" | tee -a "$OUT/extra2.log"; }
for rep in 1 2; do
run "json_schema rep $rep" --input .gpu/schema.jsonl --output $OUT/schema$rep.jsonl
run "unconstrained, each record as many tokens as its schema output, rep $rep" --input .gpu/free2.jsonl --output $OUT/free2-$rep.jsonl
done
run "prefix cache on"  --input .gpu/shared_prefix.jsonl --output $OUT/sp-cache.jsonl --seed 1
run "prefix cache off" --input .gpu/shared_prefix.jsonl --output $OUT/sp-nocache.jsonl --seed 1 --no-prefix-cache
run "prefix cache off, max batch 1" --input .gpu/shared_prefix.jsonl --output $OUT/sp-nocache-b1.jsonl --seed 1 --no-prefix-cache --max-batch-size 1 --records 1-20
rm -f $OUT/free2-*.jsonl $OUT/schema2.jsonl $OUT/*.state
