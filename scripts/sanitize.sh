#!/usr/bin/env bash
# Build llama.cpp and the engine with AddressSanitizer + UBSan into their own virtualenv
# (build/sanitize/, beside the normal build, which it leaves alone) and run the engine,
# reliability and service tests under them. Any ASan report or UB fails the run.
#
#   scripts/sanitize.sh                 # the default test selection below
#   scripts/sanitize.sh tests/test_engine.py -k grammar
#
# First run: ~10-15 minutes on 2 cores (llama.cpp built instrumented); later runs are
# incremental. Python itself is not instrumented, so libasan is preloaded and leak
# detection is off (the interpreter's own allocations would drown everything).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/sanitize/venv
if [ ! -x "$venv/bin/python" ]; then
  python -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install -q --no-deps ./clients/python
"$venv/bin/python" -m pip install -q --no-deps \
  --config-settings=build-dir=build/sanitize/{wheel_tag} \
  --config-settings=cmake.define.LLAMA_CRAB_SANITIZE=ON \
  --config-settings=cmake.define.LLAMA_CRAB_REFERENCE_TOOLS=OFF \
  --config-settings=cmake.build-type=RelWithDebInfo \
  .
libasan=$(${CC:-cc} -print-file-name=libasan.so)
libubsan=$(${CC:-cc} -print-file-name=libubsan.so)
if [ $# -eq 0 ]; then
  set -- tests/test_engine.py tests/test_reliability.py tests/test_service.py tests/test_fuzz.py
fi
export LD_PRELOAD="$libasan $libubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# -p no:cacheprovider: the instrumented run must not share the normal run's cache.
"$venv/bin/python" -m pytest -p no:cacheprovider -q --timeout 1200 "$@"
