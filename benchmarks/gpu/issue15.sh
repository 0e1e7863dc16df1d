# Issue #15 on the lent GPU machine, from the repository root, one warm machine across calls (engines, caches and
# the detached jobs live in /tmp while it stays warm; carry .whl on the first call):
#   bash benchmarks/gpu/issue15.sh build [S]   static AOTInductor packages of the SDXL 2048 and SD1.5 1024 default
#        plans (mf-build-engines --jobs 3) plus each direct plan's standard UNet at the final size, detached;
#        meanwhile the cuDNN workspace probe (benchmarks/lab/cudnn_workspace.py); waits S seconds for the builds
#   bench-sdxl [S]   mf-bench SDXL 2048: engines:aoti beside compiled, direct on the same packages, cold starts
#   bench-sd15 [S]   mf-bench SD1.5 1024 the same way (no cold starts)
#   wait [S]         more time for what is still running
# Results are packed into $OUT/issue15-<phase>.tar.gz (a call brings back at most 8 files).
source benchmarks/gpu/env.sh
source benchmarks/gpu/detached.sh
ENG=/tmp/mf-aoti-sdxl
ENG15=/tmp/mf-aoti-sd15
RES=/tmp/mf-issue15
mkdir -p $RES
B="python3 -m megafusion.cli.build_engines --random-weights --backend aoti --precision fp16 --device cuda"
BENCH="python3 -m megafusion.cli.bench --random-weights --device cuda --no-peak"

pack() { pack_jobs $RES "$OUT/issue15-$1.tar.gz"; }

case "$1" in
  build)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    detach build-sdxl "$B --model sdxl --size 2048x2048 --output $ENG --jobs 3 && $B --model sd15 --size 1024x1024 --output $ENG15 --jobs 3"
    detach build-direct "$B --model sdxl --stages 2048x2048:50 --networks unet-standard --output $ENG && $B --model sd15 --stages 1024x1024:50 --networks unet-standard --output $ENG15"
    python3 benchmarks/lab/cudnn_workspace.py --output $RES/cudnn_workspace.json 2>&1 | tail -n 8
    wait_detached "${2:-420}"
    pack build ;;
  bench-sdxl)
    wait_detached "${3:-300}" || true
    detach bench-sdxl "$BENCH --model sdxl --size 2048x2048 --variants engines:aoti,compiled --direct-for engines:aoti --engine-dir $ENG --cold-start engines:aoti,compiled --repeats 3 --warmup 1 --output $RES/sdxl"
    wait_detached "${2:-500}"
    pack bench-sdxl ;;
  bench-sd15)
    wait_detached "${3:-300}" || true
    detach bench-sd15 "$BENCH --model sd15 --size 1024x1024 --variants engines:aoti,compiled --direct-for engines:aoti --engine-dir $ENG15 --repeats 5 --warmup 1 --output $RES/sd15"
    wait_detached "${2:-400}"
    pack bench-sd15 ;;
  wait)
    wait_detached "${2:-500}"
    pack wait ;;
esac
