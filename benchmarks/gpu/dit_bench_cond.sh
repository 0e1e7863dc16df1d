# mf-bench for SD3 / FLUX with the extra conditions (issue #18 item 5) on the lent GPU machine, from the repository
# root (carry the diffusers wheel; the inputs live in /tmp while the machine stays warm):
#   bash benchmarks/gpu/dit_bench_cond.sh sd3 [VARIANTS]   SD3 Medium 2048, random weights, the default plan
#        (1024 x20 -> 2048 x8) and direct 2048 x28; each variant plain and with a real-size random ControlNet
#        (benchmarks/lab/dit_condition_inputs.py: 6 joint blocks, InstantX's shapes), scale 0.7
#   bash benchmarks/gpu/dit_bench_cond.sh tests             the GPU test of mf-bench's DiT rows (tiny-sd3, all variants)
# VARIANTS: default torch,graphs (about 2-3 minutes); torch,graphs,compiled adds the compiles (not measured yet:
# run it as its own call). Results: $OUT/dit-bench-<model>-cn/{results.json,report.md,chart.png} and the log.
source benchmarks/gpu/env.sh
case "$1" in
  sd3|flux)
    M=$1; V=${2:-torch,graphs}; IN=/tmp/mf-dit-cond-$M; RES=$OUT/dit-bench-$M-cn
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    [ -e $IN/controlnet/config.json ] || python3 benchmarks/lab/dit_condition_inputs.py --model $M --size 1024x1024 \
      --device cuda --output $IN
    mkdir -p $RES
    timeout 540 python3 -m megafusion.cli.bench --model $M --random-weights --device cuda --variants $V \
      --repeats 2 --warmup 1 --controlnet $IN/controlnet --control-image $IN/control.png --control-scale 0.7 \
      --output $RES 2>&1 | tee $RES/log.txt ;;
  tests)
    timeout 540 python3 -m pytest -q -m gpu tests/benchmarks/test_bench_dit.py 2>&1 | tee $OUT/dit-bench-tests.log ;;
  *) echo "usage: bash benchmarks/gpu/dit_bench_cond.sh sd3|flux [VARIANTS] | tests"; exit 2 ;;
esac
