"""``sessionfence bench``: every measure reported, bad input refused. Never asserts timings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sessionfence.bench import _suite as benchsuite
from sessionfence.cli import main

MEASURE_IDS = ("P1", "P2", "P3", "P4", "P5", "P6")


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny run in a subprocess, shared by the tests that only read its JSON."""
    work = tmp_path_factory.mktemp("bench")
    capture = subprocess.run(
        [sys.executable, "-m", "sessionfence", "bench", "--tiny", "--json", "--dir", str(work)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert capture.returncode == 0, capture.stderr
    data: dict[str, Any] = json.loads(capture.stdout)
    data["_workdir"] = str(work)
    return data


def test_every_measure_has_a_numeric_ratio_and_target(report: dict[str, Any]) -> None:
    seen = {m["id"] for m in report["measures"]}
    assert set(MEASURE_IDS) <= seen
    for m in report["measures"]:
        assert isinstance(m["ratio"], float)
        assert m["ratio"] > 0
        assert m["target"]["op"] in ("<=", ">=")
        assert isinstance(m["target"]["value"], (int, float))
        assert isinstance(m["passed"], bool)
        assert m["ratio_of"]


def test_p4_reports_both_cases(report: dict[str, Any]) -> None:
    cases = {m["case"] for m in report["measures"] if m["id"] == "P4"}
    assert cases == {"fingerprint", "fingerprint_many"}


def test_all_three_paths_appear(report: dict[str, Any]) -> None:
    by_id = {m["id"]: m for m in report["measures"]}
    assert {"naive", "python", "cffi"} <= set(by_id["P2"]["figures"])
    for m in report["measures"]:
        assert {"python", "cffi"} <= set(m["figures"])


def test_run_metadata_says_how_it_was_measured(report: dict[str, Any]) -> None:
    assert report["profile"] == "tiny"
    assert "warm" in report["page_cache"]
    assert "median" in report["statistic"]


def test_scratch_files_are_removed(report: dict[str, Any]) -> None:
    assert list(Path(report["_workdir"]).iterdir()) == []


def test_table_lists_the_measures_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "--tiny", "--dir", str(tmp_path), "--only", "P1,P3")
    assert code == 0
    rows = re.findall(r"^\W*(P\d)\b", out, re.MULTILINE)  # rich ("│ P1 │") or plain rows
    assert sorted(set(rows)) == ["P1", "P3"]
    assert "target" in out and "ratio" in out


def test_only_selects_measures_case_insensitively(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run_cli(capsys, "--tiny", "--json", "--dir", str(tmp_path), "--only", "p6, P1")
    assert code == 0
    assert [m["id"] for m in json.loads(out)["measures"]] == ["P1", "P6"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--rounds", "zero"], "--rounds"),
        (["--rounds", "0"], "--rounds"),
        (["--rounds", "-3"], "--rounds"),
        (["--dir", "/nonexistent/sessionfence-bench"], "no such directory"),
        (["--dir", __file__], "not a directory"),
        (["--only", "P9"], "unknown measure"),
        (["--only", ","], "unknown measure"),
        (["--chart", "/nonexistent/dir/chart.png"], "does not exist"),
        (["--chart", "chart.txt"], ".png"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    code, _out, err = run_cli(capsys, "--tiny", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sessionfence bench: error:")
    assert fragment in lines[0]
    assert "Traceback" not in err


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sessionfence", "bench", "--dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_chart_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # an optional extra; everything else runs without it
    chart = tmp_path / "cost.png"
    code, out, _ = run_cli(capsys, "--tiny", "--only", "P1", "--chart", str(chart))
    assert code == 0
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert str(chart) in out


def test_chart_without_matplotlib_says_what_to_install(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    code, _, err = run_cli(capsys, "--tiny", "--chart", str(tmp_path / "c.png"))
    assert code == 2
    assert 'pip install "sessionfence[cli]"' in err
    assert len(err.strip().splitlines()) == 1


def test_plain_table_without_rich(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    code, out, _ = run_cli(capsys, "--tiny", "--dir", str(tmp_path), "--only", "P3")
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("id "))
    assert "ratio" in header and "target" in header


def test_a_new_measure_registers_itself(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # How P7 (the controller) plugs in: a decorated function, nothing else to edit.
    monkeypatch.setattr(benchsuite, "MEASURES", dict(benchsuite.MEASURES))

    def stub(mid: str) -> None:
        @benchsuite.measure(mid, f"stub {mid}")
        def run(bench: benchsuite.Bench) -> list[benchsuite.Result]:
            target = benchsuite.Target("<=", 1.5)
            return [benchsuite.Result(mid, "stub", "stub", 1.0, "a ÷ b", target)]

    stub("P7")
    stub("P2c")
    code, out, _ = run_cli(capsys, "--tiny", "--json", "--dir", str(tmp_path), "--only", "p7,P2C")
    assert code == 0
    measures = json.loads(out)["measures"]
    assert [m["id"] for m in measures] == ["P2c", "P7"]  # registry order, not --only order
    assert all(m["passed"] is True for m in measures)


def test_without_the_c_backend_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(benchsuite, "_load_cffi", lambda: None)
    code, _, err = run_cli(capsys, "--tiny", "--dir", str(tmp_path))
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "C backend" in err
    assert list(tmp_path.iterdir()) == []  # the scratch directory went away too
