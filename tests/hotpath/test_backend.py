"""Backend selection (SPEC §1): cffi by default, loud failures, visible choice."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_python(code: str, backend: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SESSIONFENCE_BACKEND"}
    if backend is not None:
        env["SESSIONFENCE_BACKEND"] = backend
    return subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.cffi
def test_c_backend_is_the_default_after_a_normal_install() -> None:
    out = run_python("import sessionfence; print(sessionfence.BACKEND)", None)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cffi"


@pytest.mark.cffi
@pytest.mark.parametrize("value", ["cffi", " CFFI ", "auto", ""])
def test_cffi_and_auto_select_the_extension(value: str) -> None:
    code = (
        "import sessionfence\n"
        "import sessionfence._impl_cffi as impl\n"
        "assert sessionfence.fingerprint is impl.fingerprint\n"
        "print(sessionfence.BACKEND)"
    )
    out = run_python(code, value)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cffi"


def test_python_backend_on_request() -> None:
    code = (
        "import sys, sessionfence\n"
        "assert 'sessionfence._impl_cffi' not in sys.modules\n"
        "import sessionfence._impl_py as impl\n"
        "assert sessionfence.FileProbe is impl.FileProbe\n"
        "print(sessionfence.BACKEND)"
    )
    out = run_python(code, "python")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "python"


def test_unknown_backend_fails_with_the_valid_values() -> None:
    out = run_python("import sessionfence", "bogus")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: unknown SESSIONFENCE_BACKEND='bogus'")
    assert "auto, cffi, python" in last


def test_cffi_requested_without_the_extension_fails_loudly() -> None:
    # Hide the compiled module the way a broken wheel would lack it.
    code = "import sys\nsys.modules['sessionfence._ffi'] = None\nimport sessionfence\n"
    out = run_python(code, "cffi")
    assert out.returncode != 0
    assert "SESSIONFENCE_BACKEND=cffi but the C extension" in out.stderr
    fallback = run_python(code + "print(sessionfence.BACKEND)", "auto")
    assert fallback.returncode == 0, fallback.stderr
    assert fallback.stdout.strip() == "python"


@pytest.mark.cffi
def test_stale_extension_build_is_refused() -> None:
    code = (
        "import sessionfence._version as v\n"
        "v.__version__ = '0.0.0-stale'\n"
        "import sessionfence._impl_cffi\n"
    )
    out = run_python(code, "python")
    assert out.returncode != 0
    assert "was built for version" in out.stderr and "0.0.0-stale" in out.stderr


def test_every_public_name_is_importable_from_the_package() -> None:
    import sessionfence

    missing = [name for name in sessionfence.__all__ if not hasattr(sessionfence, name)]
    # Lock, transcript and controller names resolve lazily from their modules.
    assert missing == []
