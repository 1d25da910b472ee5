"""Fixtures for the service tests: a real PostgreSQL server, a uvicorn server on loopback,
small model directories and a small labelled pool of real triplets."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


@pytest.fixture(scope="session")
def pg_server():
    """A throw-away PostgreSQL server on 127.0.0.1 (yields a URL prefix without the dbname)."""
    bindir = _pg_bin()
    if bindir is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) not installed: apt-get install postgresql"
        if os.environ.get("ASTRID_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    # initdb refuses to run as root; run the server as the postgres system user then.
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root and runuser is missing: cannot start PostgreSQL")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="astrid-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if as_user:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U",
                    "astrid", "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60",
                    "-l", str(root / "log"), "-o",
                    f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
                    " -c max_connections=200", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://astrid@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the test server."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{pg_server}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """The same tests against both engines."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'labels.db'}"
    return request.getfixturevalue("pg_url")


class LiveServer:
    """uvicorn serving an app in a background thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_model_dir(path: Path, *, seed: int = 0, stamp_size: int = 21,
                   widths: tuple[int, int, int] = (4, 8, 8), net=None) -> Path:
    """A complete small model directory (model.pt, model.json, model.onnx) through the
    project's own save and export functions; untrained unless ``net`` is given."""
    import torch

    from astrid.ml.export import write_model_dir
    from astrid.ml.models import architecture_record, build_model

    arch = architecture_record("astrid", stamp_size, widths=list(widths))
    if net is None:
        torch.manual_seed(seed)
        net = build_model("astrid", stamp_size, widths=list(widths)).eval()
    write_model_dir(path, net, arch, stamp_size=stamp_size, metrics={})
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def ztf_triplets(shared_data):
    """Real ZTF triplets (fink-client alerts), their candids and metadata."""
    import numpy as np
    import pandas as pd

    folder = shared_data("ztf-alerts", "fink-client")
    with np.load(folder / "fink-client_triplets.npz") as npz:
        stamps = np.stack([npz["sci"], npz["ref"], npz["diff"]], axis=1).astype(np.float32)
        candid = npz["candid"].astype(np.int64)
    meta = pd.read_csv(folder / "fink-client_meta.csv")
    return stamps, candid, meta


@pytest.fixture(scope="session")
def live_server():
    """``with live_server(app) as server:`` serves ``app`` on ``server.url`` (loopback)."""
    return LiveServer


@pytest.fixture(scope="session")
def model_factory():
    """``model_factory(path, seed=..., net=...)`` writes a small model directory."""
    return make_model_dir
