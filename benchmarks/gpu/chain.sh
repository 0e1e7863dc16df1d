# One GPU session's runs as one detached chain, one after another (one timed job on the GPU at a time), so that
# they outlive each 10-minute call; from the repository root, one warm machine (carry .whl on the first call):
#   bash benchmarks/gpu/chain.sh start S STEP...   starts the steps in order, waits S seconds, packs what is done
#                                                  (S <= 570 in a 600 s call: `start 590` left the pack no time)
#   bash benchmarks/gpu/chain.sh wait S            more time; packs again (every call packs everything so far)
# A second `start` on the same warm machine, once the first chain has ended, runs its steps; the results of both
# stay in one folder and pack together.
# Steps (each under its own `timeout`, so one that hangs cannot take the others' time; `;` between them, so one
# that fails leaves the rest running):
#   if-tests    DeepFloyd IF GPU tests (#21)            if-bench     IF eager and graphs, fp16 then fp32 (#21)
#   sdxl4096    SDXL 4096 latent and pixel relay, --max-memory 32, 2 timed runs each (#19)
#   sdxl4096-latent  the latent relay alone, as sdxl4096 (the baseline of sdxl4096x in the same session)
#   sdxl4096x   sdxl4096 with PyTorch's expandable segments (PYTORCH_CUDA_ALLOC_CONF), which should keep reserved
#               memory near allocated under the cap (#19, and #15's 16 GiB)
#   sdxl4096-fast  sdxl4096 in --mode fast-graphs (channels_last, fused QKV, cuDNN attention, no compiling) (#19)
#   sdxl4096-compiled  the latent relay in --mode compiled (the warm-up compiles three UNet shapes and the VAE) (#19)
#   sd15-large  SD1.5 2048 and 4096, latent and pixel relay and direct 2048, --mode fast-graphs, --max-memory 32 (#19)
#   sdxl8192    SDXL 8192 latent relay, VAE parked, no warm-up (#19)
#   engines-mem-x  mf-bench engines:aoti alone, expandable segments: peak memory of the packages' path (#15)
#   cond-torch  mf-bench SDXL 2048 graphs and compiled, plain and with a LoRA + ControlNet (#18; the compiles take
#               over 10 minutes)
#   dit-tests   the flow pipeline GPU tests (#17, #18)
#   torch-fast  the fast path's GPU tests alone (fast-graphs on an fp32 model: cuDNN attention's fallback)
#   sdxl-build  SDXL 2048 static aoti packages into /tmp/mf-aoti-sdxl (#15; the next three need them)
#   sdxl-build-cc  sdxl-build, and beside it one fresh compiled process (empty caches) filling /tmp/mf-cc (#15)
#   coldstart   3 fresh mf-generate --engines processes with their phases (#15)
#   coldimport  the plan's memory estimate kept first (--dry-run), then one fresh mf-generate --engines under
#               -X importtime and 3 fresh ones with their phases: every start imports no diffusers (#15)
#   sdxl-build-apart  the UNets again with --weights-apart, in a hard-linked copy of /tmp/mf-aoti-sdxl (#15)
#   coldstart-apart  3 fresh mf-generate processes from that copy (both UNets read one weight file), then the
#               first generation against the second in one process, cuDNN's algorithm search on and off (#15)
#   coldstart-apart-x  3 fresh mf-generate processes from that copy with expandable segments: the whole process's
#               device peak against #15's 16 GiB; then one more in --mode eager (no graph captures)
#   builds-apart  SDXL 2048 static aoti packages, every network --weights-apart, into /tmp/mf-aoti-sdxl-apart (the
#               coldstart-apart steps and capi-apart-sdxl read them), beside SD1.5 1024 static packages into
#               /tmp/mf-aoti-sd15 (one process: RAM for both builds at once)
#   sdxl-apart  the SDXL half of builds-apart alone (7 minutes, once past 8: limit 10)
#   sdpa-sd15   torch's SDPA backends, head dim 40 as is and padded to 64, at SD1.5's top-level attention at 1024,
#               2048 and 4096 (262,144 tokens: 4.1 s of each SD1.5 4096 step, #19)
#   sd15-build  SD1.5 1024 static aoti packages, --jobs 3, into /tmp/mf-aoti-sd15 (sd15-aoti reads them)
#   builds-11   sdxl-apart (which now ends with a warm-up run) beside sd15-build at --jobs 2, niced
#   gpu-tests-11  GPU tests not run before: IP-Adapter engines in the step graph, --weights-apart packages, fast path
#   gpu-tests-13  gpu-tests-11's files, the one-shot graph release, the C API's IP-Adapter image and flow CUDA graphs
#   gpu-tests-15  what gpu-tests-13 failed or did not reach: the IP engines' step graph (its reference now on the
#               engines' weights; the ControlNet engines' test had the same fault), fast-graphs
#               on an fp32 model (cuDNN attention's fallback), the C API's IP-Adapter graphs and flow graphs;
#               the FP8 GPU tests (UNet layers that keep their dtypes, the SD3 transformer in FP8); each file under its
#               own limit (about 28 minutes at most: start it with three waits to follow)
#   kept-apart  compiled-kept's filling process beside sdxl-apart (device time: the two ran 5 and 7 minutes apart), then
#               compiled-kept's two warm processes alone (their device peak is the figure; the fill's peak and both
#               fill and build times are perturbed by running together)
#   gpu-tests-16  gpu-tests-15's files, the FP8 ones first
#   pkg-check   after sdxl-apart: each SDXL 2048 package against its module (relative difference, #15: <= 0.5%), and the
#               graphed packages' image against the torch modules run eagerly (#15: within 2 levels), one process;
#               since the sixteenth session also each 16-bit package and module against float32, the final latents,
#               and the eager image in float32 (how far 16-bit eager itself is from full precision); since the
#               twenty-sixth, eager again with attention off its default kernel (eager's own spread)
#   pkg-image   pkg-check without its network rows (all measured by the eighteenth session): the image check alone, so
#               that `sdxl-apart pkg-image` can finish in one call (two machine releases cut pkg-check off there)
#   sd15-aoti   mf-bench SD1.5 1024 from those packages beside the graphs mode, same run (#15: <= 0.6 s)
#   capi-apart-sdxl  capi-sdxl on /tmp/mf-aoti-sdxl-apart: C++ from the weights-apart packages (#15)
#   compiled-kept  #15's compiled warm start with the compiled functions and Inductor's cache kept in the compile
#               cache (engine/precompiled.py; env.sh's TORCHINDUCTOR_CACHE_DIR dropped, so mf-generate puts Inductor's
#               cache there too): one fresh --mode compiled process from nothing into /tmp/mf-cck, then 2
#   compiled-capped  compiled-kept, then 2 more fresh processes from /tmp/mf-cck with --max-memory 15 (PyTorch's
#               allocator capped at 15 GiB, cuDNN workspaces at 1.5 GiB): #15's whole-process peak <= 16 GiB for the
#               compiled path (16.8 GiB uncapped, 2026-12-03; allocated peak 13.07 GiB, estimate 12.46 GiB)
#   compiled-prof  compiled-kept with one warm run, then two warm processes under cProfile (benchmarks/lab/warm_profile.py),
#               the second with peft hidden from diffusers: where the 37-40 s warm start goes (#15)
#   load-profile  cProfile of building the random SDXL model on the GPU (the compiled path's model-load phase)
#   coldstart-compiled  2 fresh mf-generate --mode compiled processes from /tmp/mf-cc, empty Inductor caches (#15)
#   compiled-warm  one fresh --mode compiled process with every cache empty fills /tmp/mf-cc, then 2 fresh ones
#               from it with empty Inductor/Triton caches; each prints where torch.compile's time went (#15)
#   lora-swap   a random LoRA swapped into those packages: time and image against torch (#18)
#   engines-bench  mf-bench engines:aoti beside the compiled path, same run (#15)
#   sd15-engines  SD1.5 1024 static aoti packages built, then mf-bench engines:aoti beside compiled (#15: <= 0.6 s)
#   lora-fused  packages built from the LoRA-fused weights into the same folder, compared with the swapped ones (#18);
#               without sdxl-build before it, the base and fused packages build side by side (about 10 minutes)
#   fp8         FP8 UNet accuracy per stage and graphs-mode speed against fp16 (#20)
#   fp8-compiled  the compiled path with fp16 and with FP8 UNet projections, same run (#20's compiled row)
#   fp8-static  SDXL 2048: FP8 with static activation scales (calibrated eagerly on another prompt) against fp16,
#               eps per stage, then both compiled in the same run (#20: <= 2.5 s, <= 5%)
#   fp8-bench-static  mf-bench SDXL 2048: compiled (fp16) and compiled-fp8-static (FP8, static input scales calibrated
#               at the plan's stage shapes and kept in the compile cache) in the same run (#20: <= 2.5 s)
#   fp8-gemm-modes  SDXL's FP8 GEMM shapes per step as bf16, FP8 row-wise (today's) and FP8 per-tensor (cuBLASLt,
#               fp16 out): what per-tensor weight scales would be worth before building them (#20; about a minute)
#   gpu-tests-21  #18's GPU tests never passed on a GPU: the ControlNet engines (UNet and SD3/FLUX packages) in the step
#               graph, the C API's ControlNet and IP-Adapter graphs, the flow C API's graphs and ControlNet (#17)
#   gpu-tests-22  what gpu-tests-21 left (the flow C API's graphs on tiny-sd3 and its ControlNet on CUDA, #17 and #18),
#               the compiled UNet under a ControlNet (tiny-sd15, tiny-sdxl: #18),
#               then gpu-tests-20's files (#20), each under its own limit
#   gpu-tests-23  what gpu-tests-22 left (the flow C API's ControlNet on CUDA, alone: at 420 s after the flow graphs it
#               had not ended), then the compiled ControlNets' GPU tests (UNet and flow families: the ControlNet
#               compiled at its own call site since e981fc4 / 92d9363) and the SD3 IP-Adapter's (never run), each
#               under its own limit
#   gpu-tests-24  the flow C API's CUDA graphs test, now also the progress callback on replays (mf_inputs_set_progress:
#               the stream synchronized per step, a stop at step 2), tiny-flux and tiny-sd3 (ran past its 420 s on
#               2026-12-05: tiny-flux passed, tiny-sd3 still running)
#   gpu-tests-25  two tiny GPU tests not run since their fixes (the batched fp16 step against alone, bound widened to
#               the H200's 7 levels; IF's CUDA fp32 against CPU on one model's weights), then gpu-tests-24's tiny-sd3
#               case alone, 560 s, with each phase's duration
#   cond-compiled  mf-bench SDXL 2048 graphs and compiled, plain and with one random full-size ControlNet, same run,
#               no direct rows (#18: "runs graphed and compiled, its cost and time against the plain plan")
#   gpu-tests-20  the GPU tests of static FP8 scales: mf-generate --mode compiled calibrates, then loads them (#20)
#   fp8-compiled-sd15  the same for SD1.5 1024 (#20: <= 0.45 s), with its accuracy per stage against fp16 (run on
#               bd7bad4, whose default policy still put proj_in and proj_out in FP8: 7.1%, 1.054x slower)
#   fp8-engines  SDXL 2048 static aoti packages with FP8 UNet projections (--precision fp8 --weights-apart) into
#               /tmp/mf-aoti-sdxl-fp8, a hard-linked copy of sdxl-apart's /tmp/mf-aoti-sdxl-apart where that exists (its
#               fp16 text encoders and bf16 VAE are the fp8 build's: only the UNets compile), then the FP8 GPU test of
#               a tiny package and mf-bench engines:aoti-fp8, beside engines:aoti's fp16 packages in the same run when
#               the copy holds them (#20 item 1)
#   fp8-engines-static  after fp8-engines: the SDXL 2048 FP8 UNets again with static input scales (--fp8-scales
#               static, calibrated per stage shape) into the same folder, their GPU test, then mf-bench of the fp16,
#               per-token FP8 and static FP8 packages in one run (#20)
#   dit-bench-sd3  SD3 eager and graphs with diffusers' direct run (#17)
#   dit-compiled-sd3  SD3 eager against compiled, same plans (#17: the 1.7x target)
#   dit-engines-sd3  SD3 2048's transformer as static aoti packages (bf16, the default plan's 1024 and 2048 shapes,
#               CFG batch) into /tmp/mf-dit-sd3, then mf-bench graphs beside engines:aoti, each with its direct row on
#               the same networks (#17: ">= 2.0x over direct on the same engine", from built engines; about 10 min)
#   dit-fp8-sd3 SD3 eager, compiled and compiled with FP8 projections (engine/fp8_dit.py), same plans (#17, #20)
#   dit-bench-flux    FLUX eager and compiled, MegaFusion against direct (#17; graphs left out: they gained
#               nothing on SD3's GPU-bound transformer, and FLUX's direct 2048 takes about half a minute a run:
#               11,756 true TFLOP against MegaFusion's 4,918, mf-bench --cost-only); limit 840 s, since
#               compiling two shapes of a 12B transformer follows the eager runs (written after each mode)
#   dit-compile-cache  the GPU test of the flow transformer's kept compiled functions, then 2 fresh mf-generate --model
#               sd3 --mode compiled processes on one compile cache (the first fills it, the second should trace nothing)
#   vae-spread  the SDXL VAE decoder (alone, random weights) at 1024 and 2048 in float32, bf16, bf16 channels_last,
#               fp16 and bf16 through torch.compile, against float32 with TF32 off: how far two bf16 decoders are
#               apart, next to #15's 0.5% (package against module) and 2 levels (image against eager); 2 to 4 minutes
#   sd3ip       the SD3 IP-Adapter tests (GPU included) and its per-step cost at SD3 Medium's width (#18)
#   dit-cn-engines  the SD3/FLUX ControlNet engines' GPU test, then SD3 with a real-size ControlNet from packages (#18)
#   capi-sdxl   libmegafusion built with CUDA, then C++ graphed, C++ without graphs and Python graphed on the static
#               SDXL packages of sdxl-build (or lora-fused): #15's "within 3% of Python"
#   dit-bench-cn  mf-bench SD3 2048 torch and graphs, plain and with a real-size random ControlNet; then the GPU
#               test of mf-bench's DiT rows (#18 item 5)
#   serve-flow  the GPU test of mf-serve's SD3 / FLUX replica (graphs, bf16, ControlNet per request) (#17, #18)
#   loader-gpu  the GPU tests of the direct package loader and of --weights-apart packages (a minute; run it first:
#               every engines step after it opens packages through that loader)
#   capi-apart  the GPU test of libmegafusion on --weights-apart tiny-sd15 UNets (CUDA graphs on) (#15)
#   capi-flow   libmegafusion with CUDA on tiny-flux / tiny-sd3 packages against Python, both relays (#17)
# A machine can be released between two calls (2026-12-02: `wait` found a fresh one and the builds were lost):
# a call's steps should not need an earlier call's files unless losing them costs little.
# Results: $OUT/chain.tar.gz (each step's log, JSON and markdown; the GPU and the commit).
source benchmarks/gpu/env.sh
source benchmarks/gpu/detached.sh
RES=/tmp/mf-chain
mkdir -p $RES

# One pytest -m gpu run per "LIMIT FILES..." argument, each under its own limit (one limit for all, gpu-tests-13's,
# left its last files unrun); the step fails if any run failed.
limited() {
  printf 'rc=0; '
  for t in "$@"; do
    printf 'echo "-- %s"; timeout %s python3 -u -m pytest -v -m gpu --durations 0 %s -p no:cacheprovider || rc=1; ' \
      "${t#* }" "${t%% *}" "${t#* }"
  done
  echo '(exit $rc)'
}

step() {  # the command line of one step
  case "$1" in
    if-tests) echo "timeout 420 python3 -m pytest -q -m gpu tests/runtime/test_pixel_graphs.py tests/engine/test_if_engines.py \
      tests/runtime/test_pixel_gpu.py" ;;
    if-bench) echo "timeout 600 python3 benchmarks/lab/if_megafusion.py --model if --device cuda --output $RES/if \
      --modes eager,graphs --dtypes fp16; timeout 420 python3 benchmarks/lab/if_megafusion.py --model if --device cuda \
      --output $RES/if --modes eager,graphs --dtypes fp32" ;;
    sdxl4096) echo "timeout 420 python3 benchmarks/lab/large_sizes.py --repeats 2 --model sdxl --size 4096x4096 \
      --runs latent,pixel --max-memory 32 --output $RES/sdxl4096" ;;
    sdxl4096-latent) echo "timeout 420 python3 benchmarks/lab/large_sizes.py --repeats 2 --model sdxl --size 4096x4096 \
      --runs latent --max-memory 32 --output $RES/sdxl4096-latent" ;;
    sdxl4096x) echo "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 420 python3 benchmarks/lab/large_sizes.py \
      --repeats 2 --model sdxl --size 4096x4096 --runs latent,pixel --max-memory 32 --output $RES/sdxl4096x" ;;
    engines-mem-x) echo "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 600 python3 -m megafusion.cli.bench \
      --model sdxl --random-weights --device cuda --size 2048x2048 --variants engines:aoti --direct-for none \
      --engine-dir /tmp/mf-aoti-sdxl --repeats 3 --warmup 1 --output $RES/engines-mem-x" ;;
    sdxl4096-fast) echo "timeout 420 python3 benchmarks/lab/large_sizes.py --repeats 2 --model sdxl --size 4096x4096 \
      --mode fast-graphs --runs latent,pixel --max-memory 32 --output $RES/sdxl4096-fast" ;;
    sdxl4096-compiled) echo "timeout 900 python3 benchmarks/lab/large_sizes.py --repeats 2 --model sdxl --size 4096x4096 \
      --mode compiled --runs latent --max-memory 32 --output $RES/sdxl4096-compiled" ;;
    sd15-large) echo "timeout 300 python3 benchmarks/lab/large_sizes.py --repeats 2 --model sd15 --size 2048x2048 \
      --mode fast-graphs --runs latent,pixel,direct --max-memory 32 --output $RES/sd15-2048; timeout 420 python3 \
      benchmarks/lab/large_sizes.py --repeats 2 --model sd15 --size 4096x4096 --mode fast-graphs --runs latent,pixel \
      --max-memory 32 --output $RES/sd15-4096" ;;
    sdxl8192) echo "timeout 600 python3 benchmarks/lab/large_sizes.py --repeats 1 --warmup 0 --model sdxl \
      --size 8192x8192 --runs latent --max-memory 64 --output $RES/sdxl8192" ;;
    cond-torch) echo "timeout 1500 bash -c 'python3 benchmarks/lab/condition_inputs.py --model sdxl --rank 16 \
      --size 1024x1024 --output /tmp/mf-cond-inputs && python3 benchmarks/lab/controlnet_bench.py --model sdxl \
      --save-controlnet /tmp/mf-controlnet-sdxl && python3 -m megafusion.cli.bench --model sdxl --random-weights \
      --size 2048x2048 --device cuda --repeats 3 --variants graphs,compiled --lora /tmp/mf-cond-inputs/lora.safetensors:0.8 \
      --controlnet /tmp/mf-controlnet-sdxl --control-image /tmp/mf-cond-inputs/control.png --output $RES/cond-torch'" ;;
    torch-fast) echo "timeout 240 python3 -m pytest -q -m gpu tests/engine/test_torch_fast.py -p no:cacheprovider" ;;
    dit-tests) echo "timeout 420 python3 -m pytest -q -m gpu tests/runtime/test_flow_graphs.py \
      tests/runtime/test_flow_controlnet.py tests/runtime/test_flow_ipadapter.py tests/runtime/test_flow_img2img.py" ;;
    sdxl-build) echo "timeout 1500 python3 -m megafusion.cli.build_engines --model sdxl --random-weights --backend aoti \
      --precision fp16 --device cuda --size 2048x2048 --output /tmp/mf-aoti-sdxl --jobs 3" ;;
    sdxl-build-cc) echo "$(step sdxl-build | sed 's/timeout 1500/timeout 900/') & timeout 900 python3 \
      benchmarks/lab/cold_start_phases.py --runs 1 --fresh-inductor-cache --device cuda --output $RES/cold-compiled-empty \
      -- --model sdxl --random-weights --size 2048x2048 --prompt 'a lighthouse' --mode compiled --compile-cache /tmp/mf-cc; \
      wait" ;;
    sdxl-build-apart) echo "rm -rf /tmp/mf-aoti-sdxl-apart && cp -al /tmp/mf-aoti-sdxl /tmp/mf-aoti-sdxl-apart && \
      timeout 1200 python3 -m megafusion.cli.build_engines --model sdxl --random-weights --backend aoti --precision fp16 \
      --device cuda --size 2048x2048 --output /tmp/mf-aoti-sdxl-apart --networks unet --weights-apart --jobs 2; \
      timeout 600 python3 -m pytest -q -m gpu tests/engine/test_aoti_weights_apart.py" ;;
    coldstart-apart) echo "timeout 600 python3 benchmarks/lab/cold_start_phases.py --engines /tmp/mf-aoti-sdxl-apart \
      --runs 3 --device cuda --output $RES/cold-apart -- --model sdxl --random-weights --size 2048x2048 \
      --prompt 'a lighthouse'; for b in on off; do timeout 300 python3 benchmarks/lab/first_image.py \
      --engines /tmp/mf-aoti-sdxl-apart --cudnn-benchmark \$b --output $RES/first-image-\$b -- --model sdxl \
      --random-weights --size 2048x2048; done" ;;
    builds-apart) echo "timeout 1200 python3 -m megafusion.cli.build_engines --model sdxl --random-weights --backend aoti \
      --precision fp16 --device cuda --size 2048x2048 --output /tmp/mf-aoti-sdxl-apart --weights-apart --jobs 3 & \
      timeout 1200 python3 -m megafusion.cli.build_engines --model sd15 --random-weights --backend aoti --precision fp16 \
      --device cuda --size 1024x1024 --output /tmp/mf-aoti-sd15 --jobs 1; wait" ;;
    sdxl-apart) echo "timeout 600 python3 -m megafusion.cli.build_engines --model sdxl --random-weights --backend aoti \
      --precision fp16 --device cuda --size 2048x2048 --output /tmp/mf-aoti-sdxl-apart --weights-apart --jobs 3" ;;
    sdpa-sd15) echo "timeout 300 python3 benchmarks/lab/sdpa_backends.py --shapes sd15-1024-l1,sd15-2048-l1,sd15-4096-l1 \
      --output $RES/sdpa-sd15" ;;
    sd15-build) echo "timeout 600 python3 -m megafusion.cli.build_engines --model sd15 --random-weights --backend aoti \
      --precision fp16 --device cuda --size 1024x1024 --output /tmp/mf-aoti-sd15 --jobs 3" ;;
    builds-11) echo "timeout 480 python3 -m megafusion.cli.build_engines --model sdxl --random-weights --backend aoti \
      --precision fp16 --device cuda --size 2048x2048 --output /tmp/mf-aoti-sdxl-apart --weights-apart --jobs 3 & \
      nice -n 10 timeout 480 python3 -m megafusion.cli.build_engines --model sd15 --random-weights --backend aoti \
      --precision fp16 --device cuda --size 1024x1024 --output /tmp/mf-aoti-sd15 --jobs 2; wait" ;;
    gpu-tests-11) echo "timeout 400 python3 -m pytest -q -m gpu tests/engine/test_ipadapter_engines.py \
      tests/engine/test_aoti_weights_apart.py tests/engine/test_torch_fast.py -p no:cacheprovider" ;;
    gpu-tests-13) echo "timeout 560 python3 -m pytest -q -m gpu tests/runtime/test_graphs.py tests/engine/test_precompiled.py \
      tests/engine/test_ipadapter_engines.py tests/engine/test_aoti_weights_apart.py tests/engine/test_torch_fast.py \
      tests/cpp/test_libmegafusion_graphs_ip.py tests/cpp/test_libmegafusion_flow_graphs.py -p no:cacheprovider" ;;
    gpu-tests-15) limited "240 tests/engine/test_torch_fast.py" "600 tests/engine/test_ipadapter_engines.py tests/engine/test_controlnet_engines.py" \
        "420 tests/cpp/test_libmegafusion_graphs_ip.py" "360 tests/cpp/test_libmegafusion_flow_graphs.py" \
        "300 tests/engine/test_fp8.py tests/engine/test_fp8_dit.py" ;;
    kept-apart) echo "rm -rf /tmp/mf-cck; { (unset TORCHINDUCTOR_CACHE_DIR; timeout 480 python3 \
      benchmarks/lab/cold_start_phases.py --runs 1 --device cuda --output $RES/cold-kept-empty -- --model sdxl \
      --random-weights --size 2048x2048 --prompt 'a lighthouse' --mode compiled --compile-cache /tmp/mf-cck) \
      > $RES/kept-fill.log 2>&1 & }; $(step sdxl-apart); wait; du -sh /tmp/mf-cck/*; (unset TORCHINDUCTOR_CACHE_DIR; \
      timeout 300 python3 benchmarks/lab/cold_start_phases.py --runs 2 --device cuda --output $RES/cold-kept -- \
      --model sdxl --random-weights --size 2048x2048 --prompt 'a lighthouse' --mode compiled --compile-cache /tmp/mf-cck)" ;;
    gpu-tests-16) limited "300 tests/engine/test_fp8.py tests/engine/test_fp8_dit.py" \
        "600 tests/engine/test_ipadapter_engines.py tests/engine/test_controlnet_engines.py" \
        "240 tests/engine/test_torch_fast.py" "420 tests/cpp/test_libmegafusion_graphs_ip.py" \
        "360 tests/cpp/test_libmegafusion_flow_graphs.py" ;;
    pkg-check) echo "timeout 600 python3 benchmarks/lab/cpp_vs_python.py --model sdxl --engines /tmp/mf-aoti-sdxl-apart \
      --size 2048x2048 --modes networks,python-aoti-graphs,python-eager,python-eager-alt-attention,python-eager-fp32 --repeats 1 \
      --output $RES/pkg-check" ;;
    pkg-image) echo "$(step pkg-check | sed -e 's/--modes networks,/--modes /' -e 's#/pkg-check#/pkg-image#')" ;;
    sd15-aoti) echo "timeout 600 python3 -m megafusion.cli.bench --model sd15 --random-weights --device cuda \
      --size 1024x1024 --variants engines:aoti,graphs --direct-for none --engine-dir /tmp/mf-aoti-sd15 --repeats 5 \
      --warmup 1 --output $RES/engines-sd15" ;;
    capi-apart-sdxl) echo "$(step capi-sdxl | sed -e 's#/tmp/mf-aoti-sdxl #/tmp/mf-aoti-sdxl-apart #' \
      -e 's#/capi-sdxl --repeats#/capi-apart-sdxl --repeats#')" ;;
    coldstart-apart-x) echo "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 600 python3 \
      benchmarks/lab/cold_start_phases.py --engines /tmp/mf-aoti-sdxl-apart --runs 3 --device cuda --output $RES/cold-apart-x \
      -- --model sdxl --random-weights --size 2048x2048 --prompt 'a lighthouse'; \
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 300 python3 benchmarks/lab/cold_start_phases.py \
      --engines /tmp/mf-aoti-sdxl-apart --runs 1 --device cuda --output $RES/cold-apart-x-eager -- --model sdxl \
      --random-weights --size 2048x2048 --prompt 'a lighthouse' --mode eager" ;;
    compiled-warm) echo "timeout 420 python3 benchmarks/lab/cold_start_phases.py --runs 1 --fresh-inductor-cache \
      --device cuda --output $RES/cold-compiled-empty -- --model sdxl --random-weights --size 2048x2048 \
      --prompt 'a lighthouse' --mode compiled --compile-cache /tmp/mf-cc; $(step coldstart-compiled)" ;;
    compiled-kept) echo "rm -rf /tmp/mf-cck; (unset TORCHINDUCTOR_CACHE_DIR; timeout 480 python3 \
      benchmarks/lab/cold_start_phases.py --runs 1 --device cuda --output $RES/cold-kept-empty -- --model sdxl \
      --random-weights --size 2048x2048 --prompt 'a lighthouse' --mode compiled --compile-cache /tmp/mf-cck; \
      du -sh /tmp/mf-cck/*; timeout 300 python3 benchmarks/lab/cold_start_phases.py --runs 2 --device cuda \
      --output $RES/cold-kept -- --model sdxl --random-weights --size 2048x2048 --prompt 'a lighthouse' --mode compiled \
      --compile-cache /tmp/mf-cck)" ;;
    compiled-capped) echo "$(step compiled-kept | sed -e 's/)$//'); timeout 300 python3 benchmarks/lab/cold_start_phases.py \
      --runs 2 --device cuda --output $RES/cold-capped -- --model sdxl --random-weights --size 2048x2048 \
      --prompt 'a lighthouse' --mode compiled --compile-cache /tmp/mf-cck --max-memory 15)" ;;
    compiled-prof) echo "$(step compiled-kept | sed -e 's/--runs 2/--runs 1/' -e 's/)$//'); \
      A='--model sdxl --random-weights --size 2048x2048 --prompt a-lighthouse --mode compiled --compile-cache /tmp/mf-cck \
      --device cuda --no-progress --output /tmp/prof.png'; timeout 200 python3 benchmarks/lab/warm_profile.py \
      --output $RES/warm-prof -- \$A; timeout 200 python3 benchmarks/lab/warm_profile.py --hide-peft --name no-peft \
      --output $RES/warm-prof -- \$A)" ;;
    load-profile) echo "timeout 120 python3 benchmarks/lab/load_profile.py --model sdxl --device cuda" ;;
    coldstart-compiled) echo "timeout 600 python3 benchmarks/lab/cold_start_phases.py --runs 2 --fresh-inductor-cache \
      --device cuda --output $RES/cold-compiled -- --model sdxl --random-weights --size 2048x2048 --prompt 'a lighthouse' \
      --mode compiled --compile-cache /tmp/mf-cc" ;;
    coldstart) echo "timeout 600 python3 benchmarks/lab/cold_start_phases.py --engines /tmp/mf-aoti-sdxl --runs 3 \
      --device cuda --output $RES/cold -- --model sdxl --random-weights --size 2048x2048 --prompt 'a lighthouse'" ;;
    coldimport) echo "timeout 300 python3 -m megafusion.cli.generate --model sdxl --random-weights --device cuda \
      --engines /tmp/mf-aoti-sdxl --size 2048x2048 --prompt 'a lighthouse' --dry-run; timeout 300 python3 -X importtime \
      -m megafusion.cli.generate --model sdxl --random-weights --device cuda --engines /tmp/mf-aoti-sdxl --size 2048x2048 \
      --prompt 'a lighthouse' --no-progress --output $RES/coldimport.png 2> $RES/coldimport-importtime.txt; timeout 600 \
      python3 benchmarks/lab/cold_start_phases.py --engines /tmp/mf-aoti-sdxl --runs 3 --device cuda \
      --output $RES/cold-light -- --model sdxl --random-weights --size 2048x2048 --prompt 'a lighthouse'" ;;
    lora-swap) echo "timeout 600 python3 benchmarks/lab/lora_swap.py --model sdxl --device cuda \
      --engine-dir /tmp/mf-aoti-sdxl --no-build --output $RES/lora-swap" ;;
    engines-bench) echo "timeout 900 python3 -m megafusion.cli.bench --model sdxl --random-weights --device cuda \
      --size 2048x2048 --variants engines:aoti,compiled --direct-for none --engine-dir /tmp/mf-aoti-sdxl --compile-cache /tmp/mf-cc \
      --repeats 3 --warmup 1 --output $RES/engines-sdxl" ;;
    sd15-engines) echo "timeout 900 python3 -m megafusion.cli.build_engines --model sd15 --random-weights --backend aoti \
      --precision fp16 --device cuda --size 1024x1024 --output /tmp/mf-aoti-sd15 --jobs 3 && timeout 900 python3 -m \
      megafusion.cli.bench --model sd15 --random-weights --device cuda --size 1024x1024 --variants engines:aoti,compiled \
      --direct-for none --engine-dir /tmp/mf-aoti-sd15 --repeats 5 --warmup 1 --output $RES/engines-sd15" ;;
    lora-fused) echo "timeout 1500 python3 benchmarks/lab/lora_swap.py --model sdxl --device cuda \
      --engine-dir /tmp/mf-aoti-sdxl --fused-engine-dir /tmp/mf-aoti-sdxl --output $RES/lora-fused" ;;
    fp8) echo "timeout 600 python3 benchmarks/lab/fp8_unet.py --model sdxl --parts accuracy,graphs --output $RES/fp8" ;;
    fp8-compiled) echo "timeout 600 python3 benchmarks/lab/fp8_unet.py --model sdxl --parts compiled --budget-s 540 \
      --output $RES/fp8-compiled" ;;
    fp8-static) echo "timeout 600 python3 benchmarks/lab/fp8_unet.py --model sdxl --parts accuracy,compiled \
      --compiled fp8s,fp16 --timesteps 999,201 --budget-s 560 --compile-reserve-s 200 --output $RES/fp8-static" ;;
    fp8-bench-static) echo "timeout 1000 python3 -m megafusion.cli.bench --model sdxl --random-weights --device cuda \
      --size 2048x2048 --variants compiled,compiled-fp8-static --direct-for none --compile-cache /tmp/mf-ccf \
      --repeats 3 --warmup 1 --output $RES/fp8-bench-static" ;;
    fp8-gemm-modes) echo "timeout 300 python3 benchmarks/lab/fp8_gemm_modes.py --model sdxl --device cuda \
      --output $RES/fp8-gemm-modes" ;;
    gpu-tests-21) limited "420 tests/engine/test_controlnet_engines.py tests/engine/test_dit_controlnet_engines.py" \
        "600 tests/cpp/test_libmegafusion_graphs_control.py tests/cpp/test_libmegafusion_graphs_ip.py tests/cpp/test_libmegafusion_flow_graphs.py tests/cpp/test_libmegafusion_flow_control.py" ;;
    gpu-tests-22) limited "420 tests/cpp/test_libmegafusion_flow_graphs.py tests/cpp/test_libmegafusion_flow_control.py" \
        "420 tests/runtime/test_controlnet.py" \
        "420 tests/cli/test_generate_fp8_static.py tests/engine/test_aoti_fp8_static.py tests/engine/test_fp8_static.py" ;;
    gpu-tests-23) limited "560 tests/cpp/test_libmegafusion_flow_control.py" \
        "420 tests/runtime/test_controlnet.py tests/runtime/test_flow_controlnet.py tests/runtime/test_flow_ipadapter_sd3.py" ;;
    gpu-tests-24) echo "timeout 420 python3 -u -m pytest -v -m gpu tests/cpp/test_libmegafusion_flow_graphs.py \
      -p no:cacheprovider --durations 0" ;;
    gpu-tests-25) limited "180 tests/runtime/test_batch.py tests/runtime/test_pixel_gpu.py" \
        "560 tests/cpp/test_libmegafusion_flow_graphs.py -k tiny-sd3" ;;
    cond-compiled) echo "timeout 1100 bash -c 'python3 benchmarks/lab/condition_inputs.py --model sdxl --rank 16 \
      --size 1024x1024 --output /tmp/mf-cond-inputs && python3 benchmarks/lab/controlnet_bench.py --model sdxl \
      --save-controlnet /tmp/mf-controlnet-sdxl && python3 -m megafusion.cli.bench --model sdxl --random-weights \
      --size 2048x2048 --device cuda --repeats 3 --variants graphs,compiled --direct-for none \
      --controlnet /tmp/mf-controlnet-sdxl --control-image /tmp/mf-cond-inputs/control.png --output $RES/cond-compiled'" ;;
    gpu-tests-20) echo "timeout 420 python3 -m pytest -q -m gpu tests/cli/test_generate_fp8_static.py tests/engine/test_aoti_fp8_static.py \
      tests/engine/test_fp8_static.py -p no:cacheprovider" ;;
    fp8-compiled-sd15) echo "timeout 600 python3 benchmarks/lab/fp8_unet.py --model sd15 --parts accuracy,compiled \
      --budget-s 540 --output $RES/fp8-compiled-sd15" ;;
    fp8-engines) echo "rm -rf /tmp/mf-aoti-sdxl-fp8; V=engines:aoti-fp8; if [ -f /tmp/mf-aoti-sdxl-apart/manifest.json ]; \
      then cp -al /tmp/mf-aoti-sdxl-apart /tmp/mf-aoti-sdxl-fp8 && V=engines:aoti,engines:aoti-fp8; fi; \
      timeout 480 python3 -m megafusion.cli.build_engines --model sdxl --random-weights --backend aoti --precision fp8 \
      --device cuda --size 2048x2048 --output /tmp/mf-aoti-sdxl-fp8 --weights-apart --jobs 3; \
      timeout 300 python3 -m pytest -q -m gpu tests/engine/test_aoti_fp8.py -p no:cacheprovider; \
      timeout 900 python3 -m megafusion.cli.bench --model sdxl --random-weights --device cuda --size 2048x2048 \
      --variants \$V --direct-for none --engine-dir /tmp/mf-aoti-sdxl-fp8 --repeats 3 --warmup 1 --output $RES/fp8-engines" ;;
    fp8-engines-static) echo "timeout 600 python3 -m megafusion.cli.build_engines --model sdxl --random-weights \
      --backend aoti --precision fp8 --fp8-scales static --device cuda --size 2048x2048 --output /tmp/mf-aoti-sdxl-fp8 \
      --weights-apart --jobs 2 --networks unet; timeout 300 python3 -m pytest -q -m gpu tests/engine/test_aoti_fp8_static.py \
      -p no:cacheprovider; V=engines:aoti-fp8,engines:aoti-fp8-static; [ -f /tmp/mf-aoti-sdxl-apart/manifest.json ] && \
      V=engines:aoti,\$V; timeout 900 python3 -m megafusion.cli.bench --model sdxl --random-weights --device cuda \
      --size 2048x2048 --variants \$V --direct-for none --engine-dir /tmp/mf-aoti-sdxl-fp8 --repeats 3 --warmup 1 \
      --output $RES/fp8-engines-static" ;;
    dit-bench-sd3) echo "timeout 600 python3 benchmarks/lab/dit_speed.py --model sd3 --modes eager,graphs --diffusers \
      --device cuda --dtype bf16 --output $RES/dit-sd3" ;;
    dit-compiled-sd3) echo "timeout 600 python3 benchmarks/lab/dit_speed.py --model sd3 --modes eager,compiled \
      --device cuda --dtype bf16 --output $RES/dit-sd3-compiled" ;;
    dit-engines-sd3) echo "timeout 1100 bash -c 'python3 -m megafusion.cli.build_engines --model sd3 --random-weights \
      --backend aoti --precision bf16 --size 2048x2048 --device cuda --networks transformer --output /tmp/mf-dit-sd3 && \
      python3 -m megafusion.cli.bench --model sd3 --random-weights --size 2048x2048 --device cuda --repeats 3 \
      --variants graphs,engines:aoti --engine-dir /tmp/mf-dit-sd3 --direct-for graphs,engines:aoti \
      --output $RES/dit-engines-sd3'" ;;
    dit-fp8-sd3) echo "timeout 900 python3 benchmarks/lab/dit_speed.py --model sd3 --modes eager,compiled,compiled-fp8 \
      --output $RES/dit-fp8-sd3" ;;
    dit-bench-flux) echo "timeout 840 python3 benchmarks/lab/dit_speed.py --model flux --modes eager,compiled \
      --device cuda --dtype bf16 --output $RES/dit-flux" ;;
    dit-compile-cache) echo "timeout 300 python3 -m pytest -q -m gpu tests/engine/test_flow_networks.py -p no:cacheprovider; \
      rm -rf /tmp/mf-ccd; TIMEFORMAT='process %R s'; for i in 1 2; do time timeout 420 python3 -m megafusion.cli.generate \
      --model sd3 --random-weights --size 2048x2048 --prompt 'a lighthouse' --mode compiled --compile-cache /tmp/mf-ccd \
      --device cuda --no-progress --output /tmp/mf-ccd-\$i.png; done" ;;
    vae-spread) echo "timeout 420 python3 benchmarks/lab/vae_bf16_spread.py --model sdxl --latent 128,256 --device cuda \
      --reference fp32 --variants bf16,bf16-cl,fp16,bf16-compiled --output $RES/vae-spread" ;;
    sd3ip) echo "timeout 600 python3 -m pytest -q tests/runtime/test_flow_ipadapter_sd3.py; timeout 540 python3 \
      benchmarks/lab/dit_ipadapter_bench.py --model sd3 --output $RES/sd3ip --steps 6,3 --repeats 2" ;;
    dit-cn-engines) echo "timeout 420 python3 -m pytest -q -m gpu tests/engine/test_dit_controlnet_engines.py; \
      timeout 900 python3 benchmarks/lab/dit_controlnet_engines_bench.py --model sd3 --engines /tmp/mf-dit-cn \
      --output $RES/dit-cn-engines --build --steps 6,3" ;;
    capi-sdxl) echo "timeout 600 bash -c 'cmake -S . -B /tmp/mfbuild -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
      -DPython3_EXECUTABLE=\$(command -v python3) -DCMAKE_CUDA_COMPILER=\$(command -v nvcc || echo /usr/local/cuda/bin/nvcc) \
      && cmake --build /tmp/mfbuild --target mf-generate-cpp -j 12' && timeout 900 python3 benchmarks/lab/cpp_vs_python.py \
      --model sdxl --engines /tmp/mf-aoti-sdxl --size 2048x2048 --cpp-bin /tmp/mfbuild/cpp/mf-generate-cpp \
      --output $RES/capi-sdxl --repeats 3 --modes cpp,cpp-no-graphs,python-aoti-graphs" ;;
    dit-bench-cn) echo "OUT=$RES bash benchmarks/gpu/dit_bench_cond.sh sd3; OUT=$RES bash benchmarks/gpu/dit_bench_cond.sh tests" ;;
    serve-flow) echo "timeout 600 python3 -m pytest -q -m gpu tests/serve/test_flow_gpu.py -p no:cacheprovider" ;;
    loader-gpu) echo "timeout 420 python3 -m pytest -q -m gpu tests/engine/test_aoti_loader.py \
      tests/engine/test_aoti_weights_apart.py -p no:cacheprovider" ;;
    capi-apart) echo "timeout 600 python3 -m pytest -q -m gpu tests/cpp/test_libmegafusion_apart.py -p no:cacheprovider" ;;
    capi-flow) echo "mkdir -p $RES/capi-flow; OUT=$RES/capi-flow timeout 900 bash benchmarks/gpu/libmegafusion_flow.sh fp32" ;;
    *) echo "false unknown-step-$1" ;;
  esac
}

case "$1" in
  start)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c 'import os, sys, torch; print("bytecode: prefix", sys.pycache_prefix, "dont_write", sys.flags.dont_write_bytecode, "torch folder writable", os.access(os.path.dirname(torch.__file__), os.W_OK))' | tee $RES/bytecode.txt
    wait_for=$2; shift 2
    # A chain that has ended makes way for this one (its log kept beside the results); one still running is not
    # replaced: `detach` says "already started" and this call waits for it.
    if [ -e $JOBS/chain.rc ]; then
      cat $JOBS/chain.log >> $RES/chain-earlier.log; rm -f $JOBS/chain.started $JOBS/chain.rc $JOBS/chain.log
    fi
    chain=""
    for s in "$@"; do chain="$chain echo '== $s' \$(date +%T); { $(step $s); } > $RES/$s.log 2>&1; echo \"== $s exit \$?\" \$(date +%T);"; done
    detach chain "cd $PWD && $chain"
    wait_detached "$wait_for"
    cp $JOBS/chain.log $RES/ 2>/dev/null; pack_jobs $RES "$OUT/chain.tar.gz" ;;
  wait)
    wait_detached "${2:-540}"
    cp $JOBS/chain.log $RES/ 2>/dev/null; pack_jobs $RES "$OUT/chain.tar.gz" ;;
  *) echo "usage: bash benchmarks/gpu/chain.sh start SECONDS STEP... | wait SECONDS"; exit 2 ;;
esac
