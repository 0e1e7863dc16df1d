# SD3 / FLUX on the lent GPU machine (issue #17 item 4), from the repository root, one warm machine across calls
# (carry .whl with the diffusers wheel on the first call; the report, the engines and the jobs live in /tmp):
#   bash benchmarks/gpu/dit_h200.sh tests          the flow GPU tests: graphs capture/replay counters against eager
#        (fp32, bf16), compiled mode, AOTI packages inside the captured graphs (tiny models; about 3 to 5 minutes)
#   bash benchmarks/gpu/dit_h200.sh bench M [S]    detached: benchmarks/lab/dit_speed.py --model M (sd3 or flux,
#        random weights, bf16) in eager and graphs, MegaFusion 1024x20 -> 2048x8 against direct 2048x28, and
#        diffusers' own pipeline on the direct plan; waits S seconds (default 540). Estimated: sd3 4 to 6 minutes,
#        flux 6 to 9 (12B transformer: about 1.5 s a 2048 step on an H200, never measured here)
#   bash benchmarks/gpu/dit_h200.sh compiled M [S] detached: the compiled mode (one transformer compile per stage
#        shape and batch, never measured for these models: 1 to 3 minutes each), after the jobs before it
#   bash benchmarks/gpu/dit_h200.sh engines M [S]  detached: AOTInductor bf16 packages of both plans' shapes
#        (mf-build-engines --backend aoti: the 1024 and 2048 shapes, 2 packages; compile time never measured), then the engines rows
#   bash benchmarks/gpu/dit_h200.sh ort            the ONNX Runtime transformer engines' GPU tests on the CUDA EP (tiny
#        models, fp32, against torch); needs onnxruntime-gpu: carry its last .ortgpuK part (the earlier ones through
#        `bash benchmarks/gpu/ort_sdxl.sh part`, one per call), ort_gpu_install.sh installs it; a few minutes
#   bash benchmarks/gpu/dit_h200.sh ort-engines M [S]  detached, after `ort`: mf-build-engines --backend onnxruntime
#        (fp16, the 1024 -> 2048 plan: one dynamic engine), then mf-generate from it (eager: ORT sessions are not
#        captured) and from the torch modules (fp16, graphs), segment times in the logs. Never run: export and
#        session creation of the 2B (sd3) / 12B (flux) transformer not measured
#   bash benchmarks/gpu/dit_h200.sh wait [S]       more time for what is still running
# Results are packed into $OUT/dit-<phase>.tar.gz: dit_speed_<model>_<mode>.json and .md, the job logs.
if [ "$1" = _after ]; then  # _after NAME: returns once every DiT job started before job NAME has ended
  for s in /tmp/mfjobs/dit-*.started; do
    [ -e "$s" ] && [ "$s" -ot "/tmp/mfjobs/$2.started" ] || continue
    while [ ! -e "${s%.started}.rc" ]; do sleep 10; done
  done
  exit 0
fi
source benchmarks/gpu/env.sh
source benchmarks/gpu/detached.sh
RES=/tmp/mf-dit
ENG=/tmp/mf-dit-aoti
mkdir -p $RES/report

lab() {  # lab MODEL MODES [more args]: one report folder per model and modes, so phases do not overwrite
  echo "python3 benchmarks/lab/dit_speed.py --model $1 --modes $2 --device cuda --dtype bf16 --output $RES/report/$1-${2//,/-} ${*:3}"
}

pack() { pack_jobs $RES "$OUT/dit-$1.tar.gz"; }

model() {
  case "$1" in sd3|flux) ;; *) echo "give the model: sd3 or flux, got '$1'"; exit 2 ;; esac
}

case "$1" in
  tests)
    python3 -m pytest -q -m gpu tests/runtime/test_flow_graphs.py tests/runtime/test_flow_gpu.py \
      tests/engine/test_dit_engines.py 2>&1 | tail -n 30 ;;
  bench)
    model "$2"
    detach dit-bench-$2 "bash benchmarks/gpu/dit_h200.sh _after dit-bench-$2; $(lab $2 eager,graphs --diffusers)"
    wait_detached "${3:-540}"
    pack bench-$2 ;;
  compiled)
    model "$2"
    detach dit-compiled-$2 "bash benchmarks/gpu/dit_h200.sh _after dit-compiled-$2; $(lab $2 compiled)"
    wait_detached "${3:-540}"
    pack compiled-$2 ;;
  engines)
    model "$2"
    B="python3 -m megafusion.cli.build_engines --model $2 --random-weights --backend aoti --precision bf16 --device cuda --output $ENG"
    detach dit-engines-$2 "bash benchmarks/gpu/dit_h200.sh _after dit-engines-$2 && $B && \
      $B --stages 2048x2048:28 && $(lab $2 engines --engines $ENG)"
    wait_detached "${3:-540}"
    pack engines-$2 ;;
  ort)
    bash benchmarks/gpu/ort_gpu_install.sh || exit 1  # the CUDA EP, or a message and no tests
    python3 -m pytest -q -m gpu tests/engine/test_dit_onnx_engines.py tests/cli/test_generate_flow.py 2>&1 | tail -n 20 | tee "$OUT/dit-ort-tests.txt" ;;
  ort-engines)
    model "$2"
    bash benchmarks/gpu/ort_gpu_install.sh || exit 1
    E=/tmp/mf-dit-ort
    B="python3 -m megafusion.cli.build_engines --model $2 --random-weights --backend onnxruntime --precision fp16 --device cuda --size 2048x2048 --output $E"
    G="python3 -m megafusion.cli.generate --model $2 --random-weights --prompt 'a red fox' --size 2048x2048 --dtype fp16 --device cuda --no-progress"
    detach dit-ort-$2 "bash benchmarks/gpu/dit_h200.sh _after dit-ort-$2 && $B && \
      $G --engines $E --output $RES/report/ort-$2.png && $G --output $RES/report/torch-$2.png"
    wait_detached "${3:-540}"
    pack ort-$2 ;;
  wait)
    wait_detached "${2:-540}"
    pack wait ;;
  *) echo "usage: bash benchmarks/gpu/dit_h200.sh tests | bench M | compiled M | engines M | ort | ort-engines M | wait [S]"
     exit 2 ;;
esac
