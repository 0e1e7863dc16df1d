# DeepFloyd IF engines on the lent GPU machine (issue #21 item 4), from the repository root, one warm machine across
# calls (carry .whl with the diffusers wheel on the first call; the report, the engines and the jobs live in /tmp):
#   bash benchmarks/gpu/if_h200.sh tests         the IF GPU tests (graphs and compiled captures, AOTI packages in graphs)
#   bash benchmarks/gpu/if_h200.sh bench [S]     detached, one process after another into one report: eager and
#        graphs in fp16, then in fp32; waits S seconds (default 540). Estimated 6 to 9 minutes in all.
#   bash benchmarks/gpu/if_h200.sh compiled DT [S]   detached: the compiled mode in DT (fp16 or fp32), one timed run
#        per plan, into the same report after the jobs before it; six UNet compiles (never measured for IF: ~2 min
#        each if like SDXL's UNet), so 12 to 16 minutes: give it `wait` calls
#   bash benchmarks/gpu/if_h200.sh engines [S]   detached: AOTInductor fp16 packages of both cascades' MegaFusion and
#        direct shapes (6 packages; compile time never measured for IF), then their rows in the same report
#   bash benchmarks/gpu/if_h200.sh wait [S]      more time for what is still running
# Results are packed into $OUT/if-<phase>.tar.gz: if_megafusion.json and .md (every row so far), the job logs.
if [ "$1" = _after ]; then  # _after NAME: returns once every IF job started before job NAME has ended
  for s in /tmp/mfjobs/if-*.started; do
    [ -e "$s" ] && [ "$s" -ot "/tmp/mfjobs/$2.started" ] || continue
    while [ ! -e "${s%.started}.rc" ]; do sleep 10; done
  done
  exit 0
fi
source benchmarks/gpu/env.sh
source benchmarks/gpu/detached.sh
RES=/tmp/mf-if
ENG=/tmp/mf-if-aoti
mkdir -p $RES/report
LAB="python3 benchmarks/lab/if_megafusion.py --model if --device cuda --output $RES/report"
B="python3 -m megafusion.cli.build_engines --model if --random-weights --backend aoti --precision fp16 --device cuda --output $ENG"

pack() {
  cp $JOBS/*.log $RES/ 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader > $RES/gpu.txt
  tar czf "$OUT/if-$1.tar.gz" -C $RES .
}

case "$1" in
  tests)
    python3 -m pytest -q -m gpu tests/runtime/test_pixel_graphs.py tests/engine/test_if_engines.py \
      tests/runtime/test_pixel_gpu.py 2>&1 | tail -n 30 ;;
  bench)
    # `;` not `&&`: a mode that fails leaves the others' rows.
    detach if-bench "$LAB --modes eager,graphs --dtypes fp16; $LAB --modes eager,graphs --dtypes fp32"
    wait_detached "${2:-540}"
    pack bench ;;
  compiled)
    case "$2" in fp16|fp32) ;; *) echo "compiled needs fp16 or fp32, got '$2'"; exit 2 ;; esac
    # After every timed job started before it (one timed job on the GPU at a time).
    detach if-compiled-$2 "bash benchmarks/gpu/if_h200.sh _after if-compiled-$2; $LAB --modes compiled --dtypes $2 --repeats 1"
    wait_detached "${3:-540}"
    pack compiled-$2 ;;
  engines)
    # After every job started before it: the builds run the UNets on the GPU too.
    detach if-engines "bash benchmarks/gpu/if_h200.sh _after if-engines && $B && \
      $B --stages 128x128:100 --stages-2 512x512:50 && $LAB --modes engines --engines $ENG --dtypes fp16"
    wait_detached "${2:-540}"
    pack engines ;;
  wait)
    wait_detached "${2:-540}"
    pack wait ;;
esac
