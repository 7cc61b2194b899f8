"""What a user gets from the package index: metadata (classifiers, project URLs, licence),
and an sdist that carries the docs, the changelog and its fragments.

The metadata is read from the installed distribution (an editable install reads
pyproject.toml at install time: after changing it, reinstall). The sdist is checked twice:
MANIFEST.in is evaluated over the checkout by setuptools' own file-list rules, and, when
``build`` is importable, a real sdist is built from the checkout's tracked files and its
listing and PKG-INFO are read (``.ci/wheel.sh`` builds one too). The changelog fragments
must all render with towncrier, and a fragment named against the rules must fail it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = (ROOT / "MANIFEST.in").exists() and (ROOT / "pyproject.toml").exists()
needs_checkout = pytest.mark.skipif(
    not CHECKOUT, reason="runs from a source checkout (tests were copied without it)"
)

PYTHONS = ("3.10", "3.11", "3.12", "3.13")
URL = "https://github.com/sessionfence/sessionfence"
URL_LABELS = ("Homepage", "Documentation", "Changelog", "Issues")
# Files the sdist must carry besides the code: what a user reads, and what it is under.
SHIPPED = ("LICENSE", "README.md", "CHANGELOG.md", "changelog.d/README.md")


def _classifiers(meta: importlib.metadata.PackageMetadata) -> set[str]:
    return set(meta.get_all("Classifier") or [])


def _urls(meta: importlib.metadata.PackageMetadata) -> dict[str, str]:
    urls = {}
    for entry in meta.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        urls[label.strip()] = url.strip()
    return urls


def _check_metadata(meta: importlib.metadata.PackageMetadata) -> None:
    classifiers = _classifiers(meta)
    for version in PYTHONS:
        assert f"Programming Language :: Python :: {version}" in classifiers, version
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    for system in ("POSIX :: Linux", "MacOS", "Microsoft :: Windows"):
        assert f"Operating System :: {system}" in classifiers, system
    assert "Typing :: Typed" in classifiers
    # The licence is an SPDX expression (PEP 639); a licence classifier beside it is an
    # error for the build backend, so there must be none.
    assert meta["License-Expression"] == "MIT"
    assert not [c for c in classifiers if c.startswith("License ::")]
    urls = _urls(meta)
    for label in URL_LABELS:
        assert label in urls, f"no {label} project URL: {urls}"
        assert urls[label].startswith(URL), urls[label]
    assert urls["Changelog"].endswith("/CHANGELOG.md")


def test_installed_metadata_has_classifiers_urls_and_licence() -> None:
    meta = importlib.metadata.metadata("sessionfence")
    if not meta.get_all("Project-URL") and CHECKOUT:
        assert "[project.urls]" not in (ROOT / "pyproject.toml").read_text(), (
            "the installed metadata predates pyproject.toml: reinstall (pip install -e .)"
        )
    _check_metadata(meta)


@needs_checkout
def test_manifest_puts_docs_changelog_and_licence_in_the_sdist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # setuptools' own MANIFEST.in rules (graft, include, global-exclude) over the checkout.
    file_list = importlib.import_module("setuptools.command.egg_info").FileList
    monkeypatch.chdir(ROOT)  # FileList works on paths relative to the project
    files = file_list()
    files.allfiles = [os.path.relpath(f, ROOT) for f in _all_files()]
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            files.process_template_line(line)
    selected = {Path(f).as_posix() for f in files.files}
    expected = set(SHIPPED) | _tracked_under("docs") | _tracked_under("changelog.d")
    assert {f for f in expected if f.startswith("docs/")}, "no docs found in the checkout"
    assert expected - selected == set()


def _all_files() -> list[str]:
    """Every file of the checkout, as setuptools' sdist sees it (VCS and venvs aside)."""
    out: list[str] = []
    for top, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d != ".git" and not d.startswith(".venv")]
        out.extend(os.path.join(top, name) for name in names)
    return out


def _tracked_under(folder: str) -> set[str]:
    """The files under ``folder`` in the checkout (bytecode caches aside)."""
    return {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def _git_files() -> list[str] | None:
    if shutil.which("git") is None:
        return None
    done = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=False
    )
    if done.returncode != 0:
        return None
    return [name for name in done.stdout.decode().split("\0") if name]


@needs_checkout
@pytest.mark.skipif(
    importlib.util.find_spec("build") is None,
    reason="`build` is not installed (not in the test extra); .ci/wheel.sh checks the sdist",
)
def test_built_sdist_carries_docs_changelog_licence_and_metadata(tmp_path: Path) -> None:
    tracked = _git_files()
    if tracked is None:
        pytest.skip("not a git checkout: the sdist is built from the tracked files")
    src = tmp_path / "src"
    for name in tracked:
        source = ROOT / name
        if source.is_file():  # tracked but deleted in the work tree: not shipped
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, src / name)
    done = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("sessionfence-*.tar.gz")
    with tarfile.open(sdist) as tar:
        top = sdist.name.removesuffix(".tar.gz")
        names = {n.removeprefix(top + "/") for n in tar.getnames()}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO")
        assert pkg_info is not None
        text = pkg_info.read().decode()
    expected = set(SHIPPED) | {
        n for n in tracked if n.startswith(("docs/", "changelog.d/")) and (ROOT / n).is_file()
    }
    assert {"docs/fleet.md", "docs/platforms.md"} <= expected
    assert expected - names == set()
    from email.parser import Parser

    _check_metadata(Parser().parsestr(text))  # type: ignore[arg-type]


def _fragments() -> list[Path]:
    return sorted(
        p
        for p in (ROOT / "changelog.d").iterdir()
        if p.is_file() and p.name not in ("README.md", "template.md.jinja")
    )


def _towncrier(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "towncrier", "build", "--draft", "--version", "9.9.9", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


needs_towncrier = pytest.mark.skipif(
    importlib.util.find_spec("towncrier") is None,
    reason="towncrier is in the dev extra (pip install -e '.[dev]')",
)


@needs_checkout
@needs_towncrier
def test_every_fragment_renders_in_the_draft_changelog() -> None:
    fragments = _fragments()
    assert fragments, "no fragments in changelog.d/"
    done = _towncrier(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    draft = done.stdout
    for fragment in fragments:
        first_line = fragment.read_text(encoding="utf-8").splitlines()[0].strip()
        assert first_line in draft, f"{fragment.name} is missing from the draft"
        issue = fragment.name.split("-", 1)[0]
        assert f"(issue {issue})" in draft


@needs_checkout
@needs_towncrier
@pytest.mark.parametrize(
    "name", ["12-something.change.md", "twelve-something.fix.md", "12.fix.md", "12_x.fix.md"]
)
def test_a_fragment_named_against_the_rules_fails_the_build(tmp_path: Path, name: str) -> None:
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy2(ROOT / "CHANGELOG.md", tmp_path / "CHANGELOG.md")
    shutil.copytree(ROOT / "changelog.d", tmp_path / "changelog.d")
    assert _towncrier(tmp_path).returncode == 0
    (tmp_path / "changelog.d" / name).write_text("A change.\n")
    done = _towncrier(tmp_path)
    assert done.returncode != 0, f"{name} was accepted (or silently left out)"


@needs_checkout
def test_changelog_has_the_towncrier_start_marker_and_fragment_guide() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "<!-- towncrier release notes start -->\n" in changelog
    assert 'start_string = "<!-- towncrier release notes start -->\\n"' in (
        ROOT / "pyproject.toml"
    ).read_text(encoding="utf-8")
    guide = (ROOT / "changelog.d" / "README.md").read_text(encoding="utf-8")
    for kind in ("breaking", "deprecation", "feature", "fix", "doc", "misc"):
        assert f"`{kind}`" in guide, kind
    assert "CHANGELOG.md" in (ROOT / "README.md").read_text(encoding="utf-8")
