"""A throwaway PostgreSQL server: ``initdb`` + ``pg_ctl`` in a temporary directory.

Used by the tests, by ``sessionfence fleet --store postgresql`` and by the benchmarks. The
server binaries are found through ``SESSIONFENCE_PG_BINDIR``, ``pg_config --bindir``, the
Debian layout (``/usr/lib/postgresql/<major>/bin``, highest major first) or ``initdb`` on
``PATH``. As root the server runs as the ``postgres`` user (PostgreSQL refuses to run as
root); the data directory is then owned by that user. It listens on 127.0.0.1 on a free
port and on a Unix socket in its own directory (and on more addresses when asked, such as
the host ends of the fleet's veth links); authentication is ``trust`` for localhost and the
networks it is given (reachable only from this host, and removed after the run).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from typing import Any

__all__ = ["PostgresBinariesMissing", "TempPostgres", "find_pg_bindir"]


class PostgresBinariesMissing(RuntimeError):
    """No PostgreSQL server binaries (``initdb``, ``pg_ctl``) were found."""


def find_pg_bindir() -> str | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None."""
    candidates: list[str] = []
    env = os.environ.get("SESSIONFENCE_PG_BINDIR")
    if env:
        candidates.append(env)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(out.stdout.strip())

    def major(path: str) -> float:
        try:
            return float(path.split("/")[-2])
        except ValueError:
            return 0.0

    candidates.extend(sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(initdb))
    for bindir in candidates:
        if all(os.access(os.path.join(bindir, b), os.X_OK) for b in ("initdb", "pg_ctl")):
            return bindir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TempPostgres:
    """A PostgreSQL server in a temporary directory; ``start()``, ``url``, ``restart()``,
    ``stop()`` (which removes the directory). Also a context manager.

    ``durable=False`` runs with ``fsync=off`` (tests and benchmarks: a fast shutdown or a
    restart still loses nothing, only an OS crash could)."""

    def __init__(
        self,
        *,
        bindir: str | None = None,
        durable: bool = True,
        listen: tuple[str, ...] = ("127.0.0.1",),
        trusted_networks: tuple[str, ...] = (),
    ) -> None:
        found = bindir or find_pg_bindir()
        if found is None:
            raise PostgresBinariesMissing(
                "no PostgreSQL server binaries (initdb, pg_ctl) found: install the "
                "'postgresql' package (Debian: apt-get install postgresql) or set "
                "SESSIONFENCE_PG_BINDIR"
            )
        self.bindir = found
        self.durable = durable
        # Addresses it listens on (the first is the one ``url`` names) and networks (CIDR)
        # whose clients it trusts besides localhost: the fleet's hosts in their own network
        # namespaces reach it over veth links.
        self.listen = listen
        self.trusted_networks = trusted_networks
        self.port = 0
        self.base: str | None = None
        self.restarts = 0
        self._user: str | None = None

    @property
    def datadir(self) -> str:
        assert self.base is not None
        return os.path.join(self.base, "data")

    @property
    def sockdir(self) -> str:
        assert self.base is not None
        return os.path.join(self.base, "sock")

    @property
    def url(self) -> str:
        return self.url_for(self.listen[0])

    def url_for(self, address: str) -> str:
        """The URL of the server at one of the addresses it listens on."""
        return f"postgresql://postgres@{address}:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120.0) -> None:
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            kwargs["user"] = self._user
        proc = subprocess.run(
            [os.path.join(self.bindir, args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base,
            **kwargs,
        )
        if proc.returncode != 0:
            log = ""
            with contextlib.suppress(OSError), open(os.path.join(self.base or "", "log")) as f:
                log = f.read()[-2000:]
            raise RuntimeError(
                f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip()}\n{log}".strip()
            )

    def start(self) -> TempPostgres:
        self.base = tempfile.mkdtemp(prefix="sessionfence-pg-")
        os.makedirs(self.sockdir)
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            import pwd

            try:
                entry = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PostgresBinariesMissing(
                    "running as root needs a 'postgres' user to run the server as"
                ) from exc
            self._user = "postgres"
            for path in (self.base, self.sockdir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb", "-D", self.datadir, "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--no-sync", "--no-instructions",
        )  # fmt: skip
        if self.trusted_networks:
            hba = os.path.join(self.datadir, "pg_hba.conf")
            with open(hba, "a") as f:
                for cidr in self.trusted_networks:
                    f.write(f"host all all {cidr} trust\n")
        self.port = _free_port()
        self._pg_ctl_start()
        return self

    def _options(self) -> str:
        opts = [
            f"-p {self.port}",
            f"-k {self.sockdir}",
            "-c listen_addresses=" + ",".join(self.listen),
            "-c max_connections=200",
            "-c shared_buffers=128MB",
        ]
        if not self.durable:
            opts += ["-c fsync=off", "-c full_page_writes=off"]
        return " ".join(opts)

    def _pg_ctl_start(self) -> None:
        self._run(
            "pg_ctl", "-D", self.datadir, "-l", os.path.join(self.base or "", "log"),
            "-o", self._options(), "-w", "-t", "60", "start",
        )  # fmt: skip

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m MODE``: every connection is dropped, the server comes back
        on the same port with the same data."""
        self._run(
            "pg_ctl", "-D", self.datadir, "-l", os.path.join(self.base or "", "log"),
            "-o", self._options(), "-m", mode, "-w", "-t", "60", "restart",
        )  # fmt: skip
        self.restarts += 1

    def stop(self) -> None:
        """Stop the server (fast) and remove its directory."""
        if self.base is None:
            return
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", self.datadir, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None

    def __enter__(self) -> TempPostgres:
        return self.start() if self.base is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
