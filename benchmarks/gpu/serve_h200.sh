# mf-serve on the lent H200, from the repository root: batched throughput (SD1.5 1024) and the server against the
# same work in process (SDXL 2048). Ray is not in the GPU image: its wheels travel in two calls.
#
# Here (the calling machine), once, from the repository root; 43 wheels, 104.7 MB (ray's own 79.3 MB):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .raywhl -r benchmarks/gpu/serve_wheels.txt
#   bash benchmarks/gpu/split_parts.sh .raywhl/ray-2.60.0-*.whl raypart 3 && rm .raywhl/ray-2.60.0-*.whl
# (.raywhl then holds the 42 small wheels, 25 MB; .raypart1..3 hold ray in parts of 25 MB.)
#
# On the GPU machine (one warm machine; /tmp/site keeps what was installed while it stays warm):
#   bash benchmarks/gpu/serve_h200.sh part     carry .whl (diffusers), .raywhl, .raypart1
#   bash benchmarks/gpu/serve_h200.sh part     carry .raypart2, .raypart3: installs Ray once all parts are there
#   bash benchmarks/gpu/serve_h200.sh sd15     SD1.5 1024 through mf-serve: --max-batch 8 at concurrency 1 and 16,
#                                              then --max-batch 1 at concurrency 16 (the same load, no batching)
#   bash benchmarks/gpu/serve_h200.sh sdxl     SDXL 2048 through mf-serve at concurrency 1 (8 requests)
#   bash benchmarks/gpu/serve_h200.sh sd3      SD3 (Medium's layout, random weights, bf16, graphs) 2048 through
#                                              mf-serve at concurrency 1 (6 requests; in process: RESULTS.md, 4.44 s)
#   bash benchmarks/gpu/serve_h200.sh inproc   the same work in process, no Ray: SDXL 2048 batch 1 (5 repeats)
#                                              and SD1.5 1024 batches 1, 4, 8 (needs only .whl; any order)
# Results go under $OUT (load.md / inprocess.md with the commands and commit).
source benchmarks/gpu/env.sh
source benchmarks/gpu/carried_parts.sh
PARTS=/tmp/rayparts
PORT=8000

ray_ok() { python3 -c "import ray, ray.serve; print('ray', ray.__version__, 'from', ray.__file__)" 2>/dev/null; }

install_ray() {
  if ray_ok; then return 0; fi
  mkdir -p /tmp/raywhl
  [ -d .raywhl ] && cp -p .raywhl/*.whl /tmp/raywhl/
  gather_parts "$PARTS" .raypart*/
  join_parts "$PARTS" /tmp/raywhl .raypart1 || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/raywhl/*.whl \
    2>&1 | grep -v WARNING
  ray_ok || { echo "ray does not import after the install (a wheel missing from /tmp/raywhl?)"; return 1; }
}

# serve NAME ARGS...: starts mf-serve with ARGS in the background (its log in $OUT/NAME-server.log), waits until
# /v1/health says ready (at most 400 s); sets SERVER_PID.
serve_up() {
  local name=$1
  shift
  python3 -m megafusion.cli.serve --device cuda --port $PORT "$@" > "$OUT/$name-server.log" 2>&1 &
  SERVER_PID=$!
  python3 - "$SERVER_PID" <<'EOF'
import http.client, os, sys, time
pid, end = int(sys.argv[1]), time.monotonic() + 400
while time.monotonic() < end:
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit("mf-serve exited before it was ready (see its log)")
    try:
        c = http.client.HTTPConnection("127.0.0.1", 8000, timeout=5)
        c.request("GET", "/v1/health")
        if c.getresponse().status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(2)
sys.exit("mf-serve not ready within 400 s")
EOF
}

serve_down() {  # SIGTERM to the mf-serve we started; it stops Serve and its local Ray
  kill -TERM "$SERVER_PID" 2>/dev/null
  for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || return 0; sleep 1; done
  kill -KILL "$SERVER_PID" 2>/dev/null
}

load() {  # load NAME CONCURRENCIES REQUESTS BODY
  timeout 300 python3 -m megafusion.benchmarks.load --url http://127.0.0.1:$PORT --concurrency "$2" \
    --requests "$3" --body "$4" --max-seconds 240 --request-timeout 240 --output "$OUT/$1"
}

SD15='{"prompt": "a lighthouse at dusk", "size": "1024x1024"}'
SDXL='{"prompt": "a lighthouse at dusk", "size": "2048x2048"}'
SD3='{"prompt": "a lighthouse at dusk", "size": "2048x2048"}'
case "$1" in
  part) install_ray ;;
  sd15)
    install_ray || exit 1
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    serve_up sd15-batch8 --model sd15 --random-weights --sizes 1024x1024 --max-batch 8 --max-queue 64 || exit 1
    load sd15-batch8-warm 16 32 "$SD15"          # untimed: captures the CUDA graphs of each group size
    load sd15-batch8 1,16 48 "$SD15"
    serve_down
    serve_up sd15-batch1 --model sd15 --random-weights --sizes 1024x1024 --max-batch 1 --max-queue 64 || exit 1
    load sd15-batch1 16 48 "$SD15"
    serve_down ;;
  sdxl)
    install_ray || exit 1
    serve_up sdxl --model sdxl --random-weights --sizes 2048x2048 --max-batch 1 || exit 1
    load sdxl-warm 1 2 "$SDXL"
    load sdxl 1 8 "$SDXL"
    serve_down ;;
  sd3)
    install_ray || exit 1
    serve_up sd3 --model sd3 --random-weights --sizes 2048x2048 --max-batch 1 || exit 1
    load sd3-warm 1 2 "$SD3"
    load sd3 1 6 "$SD3"
    serve_down ;;
  inproc)
    timeout 280 python3 benchmarks/lab/serve_inprocess.py --model sdxl --random-weights --device cuda \
      --size 2048x2048 --batches 1 --repeats 5 --output "$OUT/inproc-sdxl"
    timeout 280 python3 benchmarks/lab/serve_inprocess.py --model sd15 --random-weights --device cuda \
      --size 1024x1024 --batches 1,4,8 --repeats 3 --output "$OUT/inproc-sd15" ;;
  *) echo "usage: bash benchmarks/gpu/serve_h200.sh part|sd15|sdxl|sd3|inproc"; exit 2 ;;
esac
