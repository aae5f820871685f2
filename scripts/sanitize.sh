#!/usr/bin/env bash
# Build the C core with AddressSanitizer + UndefinedBehaviorSanitizer and run
# pytest against it (arguments go to pytest; default: the C-core tests, then the
# compiled matchers' tests, whose hypothesis inputs all go through the C matcher).
#
#   ./scripts/sanitize.sh                        # the C-core tests (listener, look, core life), then the matcher tests
#   ./scripts/sanitize.sh tests/ -k "[c]"
#
# The sanitized build goes to $AF_SANITIZE_DIR (default: a temp dir) as a copy of
# the package that shadows the installed one on PYTHONPATH; libasan is preloaded
# because the Python interpreter itself is not instrumented. Any report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
out=${AF_SANITIZE_DIR:-$(mktemp -d)}
mkdir -p "$out"
rm -rf "$out/acceptfilter"
cp -r src/acceptfilter "$out/acceptfilter"
rm -rf "$out/acceptfilter/filters" "$out"/acceptfilter/_core*.so "$out"/acceptfilter/_relay*.so "$out"/acceptfilter/_look*.so
cp -r filters "$out/acceptfilter/filters"
AF_SANITIZE=1 "$PY" - "$out" <<'PYEOF'
import os, sys, shutil, tempfile, importlib.util
out = sys.argv[1]
# The I/O core and the relay's pumps (csrc/afloop.c, csrc/afrelay.c).
for builder in ("_core_build", "_relay_build"):
    spec = importlib.util.spec_from_file_location(builder, f"src/acceptfilter/{builder}.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    # cffi compiles inside tmpdir: make the builder's relative csrc paths absolute.
    name, source, ext, kwds = mod.ffibuilder._assigned_source
    kwds["sources"] = [os.path.abspath(p) for p in kwds["sources"]]
    kwds["include_dirs"] = [os.path.abspath(p) for p in kwds["include_dirs"]]
    tmp = tempfile.mkdtemp()
    so = mod.ffibuilder.compile(tmpdir=tmp, verbose=False)
    shutil.copy(so, os.path.join(out, "acceptfilter", os.path.basename(so)))
# The worker's look (csrc/pylook.c, a CPython extension): setuptools' build_ext, same flags.
from setuptools import Distribution, Extension
spec = importlib.util.spec_from_file_location("_look_build", "src/acceptfilter/_look_build.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
dist = Distribution({"name": "acceptfilter-sanitized", "ext_modules": [Extension(**mod.extension_kwargs(os.getcwd()))]})
cmd = dist.get_command_obj("build_ext")
cmd.build_lib, cmd.build_temp = tempfile.mkdtemp(), tempfile.mkdtemp()
cmd.ensure_finalized()
cmd.run()
so = cmd.get_ext_fullpath("acceptfilter._look")
shutil.copy(so, os.path.join(out, "acceptfilter", os.path.basename(so)))
PYEOF
libasan=$(cc -print-file-name=libasan.so)
export LD_PRELOAD="$libasan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="$out${PYTHONPATH:+:$PYTHONPATH}"
echo "sanitized core: $("$PY" -c 'import acceptfilter._core as c; print(c.__file__)')"
echo "sanitized relay: $("$PY" -c 'import acceptfilter._relay as r; print(r.__file__)')"
echo "sanitized look: $("$PY" -c 'import acceptfilter._look as k; print(k.__file__)')"
if (($#)); then exec "$PY" -m pytest "$@"; fi
# Both halves run whatever the first one gives (set -e would end the script at a failure in the
# first and skip the matchers); the exit status says whether either failed.
status=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_listener.py tests/test_look.py tests/test_core_life.py \
  -k "[c] or look or life" || status=$?
# PYTHONMALLOC=malloc: Python's buffers come from malloc, so ASan sees a matcher read past them.
PYTHONMALLOC=malloc "$PY" -m pytest -q -p no:cacheprovider tests/test_matcher.py tests/test_testing_check.py || status=$?
exit "$status"
