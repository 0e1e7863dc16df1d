# ControlNet on engines (issue #18 item 1) on the lent GPU machine, from the repository root, one warm machine
# (the engines, the ControlNet and the jobs live in /tmp, kept while it stays warm; carry the diffusers wheel):
#   bash benchmarks/gpu/controlnet_h200.sh tests [S]  the ControlNet GPU tests (torch path and aoti capture)
#   bash benchmarks/gpu/controlnet_h200.sh build [S]  saves the benchmark's random SDXL ControlNet, then builds the
#        SDXL 2048 plan's static aoti packages (fp16): the plan's as libmegafusion.sh does, and the ControlNet's and
#        the controlled UNet's, in detached mf-build-engines processes (five; about 100 GB of RAM at once)
#   bash benchmarks/gpu/controlnet_h200.sh bench [S]  benchmarks/lab/controlnet_bench.py: graphs, compiled and aoti
#        (graphed packages), each plain and with the ControlNet; call `wait` if it outlasts the call
#   bash benchmarks/gpu/controlnet_h200.sh wait [S]   more time for builds or a bench that outlasted its call
# S: seconds to wait for the detached jobs (default 540).
source benchmarks/gpu/env.sh
source benchmarks/gpu/detached.sh
ENG=/tmp/mf-aoti-sdxl
CN=/tmp/mf-controlnet-sdxl
COMMON="--model sdxl --random-weights --size 2048x2048 --backend aoti --precision fp16 --vae-precision fp16 --device cuda --output $ENG"

collect() {
  wait_detached "$1"
  cp /tmp/cnbench/controlnet.json /tmp/cnbench/controlnet.md $JOBS/*.log "$OUT"/ 2>/dev/null
}

case "$1" in
  tests)
    python3 -m pytest -q -m gpu tests/runtime/test_controlnet.py tests/engine/test_controlnet_engines.py 2>&1 | tee "$OUT/tests.log" | tail -n 20 ;;
  build)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    [ -e $CN/config.json ] || python3 benchmarks/lab/controlnet_bench.py --model sdxl --save-controlnet $CN
    for nets in unet-standard unet-dilated text_encoder,text_encoder_2,vae_decoder,vae_encoder; do
      detach "aoti-${nets%%,*}" "cd $PWD && python3 -m megafusion.cli.build_engines $COMMON --networks $nets"
    done
    for nets in controlnet-standard,unet_controlled-standard controlnet-dilated,unet_controlled-dilated; do
      detach "cn-${nets%%,*}" "cd $PWD && python3 -m megafusion.cli.build_engines $COMMON --controlnet $CN --networks $nets"
    done
    collect "${2:-540}" ;;
  bench)
    wait_detached "${2:-300}" || exit 1
    detach cnbench "cd $PWD && python3 benchmarks/lab/controlnet_bench.py --model sdxl --size 2048x2048 \
      --modes ${MODES:-aoti,graphs,compiled} --engines $ENG --controlnet-dir $CN --output /tmp/cnbench --repeats 3"
    collect 540 ;;
  wait) collect "${2:-540}" ;;
  *) echo "usage: bash benchmarks/gpu/controlnet_h200.sh tests|build|bench|wait [seconds]"; exit 2 ;;
esac
