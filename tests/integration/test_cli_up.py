"""`vapora up` as a user runs it: a new data directory, the embedded server on a free port,
every actor ready, a request answered, SIGTERM drains and exits 0; offline commands on a
directory without data say so."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

from tests.fault.provider_harness import KEYS, config_text
from vapora.cli.demo import SIMULATED_KEYS, demo_config_text

VAPORA = [sys.executable, "-m", "vapora.cli"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``vapora ARGS`` to its end, its output captured."""
    return subprocess.run(
        [*VAPORA, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


@contextlib.contextmanager
def simulator() -> Iterator[str]:
    """`vapora simulate` on a free port, for the block: its base URL."""
    sim = subprocess.Popen([*VAPORA, "simulate", "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        yield sim.stdout.readline().split()[-1]
    finally:
        sim.terminate()
        sim.wait()


def start_up(config: Path, data_dir: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """`vapora up` on a free port; its first line is `vapora ready <url>`."""
    return subprocess.Popen(
        [*VAPORA, "up", "--config", str(config), "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_up_in_a_new_data_dir_serves_and_stops_cleanly(tmp_path: Path) -> None:
    with simulator() as base_url:
        config = tmp_path / "vapora.toml"
        config.write_text(demo_config_text(base_url, 100_000))
        env = {**os.environ, **SIMULATED_KEYS}
        up = start_up(config, tmp_path / "new", env)
        try:
            assert up.stdout is not None
            ready = up.stdout.readline().split()
            assert ready[:2] == ["vapora", "ready"], ready
            ask = run(
                "ask", "hello there", "--nats-url", ready[2], "--provider", "ollama", "--json"
            )
            assert ask.returncode == 0, ask.stderr
            assert json.loads(ask.stdout)["provider"] == "ollama"
            _same_directory_while_up(tmp_path / "new", ready[2], env)
        finally:
            up.send_signal(signal.SIGTERM)
            code = up.wait(timeout=60)
            assert up.stderr is not None
            stderr = up.stderr.read()
    assert code == 0
    # The stop is said, when it starts and when it is done (its last line was "nats:
    # disconnected").
    assert "SIGTERM: stopping (requests in flight drain" in stderr and "stopped in" in stderr


def test_up_started_again_after_a_sigkill_replaces_the_server_it_left(tmp_path: Path) -> None:
    # A SIGKILLed `up` (the OOM killer) leaves its nats-server running with the directory's
    # lock; the next `up` was refused for good ("in use by a running vapora (pid N)", a dead
    # pid), so a supervisor restarted it in a loop until someone killed that server.
    with simulator() as base_url:
        config = tmp_path / "vapora.toml"
        config.write_text(demo_config_text(base_url, 100_000))
        env = {**os.environ, **SIMULATED_KEYS}
        first = start_up(config, tmp_path / "d", env)
        assert first.stdout is not None
        assert first.stdout.readline().split()[:2] == ["vapora", "ready"]
        first.kill()
        first.wait()
        second = start_up(config, tmp_path / "d", env)
        try:
            assert second.stdout is not None
            ready = second.stdout.readline().split()
            assert ready[:2] == ["vapora", "ready"], second.stderr and second.stderr.read()
            ask = run("ask", "after", "--nats-url", ready[2], "--provider", "ollama", "--json")
            assert ask.returncode == 0, ask.stderr
        finally:
            second.send_signal(signal.SIGTERM)
            code = second.wait(timeout=60)
            assert second.stderr is not None
            stderr = second.stderr.read()
    assert code == 0, stderr
    assert "is gone: stopping its server and starting again" in stderr


def _same_directory_while_up(data_dir: Path, url: str, env: dict[str, str]) -> None:
    """A second `up` on a served directory is refused naming the first; the read-only commands
    read it through the running server instead of starting a second one on its store."""
    server_log = (data_dir / "nats" / "nats-server.log").read_bytes()
    second = run("up", "--port", "0", "--data-dir", str(data_dir), env=env)
    assert second.returncode == 2, second.stderr
    assert "in use by a running vapora (pid" in second.stderr and url in second.stderr
    events = run("events", "--data-dir", str(data_dir), "--type", "call_succeeded", env=env)
    assert events.returncode == 0, events.stderr
    assert json.loads(events.stdout.splitlines()[0])["provider"] == "ollama"
    # The budget of a served directory is its running keeper's: the deployment's limits (its
    # config, $1,000 a day, is not in the directory), not the built-in ones folded offline.
    budget = run("budget", "--data-dir", str(data_dir), "--json", env=env)
    assert budget.returncode == 0, budget.stderr
    assert Decimal(json.loads(budget.stdout)["daily_limit_usd"]) == Decimal(1000)
    assert "its budget keeper answered" in budget.stderr
    assert (data_dir / "nats" / "nats-server.log").read_bytes().startswith(server_log)


def test_offline_commands_on_a_directory_without_data_say_so(tmp_path: Path) -> None:
    done = run("events", "--data-dir", str(tmp_path))
    assert done.returncode == 2
    assert "holds no vapora data" in done.stderr


def test_storage_replicas_reaches_the_stream_and_readers_make_no_stream(tmp_path: Path) -> None:
    """`[storage] replicas` was validated and then never used: the stream was made with one
    replica whatever it said. On a single server two replicas are refused, and said so; and a
    command that only reads (here on the directory that start left) makes no stream."""
    config = tmp_path / "vapora.toml"
    text = (Path(__file__).resolve().parents[2] / "vapora" / "default.toml").read_text()
    config.write_text(text.replace('sync_interval = "1s"', 'sync_interval = "1s"\nreplicas = 2'))
    up = run("up", "--config", str(config), "--port", "0", "--data-dir", str(tmp_path / "d"))
    assert up.returncode == 1, up.stderr
    assert "refused the event stream VAPORA_EVENTS with 2 replica(s)" in up.stderr
    assert "Traceback" not in up.stderr
    events = run("events", "--data-dir", str(tmp_path / "d"))
    assert events.returncode == 1, events.stderr
    assert "no event stream VAPORA_EVENTS on nats://" in events.stderr


def test_out_of_range_numbers_on_the_command_line_are_named(tmp_path: Path) -> None:
    """They were a traceback (`up --port 99999`) or a silent empty run (`demo --requests -5`)."""
    for argv, said in (
        (["up", "--port", "99999", "--data-dir", str(tmp_path)], "--port: must be a port"),
        (["up", "--port", "many"], "--port: not a whole number: 'many'"),
        (["demo", "--requests", "-5", "--data-dir", str(tmp_path / "d")], "--requests: must be"),
    ):
        done = run(*argv)
        assert done.returncode == 2, argv
        assert said in done.stderr
        assert "Traceback" not in done.stderr


def test_a_metrics_port_that_cannot_be_served_is_named(tmp_path: Path) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = tmp_path / "vapora.toml"
    telemetry = f'enabled = true\nprometheus_port = {port}\nprometheus_host = "127.0.0.1"\n'
    config.write_text(
        demo_config_text("http://127.0.0.1:9", 100_000) + "\n[telemetry]\n" + telemetry
    )
    try:
        env = {**os.environ, **SIMULATED_KEYS}
        done = run(
            "up", "--config", str(config), "--port", "0", "--data-dir", str(tmp_path), env=env
        )
    finally:
        taken.close()
    assert done.returncode == 2
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_task_types_and_event_types_are_bad_usage_before_any_connection() -> None:
    """Both connected first (15 s when NATS is down) and exited 1."""
    for argv, said in (
        (["ask", "hi", "--task-type", "Bogus"], "--task-type: invalid choice: 'Bogus'"),
        (["events", "--type", "bogus"], "--type: invalid choice: 'bogus'"),
        # online the ledger refused it (exit 1); offline it was an empty report (exit 0)
        (
            ["report", "--since", "2030-01-01", "--until", "2020-01-01"],
            "--since must not be after --until",
        ),
        # its UTC time is before the year 1: an OverflowError's traceback before
        (
            ["report", "--since", "0001-01-01T00:00:00+01:00"],
            "is outside the years 1 to 9999 once in UTC",
        ),
        # a traceback after reading the whole log, before
        (["report", "--html", "/no/such/dir/page.html"], "no directory /no/such/dir"),
        (["report", "--html", "/tmp"], "/tmp is a directory"),
        # with a URL configured no server is started: the port was silently ignored
        (["up", "--port", "4333"], "--port is the embedded nats-server's port"),
    ):
        done = run(*argv, "--nats-url", "nats://127.0.0.1:1", timeout=30)
        assert done.returncode == 2, argv
        assert said in done.stderr


def test_a_second_sigterm_stops_hard_recording_the_cut_call_and_answering_its_caller(
    tmp_path: Path,
) -> None:
    """A second SIGTERM during the stop used to kill `vapora up` outright: the call in flight
    left no record, its caller never got an answer, and the embedded nats-server was orphaned
    (holding the data directory). Now it cuts the call the way a drain deadline does."""
    data_dir = tmp_path / "d"
    with simulator() as base_url:
        config = tmp_path / "vapora.toml"
        slow = {"ollama": "llama2-slow-20000"}
        config.write_text(config_text(base_url, models=slow))
        up = start_up(config, data_dir, {**os.environ, **KEYS})
        try:
            assert up.stdout is not None
            url = up.stdout.readline().split()[2]
            ask = subprocess.Popen(
                [*VAPORA, "ask", "hi", "--provider", "ollama", "--nats-url", url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 30
            while not _events(["--nats-url", url, "--type", "route_decided"]):
                assert time.monotonic() < deadline, "the task never started"
                time.sleep(0.1)
            time.sleep(0.5)  # the provider call is under way (it takes 20 s)
            up.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            up.send_signal(signal.SIGTERM)
            code = up.wait(timeout=60)
            _, asked = ask.communicate(timeout=60)
        finally:
            if up.poll() is None:
                up.kill()
    assert code == 0, up.stderr.read() if up.stderr else ""
    assert ask.returncode == 1 and "stopped before this request finished" in asked, asked
    # The server went with the process (the directory opens offline), and the cut call is there.
    [cut] = _events(["--data-dir", str(data_dir), "--type", "call_failed"])
    assert (cut["provider"], cut["error_class"]) == ("ollama", "cancelled")


def _events(flags: list[str]) -> list[dict[str, object]]:
    done = run("events", *flags)
    assert done.returncode in (0, 1), done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_an_actor_that_cannot_start_is_named_not_a_traceback(tmp_path: Path) -> None:
    """An actor's start failing inside the group that runs them all came out as an exception
    group's traceback; it is said like any other error of its kind."""
    (tmp_path / "ledger.sqlite3").write_bytes(b"not a database at all, just bytes\n")
    up = run("up", "--port", "0", "--data-dir", str(tmp_path))
    assert up.returncode == 2, up.stderr
    assert "Traceback" not in up.stderr
    assert f"vapora up: {tmp_path / 'ledger.sqlite3'} is not a ledger" in up.stderr


def test_stream_makes_the_event_stream_that_reading_commands_then_find(tmp_path: Path) -> None:
    """The reading commands leave the stream alone; `vapora stream` is the admin's way to make
    it or bring its settings up to date (docs/operations-cluster.md)."""
    (tmp_path / "nats").mkdir()
    before = run("events", "--data-dir", str(tmp_path))
    assert before.returncode == 1 and "no event stream VAPORA_EVENTS" in before.stderr
    made = run("stream", "--data-dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    first, settings = made.stdout.splitlines()
    assert first == "made stream VAPORA_EVENTS"
    assert settings.startswith("stream VAPORA_EVENTS: subjects vapora.events.>; 1 replica(s)")
    assert "deny delete True, deny purge True" in made.stdout
    after = run("events", "--data-dir", str(tmp_path))
    assert after.returncode == 0, after.stderr


def test_a_data_directory_or_output_that_is_a_file_and_a_host_that_is_none_are_named(
    tmp_path: Path,
) -> None:
    # Tracebacks before (NotADirectoryError, FileExistsError, an exception group).
    afile = tmp_path / "afile"
    afile.write_text("")
    up = run("up", "--data-dir", str(afile), "--port", "0")
    assert up.returncode == 2 and f"--data-dir {afile} is not a directory" in up.stderr
    deploy = subprocess.run(
        [sys.executable, "-m", "vapora.deploy", "--out", str(afile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert deploy.returncode == 2 and f"--out {afile} is not a directory" in deploy.stderr
    sim = run("simulate", "--host", "999.1.1.1", "--port", "0")
    assert sim.returncode == 1 and "cannot serve on 999.1.1.1:0" in sim.stderr
    for result in (up, deploy, sim):
        assert "Traceback" not in result.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    # `vapora events | head -3` printed a BrokenPipeError traceback; an async command's, once
    # wrapped in the exception group of the task group that hears SIGTERM, exited 1 saying it.
    sync = (
        "import sys, vapora.cli as cli\n"
        "def config(args):\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "cli.cmd_config = config\n"
        "sys.exit(cli.main(['config']))\n"
    )
    run_async = (
        "import sys, vapora.cli as cli\n"
        "async def budget(args):\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "cli._ASYNC['budget'] = budget\n"
        "sys.exit(cli.main(['budget']))\n"
    )
    for code in (sync, run_async):
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )
        assert (result.returncode, result.stderr) == (141, ""), result.stderr
    # Beside another error, that error is still said (it was hidden by the quiet exit).
    mixed = run_async.replace(
        "    raise BrokenPipeError(32, 'Broken pipe')\n",
        "    from vapora.errors import ConfigError\n"
        "    raise ExceptionGroup('g', [BrokenPipeError(32, 'pipe'), ConfigError('bad config')])\n",
    )
    result = subprocess.run(
        [sys.executable, "-c", mixed], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stderr) == (2, "vapora budget: bad config\n")


def test_an_option_the_actor_does_not_take_is_refused() -> None:
    # `vapora actor router --provider claude` ran a router, the option silently dropped.
    result = run("actor", "router", "--provider", "claude")
    assert result.returncode == 2 and "--provider names the provider of a provider actor" in (
        result.stderr
    )


def test_a_provider_actor_without_a_known_provider_is_refused_before_any_connection() -> None:
    # With no server to connect to, these waited 15 s and then named the connection, not the
    # missing or unknown --provider.
    env = {**os.environ, "VAPORA_NATS_URL": "nats://127.0.0.1:9"}  # nothing listens there
    missing = run("actor", "provider", env=env, timeout=10)
    unknown = run("actor", "provider", "--provider", "nope", env=env, timeout=10)
    assert missing.returncode == 2 and "needs --provider NAME" in missing.stderr
    assert unknown.returncode == 2 and "unknown provider 'nope'; configured:" in unknown.stderr
    assert "cannot connect" not in missing.stderr + unknown.stderr


def test_sigterm_stops_an_offline_follow_and_the_server_it_started(tmp_path: Path) -> None:
    """SIGTERM killed `vapora events --follow --data-dir D` (and `vapora demo`) at once: the
    nats-server it had started ran on, holding the directory's lock, so the next offline
    command on D was refused as if another were running."""
    (tmp_path / "nats").mkdir()
    assert run("stream", "--data-dir", str(tmp_path)).returncode == 0
    follow = subprocess.Popen(
        [*VAPORA, "events", "--data-dir", str(tmp_path), "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = tmp_path / "nats" / "server.lock"  # names the server's pid and its command's
    deadline = time.monotonic() + 30
    while _holder(lock).get("pid") != follow.pid or not _holder(lock).get("server_pid"):
        assert follow.poll() is None and time.monotonic() < deadline, follow.stderr
        time.sleep(0.1)
    server_pid = int(_holder(lock)["server_pid"])
    time.sleep(0.5)  # following
    follow.send_signal(signal.SIGTERM)
    _, stderr = follow.communicate(timeout=30)
    assert follow.returncode == 143 and "Traceback" not in stderr, stderr
    deadline = time.monotonic() + 10
    while _alive(server_pid):
        assert time.monotonic() < deadline, f"nats-server {server_pid} outlived its command"
        time.sleep(0.1)
    again = run("events", "--data-dir", str(tmp_path))
    assert again.returncode == 0, again.stderr


def _holder(lock: Path) -> dict[str, object]:
    try:
        return dict(json.loads(lock.read_text()))
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().split(") ")[-1].startswith("Z"))


def test_empty_flags_bad_waits_and_unusable_outputs_are_named_not_defaults_or_tracebacks(
    tmp_path: Path,
) -> None:
    """An empty flag was taken as not given (`up --data-dir ""` ran on ./.vapora, `--config ""`
    on the built-in config); `health --timeout -1` blamed a healthy server; `config /dev/zero`
    read until memory ran out; `report --html F --json` dropped --json; a full output and a
    data directory that cannot be made were tracebacks; a demo of 10^11 requests ran out of
    memory before its first."""
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00schema")
    for argv, said, code in (
        (["up", "--data-dir", ""], "--data-dir: must not be empty", 2),
        (["ask", "hi", "--config", ""], "--config: must not be empty", 2),
        (["ask", "hi", "--nats-url", " "], "--nats-url: must not be empty", 2),
        (["health", "--timeout", "-1"], "--timeout: must be more than 0", 2),
        (["health", "--timeout", "nan"], "--timeout: must be more than 0", 2),
        (["health", "--service", ""], "--service: must not be empty", 2),
        (["config", "/dev/zero"], "larger than 1 MiB: not a config file", 2),
        (["report", "--html", "f.html", "--json"], "not allowed with argument", 2),
        (["demo", "--requests", "100000000000"], "--requests: at most 1,000,000", 2),
        (["up", "--port", "0", "--data-dir", "/proc/vapora"], "/proc/vapora", 1),
        (["simulate", "--latency-ms", "-10"], "--latency-ms: must be 0 to", 2),
        (["simulate", "--host", ""], "--host: must not be empty", 2),
        (["schema", "--check", "--out", str(tmp_path / "none.json")], "is missing", 1),
        # Found in a review: each was a traceback, a default, or a wait for NATS first.
        (["config", ""], "argument file: must not be empty", 2),
        (["schema", "--out", str(tmp_path)], f"cannot write {tmp_path}: Is a directory", 1),
        (["schema", "--out", ""], "--out: must not be empty", 2),
        (["schema", "--check", "--out", str(binary)], "not UTF-8 text", 1),
        (["ask", "", "--nats-url", "nats://127.0.0.1:1"], "`prompt` must hold some text", 1),
        (
            ["ask", "hi", "--budget-cents", "1e400", "--nats-url", "nats://127.0.0.1:1"],
            "`budget_cents` must be a finite",
            1,
        ),
        (["health", "--service", "a b"], "'a b' is not a service name", 2),
        (["health", "--service", ">"], "'>' is not a service name", 2),
    ):
        done = run(*argv, timeout=30)
        assert (done.returncode, "Traceback" in done.stderr) == (code, False), (argv, done.stderr)
        assert said in done.stderr, (argv, done.stderr)
    # Written as it goes (unbuffered) or at the end (buffered: CI's): said either way.
    for unbuffered in ("1", ""):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        if unbuffered:
            env["PYTHONUNBUFFERED"] = unbuffered
        full = subprocess.run(
            f"{sys.executable} -m vapora.cli config > /dev/full",
            shell=True,
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        assert full.returncode == 1 and "No space left on device" in full.stderr, full.stderr
        assert "Traceback" not in full.stderr and "Exception ignored" not in full.stderr


def test_services_say_where_they_connect_before_waiting_for_the_server(tmp_path: Path) -> None:
    """A service gives its server 15 s (it may be started with it): `vapora up --nats-url`
    waited without a word, though the README says it says first where it connects."""
    data = str(tmp_path / "d")
    for argv in (["up"], ["actor", "router"]):
        service = subprocess.Popen(
            [*VAPORA, *argv, "--nats-url", "nats://u:secret@127.0.0.1:1", "--data-dir", data],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert service.stderr is not None
            line = service.stderr.readline()  # (before the wait: a test that hangs fails)
            assert "connecting to NATS at nats://u:***@127.0.0.1:1 (up to 15 s)" in line, line
            assert "secret" not in line
        finally:
            service.kill()
            service.wait()


def test_tls_without_a_nats_url_is_refused_before_the_embedded_server_starts(
    tmp_path: Path,
) -> None:
    """``[nats.tls]`` with no URL passed ``vapora config`` and then failed every start with
    "NATS ... refused the connection: the server does not require TLS": vapora's own client
    refusing vapora's own embedded server, said as the server's doing."""
    config = tmp_path / "tls.toml"
    tls = '[nats.tls]\nca = "/etc/ssl/certs/ca-certificates.crt"\n'
    config.write_text(config_text("http://127.0.0.1:1", budget="") + tls)
    checked = run("config", str(config))
    assert checked.returncode == 0 and "for a NATS URL only" in checked.stdout
    data = str(tmp_path / "d")
    (tmp_path / "d" / "nats").mkdir(parents=True)  # (an offline command reads a store)
    for argv in (["up", "--port", "1"], ["events", "--data-dir", data]):
        done = run(
            *argv, "--config", str(config), *(["--data-dir", data] if argv[0] == "up" else [])
        )
        assert done.returncode == 2, (argv, done.stderr)
        assert "[nats.tls] is set but no NATS URL is" in done.stderr, done.stderr
