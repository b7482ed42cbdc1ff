#!/usr/bin/env bash
# Build llama.cpp and the engine with AddressSanitizer + UBSan into their own virtualenv
# (build/sanitize/, beside the normal build, which it leaves alone) and run the engine,
# reliability and service tests under them. Any ASan report or UB fails the run.
#
# Usage:
#   scripts/sanitize.sh                 # the default test selection below
#   scripts/sanitize.sh tests/test_engine.py -k grammar
#
# Self-contained: the venv gets everything the tests import (the runtime dependencies and
# the test extra), so it runs on a fresh machine with nothing but Python and a C++ compiler.
# First run: ~10-15 minutes on 2 cores (llama.cpp built instrumented); later runs are
# incremental. Python itself is not instrumented, so libasan is preloaded and leak
# detection is off (the interpreter's own allocations would drown everything).
set -euo pipefail
case "${1:-}" in
  -h | --help)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac
cd "$(dirname "$0")/.."
venv=build/sanitize/venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q ./clients/python
# The instrumented build alone (--no-deps), so its config settings reach no other build;
# then the runtime dependencies and the test extra, from the installed package's metadata.
"$py" -m pip install -q --no-deps --force-reinstall \
  --config-settings=build-dir=build/sanitize/{wheel_tag} \
  --config-settings=cmake.define.LLAMA_CRAB_SANITIZE=ON \
  --config-settings=cmake.define.LLAMA_CRAB_REFERENCE_TOOLS=OFF \
  --config-settings=cmake.build-type=RelWithDebInfo \
  .
"$py" -m pip install -q "llama-crab[test]==0.1.0"
# The extension the tests will load must be the instrumented one (not one pip fetched or
# rebuilt while resolving the extra). Found without importing it: outside LD_PRELOAD an
# ASan-linked module refuses to load.
"$py" - <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llama_crab")
assert spec is not None and spec.submodule_search_locations
exts = [p for d in spec.submodule_search_locations for p in pathlib.Path(d).glob("_engine*.so")]
if not exts or b"__asan_init" not in exts[0].read_bytes():
    sys.exit(f"sanitize.sh: {exts or 'no _engine'} is not the ASan build")
PY
libasan=$(${CC:-cc} -print-file-name=libasan.so)
libubsan=$(${CC:-cc} -print-file-name=libubsan.so)
if [ $# -eq 0 ]; then
  set -- tests/test_engine.py tests/test_reliability.py tests/test_service.py tests/test_fuzz.py
fi
export LD_PRELOAD="$libasan $libubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# -p no:cacheprovider: the instrumented run must not share the normal run's cache.
"$py" -m pytest -p no:cacheprovider -q --timeout 1200 "$@"
