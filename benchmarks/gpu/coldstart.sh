# Issue #15, cold start from built engines, on the lent GPU machine from the repository root (carry .whl on the
# first call; the engines live in /tmp while the machine stays warm):
#   bash benchmarks/gpu/coldstart.sh build [S]   static AOTInductor packages of the SDXL 2048 default plan (the
#        folder issue15.sh builds, keyed by the scheme-2 fingerprints), detached; waits S seconds (default 560)
#   bash benchmarks/gpu/coldstart.sh run [N]     N fresh mf-generate --engines processes (default 3), each with its
#        phases, then the load phase before/after on the host CPU and the memory estimate's time
#        (benchmarks/lab/load_phase.py, SDXL)
# Results are packed into $OUT/coldstart-<phase>.tar.gz.
source benchmarks/gpu/env.sh
source benchmarks/gpu/detached.sh
ENG=/tmp/mf-aoti-sdxl
RES=/tmp/mf-coldstart
mkdir -p $RES

case "$1" in
  build)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    detach coldstart-build "python3 -m megafusion.cli.build_engines --model sdxl --random-weights --backend aoti --precision fp16 --device cuda --size 2048x2048 --output $ENG --jobs 3"
    wait_detached "${2:-560}"
    cp $JOBS/*.log $RES/ 2>/dev/null
    tar czf "$OUT/coldstart-build.tar.gz" -C $RES . ;;
  run)
    wait_detached 300 || true
    python3 benchmarks/lab/cold_start_phases.py --engines $ENG --runs "${2:-3}" --device cuda --output $RES/cold -- \
      --model sdxl --random-weights --size 2048x2048 --prompt "a lighthouse on a cliff" 2>&1 | tail -n 12
    python3 benchmarks/lab/load_phase.py --model sdxl --random-weights --estimate 2048x2048 --output $RES/load 2>&1 | tail -n 5
    tar czf "$OUT/coldstart-run.tar.gz" -C $RES . ;;
esac
