"""The public surface: what each public module exports, how type checkers see it, and how its
names print (issue 12; modelled on trio's ``test_exports.py`` and anyio's
``test_all_attributes.py``).

- every name in each public ``__all__`` resolves, and ``dir(sessionfence)`` is the API;
- the ``if TYPE_CHECKING:`` block of ``sessionfence/__init__.py`` imports exactly the lazy
  names (``_LAZY``) plus the hot path, and each of them is the object the runtime returns;
- for mypy no public name is ``Any`` and the README's Python examples type-check;
- ``import sessionfence`` imports no subpackage and no asyncio until a lazy name is used;
- public classes and functions print and pickle as ``sessionfence.X``.
"""

from __future__ import annotations

import ast
import enum
import importlib
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import pytest

import sessionfence
from sessionfence import _impl_py

ROOT = Path(__file__).resolve().parents[2]
INIT = Path(sessionfence.__file__)
README = ROOT / "README.md"
PUBLIC_MODULES = [
    "sessionfence",
    "sessionfence.errors",
    "sessionfence.lock",
    "sessionfence.transcript",
    "sessionfence.controller",
    "sessionfence.sync",
]
HOT_PATH = {
    "FileProbe",
    "ManyProbe",
    "RollingDigest",
    "check_append",
    "content_digest",
    "fingerprint",
    "fingerprint_many",
    "read_range",
}


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet); return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- every exported name exists ---------------------------------------------------------------


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_name_in_all_is_importable(module_name: str) -> None:
    module = importlib.import_module(module_name)
    names = module.__all__
    assert len(names) == len(set(names)), "duplicates in __all__"
    for name in names:
        assert getattr(module, name) is not None or name == "MISSING", name
        namespace: dict[str, Any] = {}
        exec(f"from {module_name} import {name}", namespace)
        assert namespace[name] is getattr(module, name)


def test_star_import_gives_the_public_api() -> None:
    namespace: dict[str, Any] = {}
    exec("from sessionfence import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(sessionfence.__all__)


def test_dir_shows_only_the_public_api() -> None:
    assert dir(sessionfence) == sorted(sessionfence.__all__)
    assert [n for n in dir(sessionfence) if n.startswith("_")] == ["__version__"]


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'fingerprnt'"):
        sessionfence.fingerprnt  # type: ignore[attr-defined]  # noqa: B018


def test_subpackages_export_the_root_names_they_define() -> None:
    # The root's lazy names come from the subpackage _LAZY names, and each is in that
    # subpackage's __all__ (so `from sessionfence.lock import *` has it too).
    for name, package in sessionfence._LAZY.items():
        module = importlib.import_module(f"sessionfence.{package}")
        assert name in module.__all__, (name, package)
    assert set(sessionfence.errors.__all__) <= set(sessionfence.__all__)


# -- what type checkers read -------------------------------------------------------------------


def _type_checking_imports() -> dict[str, tuple[str, str]]:
    """``name -> (module, attribute)`` of the imports in ``if TYPE_CHECKING:`` of __init__."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    found: dict[str, tuple[str, str]] = {}
    blocks = [
        node
        for node in tree.body
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
    ]
    assert len(blocks) == 1, "expected one `if TYPE_CHECKING:` block with the typed imports"
    for stmt in blocks[0].body:
        assert isinstance(stmt, ast.ImportFrom), ast.dump(stmt)
        for alias in stmt.names:
            # `from x import y as y`: the explicit re-export form mypy and pyright honour.
            assert alias.asname == alias.name, f"import {alias.name} as {alias.name}"
            found[alias.name] = ("." * stmt.level + (stmt.module or ""), alias.name)
    return found


def _statically_bound() -> set[str]:
    """Names bound at the top level of __init__ for a type checker (else branches aside)."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    bound: set[str] = set(_type_checking_imports())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            bound.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            bound.add(node.target.id)
        elif isinstance(node, ast.Assign):
            bound.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return bound


def test_type_checking_block_is_the_runtime_lazy_map_plus_the_hot_path() -> None:
    typed = _type_checking_imports()
    assert set(typed) == set(sessionfence._LAZY) | HOT_PATH
    for name, (module, attribute) in typed.items():
        runtime = getattr(sessionfence, name)
        if name in HOT_PATH:
            # Type checkers read the pure implementation; the runtime object is the active
            # backend's, with the same signature (checked by mypy in sessionfence._backend).
            assert module == "._impl_py"
            assert hasattr(_impl_py, attribute)
            assert runtime is getattr(sessionfence._impl, attribute)
        else:
            assert module == "." + sessionfence._LAZY[name], name
            assert runtime is getattr(importlib.import_module("sessionfence" + module), attribute)


def test_every_public_name_is_bound_for_type_checkers() -> None:
    # A name only __getattr__ provides would be Any (or an error) for a type checker.
    assert set(sessionfence.__all__) <= _statically_bound()


def _checkout_path() -> dict[str, str]:
    """MYPYPATH for a source checkout (an editable install is an import hook mypy cannot
    follow); an installed wheel is found in site-packages."""
    source = INIT.parent.parent
    return {"MYPYPATH": str(source)} if (source / "pyproject.toml").exists() else {}


def _mypy(tmp_path: Path, files: list[Path]) -> str:
    pytest.importorskip("mypy.api", reason="mypy is in the dev extra")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--python-version=3.10",
            "--no-error-summary",
            "--hide-error-context",
            f"--cache-dir={tmp_path / 'mypy-cache'}",
            *map(str, files),
        ],
        cwd=tmp_path,
        env={**os.environ, **_checkout_path()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert not done.stderr, done.stderr
    return done.stdout


def test_no_public_name_is_any_for_mypy(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    names = sorted(sessionfence.__all__)
    probe.write_text(
        "import sessionfence as sf\n" + "".join(f"reveal_type(sf.{n})\n" for n in names)
    )
    revealed = re.findall(
        r'probe\.py:(\d+): note: Revealed type is "(.*)"', _mypy(tmp_path, [probe])
    )
    assert len(revealed) == len(names)
    as_any = [names[int(line) - 2] for line, shown in revealed if shown == "Any"]
    assert as_any == []


@pytest.mark.skipif(not README.exists(), reason="needs the source checkout (README.md)")
def test_readme_examples_type_check(tmp_path: Path) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)
    assert blocks, "no python blocks in README.md"
    files = []
    for number, code in enumerate(blocks, 1):
        files.append(tmp_path / f"readme_{number}.py")
        files[-1].write_text(code, encoding="utf-8")
    assert _mypy(tmp_path, files) == ""


# -- import cost -------------------------------------------------------------------------------


def test_import_is_lazy() -> None:
    out = _python(
        """
        import json, sys
        import sessionfence
        before = sorted(sys.modules)
        sessionfence.fingerprint, sessionfence.SessionTakeoverError  # eager names
        eager = sorted(sys.modules)
        sessionfence.SessionFenceController
        print(json.dumps([before, eager, sorted(sys.modules)]))
        """
    )
    before, eager, after = json.loads(out)
    heavy = {"asyncio", "sessionfence.lock", "sessionfence.transcript", "sessionfence.controller"}
    assert heavy & set(before) == set()
    assert eager == before
    assert {"asyncio", "sessionfence.controller"} <= set(after)


# -- how names print and pickle ----------------------------------------------------------------


def _root_classes_and_functions() -> list[str]:
    return [
        name
        for name in sessionfence.__all__
        if isinstance(getattr(sessionfence, name), (type, types.FunctionType))
    ]


@pytest.mark.parametrize("name", _root_classes_and_functions())
def test_root_names_print_and_pickle_as_sessionfence_x(name: str) -> None:
    obj = getattr(sessionfence, name)
    assert obj.__module__ == "sessionfence"
    assert obj.__qualname__ == name
    if isinstance(obj, type) and not issubclass(obj, enum.Enum):
        assert repr(obj) == f"<class 'sessionfence.{name}'>"
    assert pickle.loads(pickle.dumps(obj)) is obj
    if isinstance(obj, type) and name not in ("FileProbe", "ManyProbe"):
        # Resolving annotations still works although the public module does not import
        # what the defining module's annotations name. (The probes' never resolved: their
        # bases' PathArg holds "os.PathLike[str]" strings that _probe_base cannot evaluate.)
        typing.get_type_hints(obj)


@pytest.mark.parametrize(
    ("module_name", "name"),
    [("sessionfence.lock", "list_locks"), ("sessionfence.lock", "lock_path_for")],
)
def test_subpackage_only_names_print_as_their_subpackage(module_name: str, name: str) -> None:
    obj = getattr(importlib.import_module(module_name), name)
    assert obj.__module__ == module_name
    assert pickle.loads(pickle.dumps(obj)) is obj


def test_names_print_as_sessionfence_x_whichever_import_comes_first() -> None:
    out = _python(
        """
        from sessionfence.lock import SessionWriteLock, LockInheritedError
        from sessionfence.transcript import SessionManager
        print(SessionWriteLock.__module__, LockInheritedError.__module__, SessionManager.__module__)
        """
    )
    assert out.split() == ["sessionfence"] * 3


def test_lazily_exported_instances_unpickle_in_a_fresh_process(tmp_path: Path) -> None:
    # A LockInfo pickled by one process is found as sessionfence.LockInfo by another that
    # has imported nothing: pickle's lookup goes through the package's lazy __getattr__.
    transcript = tmp_path / "s.jsonl"
    data = _python(
        f"""
        import pickle, sys, sessionfence
        info = sessionfence.inspect_lock({str(transcript)!r})
        sys.stdout.write(pickle.dumps(info, 0).decode("ascii"))
        """
    )
    assert "sessionfence\nLockInfo" in data
    shown = _python(
        f"""
        import pickle
        info = pickle.loads({data.encode("ascii")!r})
        print(type(info).__module__, type(info).__name__, info.held)
        """
    )
    assert shown.split() == ["sessionfence", "LockInfo", "False"]
