# Source on the lent GPU machine from the repository root (`source benchmarks/gpu/env.sh`): installs the
# carried wheels (.whl) and this tree into /tmp/site without touching the machine's torch, then points
# PYTHONPATH there.
set -e
# .whl need only travel with a machine's first call: /tmp/site keeps what it installed while the machine is warm.
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/site . 2>&1 | grep -v WARNING || true
rm -rf build
# nvidia-cutlass-dsl (flash-attn-4, benchmarks/gpu/fa4_install.sh) puts its packages on sys.path through a .pth
# file, which a --target folder on PYTHONPATH never runs: its folder is named here instead.
# The package runs from /tmp/site, outside any checkout: results take the commit from here (benchmarks/timing.py).
export MEGAFUSION_COMMIT="$(git rev-parse HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo -dirty)"
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages TORCHINDUCTOR_CACHE_DIR=/tmp/inductor MEGAFUSION_CACHE=/tmp/mfcache PYTHONUNBUFFERED=1
# The machine's torch environment has no bytecode and Python wrote none there: every process compiled 2,588 modules
# from source, 9.2 s of a warm mf-generate start (fourteenth session, benchmarks/RESULTS.md). A pip install has
# bytecode; so that timings measure that, Python keeps bytecode for every source under /tmp/pycache.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
# GPU test runs: torch's structured-trace logger emits DEBUG records that pytest's log capture printed by the
# thousand under a failure, pushing the failure itself out of the call's output tail (fifteenth session).
export PYTEST_ADDOPTS="-p no:logging --tb=short"
set +e
