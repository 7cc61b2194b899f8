"""Without psycopg: making a PostgreSQL store fails with the documented error (how to
install it), while ``import sessionfence``, the file store and the CLI's other paths keep
working. Each case runs a child interpreter in which importing psycopg fails, as it does
where the ``postgres`` extra is not installed (``sys.modules['psycopg'] = None`` makes
``import psycopg`` raise ImportError)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HINT = "pip install 'sessionfence[postgres]'"

_BLOCK = "import sys; sys.modules['psycopg'] = None\n"


def _child(code: str, tmp_path: Path) -> dict[str, object]:
    """Run ``code`` (which prints one JSON object last) without psycopg."""
    out = subprocess.run(
        [sys.executable, "-c", _BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_postgres_store_says_how_to_install_psycopg(tmp_path: Path) -> None:
    result = _child(
        """
        import json
        try:
            import psycopg  # noqa: F401
            blocked = False
        except ImportError:
            blocked = True
        import sessionfence
        from sessionfence.store import AsyncPostgresStore, PostgresStore, open_store
        errors = {}
        for name, make in (
            ("PostgresStore", lambda: PostgresStore("postgresql://nobody@127.0.0.1:1/x")),
            ("AsyncPostgresStore", lambda: AsyncPostgresStore("postgresql://127.0.0.1:1/x")),
            ("open_store", lambda: open_store("postgresql://127.0.0.1:1/x")),
        ):
            try:
                make()
                errors[name] = None
            except ImportError as exc:
                errors[name] = str(exc)
        print(json.dumps({"blocked": blocked, "errors": errors,
                          "backend": str(sessionfence.BACKEND)}))
        """,
        tmp_path,
    )
    assert result["blocked"] is True
    errors = result["errors"]
    assert isinstance(errors, dict)
    for name, message in errors.items():
        assert message is not None, f"{name} was made without psycopg"
        assert HINT in message, message
        assert "psycopg 3" in message


def test_file_store_works_without_psycopg(tmp_path: Path) -> None:
    result = _child(
        f"""
        import asyncio, json
        from sessionfence import SessionSupersededError
        from sessionfence.store import FileStore
        store = FileStore({str(tmp_path / "sessions")!r})
        store.create_session("s1")
        msg = {{"type": "message", "message": {{"role": "user", "content": "hi"}}}}
        async def main():
            fence = await store.open_fence("s1", run_id="a")
            try:
                await fence.append(msg, idempotency_key="t1")
                await fence.release_for_prompt()
                store.append_as_cotenant("s1", msg, writer="gateway", idempotency_key="g1")
                await fence.reacquire_after_prompt()
                await fence.release_for_prompt()
                store.claim("s1", run_id="b")
                try:
                    await fence.append(msg)
                    return "not refused"
                except SessionSupersededError:
                    return "refused"
            finally:
                await fence.dispose()
        late = asyncio.run(main())
        loaded = sys.modules.get("psycopg") is not None
        print(json.dumps({{"late": late, "lines": len(store.read_lines("s1")),
                          "psycopg": loaded}}))
        """,
        tmp_path,
    )
    assert result == {"late": "refused", "lines": 3, "psycopg": False}


def test_fleet_cli_without_psycopg_exits_2_with_the_hint(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-m", "sessionfence", "fleet", "--store", "postgresql", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert HINT in out.stderr
    assert out.stdout == ""
