# libmegafusion on SD3 / FLUX (issue #17 item 4) on the lent GPU machine, from the repository root (carry .whl with
# the diffusers wheel): builds libmegafusion with CUDA, the tiny-flux and tiny-sd3 AOTInductor folders for a 2-stage
# plan on cuda (transformer, text encoders, VAE), then benchmarks/lab/flow_capi_parity.py on each: the C API's image
# against mf-generate --engines' from the same folder, ids and seed (max difference in levels of 255, wall times),
# and the C API with its CUDA graphs off against on (the json's "graphs": counters, difference, plain wall time).
#   bash benchmarks/gpu/libmegafusion_flow.sh [PRECISION]     (fp32 by default; fp16 or bf16 also build)
# Results under $OUT: cmake.log, build logs, cdriver logs (megafusion_flow_run: the C API with no Python, graphs on
# and off), parity logs, flow_capi_<model>_<precision>_<relay>.json. Compiles take minutes: one call of
# up to 600 s builds; if it runs out, call again (the CMake build dir and engine folders in /tmp are kept warm).
source benchmarks/gpu/env.sh
BUILD=/tmp/mfbuild-flow
PREC=${1:-fp32}
STAGES=128x128:2,160x160:2
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ ! -e $BUILD/cpp/libmegafusion.so ] || [ ! -e $BUILD/cpp/megafusion_flow_run ]; then
  (time (cmake -S . -B $BUILD -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$(command -v python3)" \
    -DCMAKE_CUDA_COMPILER="$NVCC" && cmake --build $BUILD --target megafusion megafusion_flow_run -j 12)) > "$OUT/cmake.log" 2>&1
  tail -n 3 "$OUT/cmake.log"
fi
status=0
for model in tiny-flux tiny-sd3; do
  eng=/tmp/mf-flow-$model-$PREC
  python3 -m megafusion.cli.build_engines --model $model --backend aoti --stages $STAGES --precision $PREC \
    --device cuda --output $eng > "$OUT/build-$model-$PREC.log" 2>&1 || { tail -n 5 "$OUT/build-$model-$PREC.log"; status=1; continue; }
  # The same ids through cpp/tests/flow_run.c first: no Python in its process (a crash there is the library's).
  python3 benchmarks/lab/flow_capi_parity.py --lib x --model $model --engines x --stages x --output "$OUT" \
    --ids-out /tmp/ids-$model.txt
  guidance=$([ $model = tiny-sd3 ] && echo 7 || echo 3.5)
  for relay in pixel latent; do
    for graphs in 1 0; do
      $BUILD/cpp/megafusion_flow_run $eng $model cuda $STAGES 3 $guidance $relay $graphs /tmp/ids-$model.txt \
        /tmp/flow-$model-$relay-$graphs.rgb > "$OUT/cdriver-$model-$relay-g$graphs.log" 2>&1
      echo "megafusion_flow_run $model $relay graphs=$graphs: rc $? $(tail -n 1 "$OUT/cdriver-$model-$relay-g$graphs.log")"
    done
    python3 benchmarks/lab/flow_capi_parity.py --lib $BUILD/cpp/libmegafusion.so --model $model --engines $eng \
      --stages $STAGES --device cuda --relay $relay --dtype $PREC --output "$OUT" > "$OUT/parity-$model-$relay.log" 2>&1 \
      || status=1
    tail -n 1 "$OUT/parity-$model-$relay.log"
  done
done
exit $status
