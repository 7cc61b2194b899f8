#!/usr/bin/env bash
# C-level checks of the sessionfence core (csrc/). Called by .ci/run; runs alone too:
#
#   1. csrc/tests/test_sessionfence.c under AddressSanitizer + UndefinedBehaviorSanitizer,
#      built with gcc and with clang (-std=c99 -Wall -Wextra -Werror).
#   2. The real cffi extension built with ASan/UBSan in a scratch copy of the package, and
#      the hot-path pytest files run against it (SESSIONFENCE_BACKEND=cffi, -m cffi).
#      CPython is not built with ASan, so the ASan runtime is LD_PRELOADed (it must come
#      first in the process's library list), PYTHONMALLOC=malloc makes Python's own buffers
#      (what cffi hands to C) visible to ASan, and detect_leaks=0 because the interpreter
#      never frees everything at exit. A deliberate overflow proves the sanitizer is live.
#   3. The Windows branch: mingw-w64 cross-compile of sessionfence.c and the C tests with
#      -Werror, and the test .exe run under wine when wine works here (else: a reason).
#   4. Other targets' real system headers through zig cc (PyPI `ziglang`): macOS x86_64 and
#      arm64 (st_mtimespec, pread, O_CLOEXEC), Windows arm64 and x86, Linux musl (the C
#      tests are also linked statically against musl and run).
#
# Missing tools: with CI set, apt-get installs clang / mingw-w64 / wine; without CI that
# step is skipped with a message. ziglang is pip-installed into the scratch venv (skipped
# if that fails). Idempotent: nothing is left behind but apt packages and a wine prefix.
# Build output goes to a temporary directory that is removed at exit.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sessionfence-ctests.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
SKIPPED=()

section() { printf '\n==== %s ====\n' "$*"; }
skip() { echo "SKIP: $*"; SKIPPED+=("$*"); }
have() { command -v "$1" >/dev/null 2>&1; }
# pip, minus the noise of index locations this machine's pip.conf lists but lacks.
pipq() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }

APT_UPDATED=0
apt_install() { # apt_install PACKAGE... (only with CI set and root)
    [[ -n "${CI:-}" ]] || return 1
    have apt-get || return 1
    [[ $(id -u) -eq 0 ]] || return 1
    if [[ $APT_UPDATED -eq 0 ]]; then
        apt-get update -qq >/dev/null && APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

CFLAGS_STRICT=(-std=c99 -Wall -Wextra -Werror)
SAN=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1)
TEST_SRC=(-DSF_TESTING -Icsrc csrc/tests/test_sessionfence.c csrc/sessionfence.c)
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:strict_string_checks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"

# ---------------------------------------------------------------------------------------
section "1. C tests under ASan + UBSan (gcc, clang)"
if ! have clang; then
    apt_install clang || true
fi
# clang links ASan/UBSan from its compiler-rt package, which --no-install-recommends
# leaves out (Debian: libclang-rt-<major>-dev); install it when clang cannot link -fsanitize.
if have clang && ! echo 'int main(void){return 0;}' \
        | clang -x c -fsanitize=address,undefined -o "$WORK/rt-probe" - 2>/dev/null; then
    major="$(clang -dumpversion | cut -d. -f1)"
    apt_install "libclang-rt-${major}-dev" || apt_install "libclang-common-${major}-dev" || true
fi
for cc in gcc clang; do
    if ! have "$cc"; then
        skip "$cc not installed (set CI=1 to apt-get it)"
        continue
    fi
    echo "-- $cc: $($cc --version | head -n1)"
    "$cc" "${CFLAGS_STRICT[@]}" "${SAN[@]}" "${TEST_SRC[@]}" -o "$WORK/test-$cc"
    "$WORK/test-$cc"
    # And the optimised build a wheel gets, warnings as errors, no sanitizer.
    "$cc" "${CFLAGS_STRICT[@]}" -O3 -fvisibility=hidden -fPIC -Icsrc -c csrc/sessionfence.c \
        -o "$WORK/sessionfence-$cc.o"
done

# ---------------------------------------------------------------------------------------
section "2. The cffi extension under ASan + UBSan, hot-path pytest files"
SANDIR="$WORK/asan"
mkdir -p "$SANDIR"
cp -r csrc tests pyproject.toml README.md LICENSE "$SANDIR/"
tar -C "$ROOT" --exclude='__pycache__' --exclude='*.so' --exclude='*.pyd' --exclude='_ffi.c' \
    -cf - sessionfence | tar -C "$SANDIR" -xf -
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
pipq "$VPY" -m pip install -q --disable-pip-version-check --upgrade pip
# The test extra of pyproject.toml (tomllib: Python >= 3.11), plus what the build needs.
TEST_DEPS=$("$VPY" - <<'EOF'
import re, sys
try:
    import tomllib
    with open("pyproject.toml", "rb") as f:
        data = tomllib.load(f)
    deps = data["project"]["optional-dependencies"]["test"] + data["project"]["dependencies"]
except Exception:  # Python 3.10: a fixed list
    deps = ["pytest>=8", "pytest-timeout", "pytest-asyncio", "hypothesis", "filelock",
            "cffi>=1.17", "xxhash>=3.0"]
print("\n".join(d for d in deps if not d.startswith("sessionfence")))
EOF
)
mapfile -t TEST_DEPS_ARR <<<"$TEST_DEPS"
pipq "$VPY" -m pip install -q --disable-pip-version-check "${TEST_DEPS_ARR[@]}" "setuptools>=77"
(
    cd "$SANDIR"
    CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g" \
    LDFLAGS="-fsanitize=address,undefined" \
        "$VPY" -c "
import sys
sys.path.insert(0, 'csrc')
from build_ffi import ffibuilder
print('built', ffibuilder.compile(tmpdir='.', verbose=False))
"
)
SO=$(ls "$SANDIR"/sessionfence/_ffi*.so)
ldd "$SO" | grep -q libasan || { echo "FAIL: $SO is not linked against libasan"; exit 1; }
LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
run_sanitized() {
    (
        cd "$SANDIR"
        env LD_PRELOAD="$LIBASAN $LIBUBSAN" ASAN_OPTIONS="detect_leaks=0" PYTHONMALLOC=malloc \
            PYTHONPATH="$SANDIR" SESSIONFENCE_BACKEND=cffi "$VPY" "$@"
    )
}
run_sanitized -c "import sessionfence, sessionfence._ffi as f; \
assert sessionfence.BACKEND == 'cffi'; assert f.__file__.startswith('$SANDIR'), f.__file__; \
print('backend', sessionfence.BACKEND, 'from', f.__file__)"
echo "-- canary: a deliberate 8-byte-buffer overread must be caught"
if run_sanitized -c "from sessionfence._ffi import ffi, lib
b = ffi.new('uint8_t[]', 8)
lib.sf_xxh3_64(b, 64)" >"$WORK/canary.log" 2>&1; then
    echo "FAIL: the overread went unnoticed: ASan is not active"; exit 1
fi
grep -m1 "ERROR: AddressSanitizer: heap-buffer-overflow" "$WORK/canary.log"
HOT=()
for f in hotpath/test_fingerprint.py hotpath/test_check_append.py hotpath/test_hash_vectors.py \
         hotpath/test_bad_input.py hotpath/test_properties.py; do
    [[ -f "tests/$f" ]] && HOT+=("tests/$f")
done
run_sanitized -m pytest -p no:cacheprovider -q -m cffi "${HOT[@]}"

# ---------------------------------------------------------------------------------------
section "3. Windows: mingw-w64 cross-compile (-Werror) and the C tests under wine"
MINGW=x86_64-w64-mingw32-gcc
if ! have "$MINGW"; then
    apt_install gcc-mingw-w64-x86-64 || true
fi
if have "$MINGW"; then
    echo "-- $($MINGW --version | head -n1)"
    "$MINGW" "${CFLAGS_STRICT[@]}" -O2 -Icsrc -c csrc/sessionfence.c -o "$WORK/sessionfence-win.o"
    # MSVC's /W3 /WX (the wheel build with SESSIONFENCE_WERROR=1) flags narrowing
    # conversions (C4244, C4267); -Wconversion is the closest check available here.
    "$MINGW" "${CFLAGS_STRICT[@]}" -O2 -Wconversion -Wno-sign-conversion -Icsrc \
        -c csrc/sessionfence.c -o "$WORK/sessionfence-win-conv.o"
    "$MINGW" "${CFLAGS_STRICT[@]}" -O2 "${TEST_SRC[@]}" -o "$WORK/test_sessionfence.exe"
    "$MINGW" "${CFLAGS_STRICT[@]}" -x c - -o "$WORK/hello.exe" <<'EOF'
#include <stdio.h>
int main(void) { puts("wine runs Windows programs here"); return 0; }
EOF
    echo "built test_sessionfence.exe"
    if ! have wine && ! have wine64; then
        apt_install wine64 wine || true
    fi
    WINE=$(command -v wine || command -v wine64 || true)
    if [[ -z "$WINE" ]]; then
        skip "wine not installed (set CI=1 to apt-get it): the .exe was built, not run"
    else
        export WINEPREFIX="${SESSIONFENCE_WINEPREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/sessionfence-wine}"
        export WINEDEBUG=-all
        mkdir -p "$WINEPREFIX"
        if ! (cd "$WORK" && timeout 300 "$WINE" hello.exe) >"$WORK/wine-hello.log" 2>&1 \
            || ! grep -q "wine runs" "$WORK/wine-hello.log"; then
            tail -n 5 "$WORK/wine-hello.log" || true
            skip "wine is installed but cannot run a Windows program here"
        else
            (cd "$WORK" && timeout 600 "$WINE" test_sessionfence.exe)
        fi
    fi
else
    skip "mingw-w64 not installed (set CI=1 to apt-get gcc-mingw-w64-x86-64)"
fi

# ---------------------------------------------------------------------------------------
section "4. Other targets' system headers via zig cc (macOS, Windows arm64/x86, musl)"
ZIG=()
if [[ -n "${SESSIONFENCE_ZIG:-}" ]]; then
    read -r -a ZIG <<<"$SESSIONFENCE_ZIG"
elif have zig; then
    ZIG=(zig)
elif "$VPY" -m pip install -q --disable-pip-version-check ziglang >/dev/null 2>&1; then
    ZIG=("$VPY" -m ziglang) # into the scratch venv: nothing outside $WORK changes
fi
if [[ ${#ZIG[@]} -eq 0 ]]; then
    skip "zig not available (pip install ziglang failed; or set SESSIONFENCE_ZIG=cmd)"
else
    echo "-- zig $("${ZIG[@]}" version)"
    export ZIG_GLOBAL_CACHE_DIR="$WORK/zig-cache" ZIG_LOCAL_CACHE_DIR="$WORK/zig-cache"
    for target in x86_64-macos aarch64-macos aarch64-windows-gnu x86-windows-gnu \
                  x86_64-linux-musl aarch64-linux-gnu; do
        "${ZIG[@]}" cc -target "$target" "${CFLAGS_STRICT[@]}" -O2 -DSF_TESTING -Icsrc \
            -c csrc/sessionfence.c -o "$WORK/sf-$target.o"
        "${ZIG[@]}" cc -target "$target" "${CFLAGS_STRICT[@]}" -O2 -DSF_TESTING -Icsrc \
            -c csrc/tests/test_sessionfence.c -o "$WORK/test-$target.o"
        echo "compiled for $target"
    done
    if [[ $(uname -m) == x86_64 && $(uname -s) == Linux ]]; then
        "${ZIG[@]}" cc -target x86_64-linux-musl -static "${CFLAGS_STRICT[@]}" -O2 \
            "${TEST_SRC[@]}" -o "$WORK/test-musl"
        echo "-- the C tests linked statically against musl:"
        "$WORK/test-musl"
    fi
fi

section "c-tests done in $((SECONDS - START)) s"
if [[ ${#SKIPPED[@]} -gt 0 ]]; then
    printf 'skipped: %s\n' "${SKIPPED[@]}"
fi
