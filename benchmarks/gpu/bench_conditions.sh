# mf-bench with the extra conditions (issue #18 item 5) and the memory-estimate cache (#15) on the lent GPU machine,
# from the repository root, one warm machine (carry the diffusers wheel; inputs and results live in /tmp while it
# stays warm):
#   bash benchmarks/gpu/bench_conditions.sh torch [S]    SDXL 2048, random weights: graphs and compiled, each plain and
#        with a random rank-16 LoRA + the random ControlNet; then with image to image (--strength 0.5)
#   bash benchmarks/gpu/bench_conditions.sh engines [S]  the same on engines:aoti from /tmp/mf-aoti-sdxl (built by
#        benchmarks/gpu/controlnet_h200.sh build): the LoRA swapped (its own column), then the ControlNet engines
#   bash benchmarks/gpu/bench_conditions.sh memory       mf-generate --dry-run twice: the second start reads the estimate
#   bash benchmarks/gpu/bench_conditions.sh wait [S]     more time for a run that outlasted its call
# S: seconds to wait for the detached runs (default 540). Results: $OUT/<run>-results.json and <run>-report.md.
source benchmarks/gpu/env.sh
source benchmarks/gpu/detached.sh
IN=/tmp/mf-cond-inputs
CN=/tmp/mf-controlnet-sdxl
ENG=/tmp/mf-aoti-sdxl
RES=/tmp/mf-bench-cond
mkdir -p $RES
B="python3 -m megafusion.cli.bench --model sdxl --random-weights --size 2048x2048 --device cuda --repeats 3"

inputs() {
  [ -e $IN/lora.safetensors ] || python3 benchmarks/lab/condition_inputs.py --model sdxl --rank 16 --size 1024x1024 --output $IN
  [ -e $CN/config.json ] || python3 benchmarks/lab/controlnet_bench.py --model sdxl --save-controlnet $CN
}

collect() {
  wait_detached "$1"
  for d in $RES/*/; do n=$(basename $d); cp $d/results.json "$OUT/$n-results.json" 2>/dev/null; cp $d/report.md "$OUT/$n-report.md" 2>/dev/null; done
}

case "$1" in
  torch)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    inputs
    detach cond-torch "cd $PWD && $B --variants graphs,compiled --lora $IN/lora.safetensors:0.8 --controlnet $CN \
      --control-image $IN/control.png --output $RES/torch-lora-cn && \
      $B --variants graphs,compiled --image $IN/photo.png --strength 0.5 --output $RES/torch-img2img"
    collect "${2:-540}" ;;
  engines)
    [ -e $ENG/manifest.json ] || { echo "no engines in $ENG: run benchmarks/gpu/controlnet_h200.sh build first"; exit 1; }
    inputs
    detach cond-engines "cd $PWD && $B --variants engines:aoti --engine-dir $ENG --direct-for none \
      --lora $IN/lora.safetensors:0.8 --output $RES/aoti-lora && \
      $B --variants engines:aoti --engine-dir $ENG --direct-for none --controlnet $CN --control-image $IN/control.png \
      --output $RES/aoti-cn"
    collect "${2:-540}" ;;
  memory)
    for i in 1 2; do
      /usr/bin/time -f "wall %e s" python3 -m megafusion.cli.generate --model sdxl --random-weights --size 2048x2048 \
        --prompt x --device cuda --dry-run 2>&1 | grep -E "memory estimates|estimated peak|wall"
    done | tee "$OUT/memory-cache.txt" ;;
  wait) collect "${2:-540}" ;;
  *) echo "usage: bash benchmarks/gpu/bench_conditions.sh torch|engines|memory|wait [SECONDS]"; exit 2 ;;
esac
