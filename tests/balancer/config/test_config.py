"""balancer.config: flags vs TOML, validation messages, and the CLI's exit on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from balancer.config import (
    BackendSpec,
    Config,
    ConfigError,
    from_args,
    load_toml,
    parse_backend,
    split_hostport,
)

REPO = Path(__file__).resolve().parents[3]


def toml(tmp_path: Path, text: str) -> str:
    p = tmp_path / "lb.toml"
    p.write_text(text)
    return str(p)


def test_defaults_are_explicit() -> None:
    cfg = from_args(["--backend", "127.0.0.1:9001"])
    assert cfg.backends == (BackendSpec("127.0.0.1", 9001),)
    assert cfg.listen == "127.0.0.1:8080" and cfg.algorithm == "round-robin"
    assert cfg.timeouts.upstream_idle < 75
    assert cfg.limits.backend_max_connections > 0 and cfg.limits.queue_size > 0


def test_toml_then_flags_win(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        """
listen = "127.0.0.1:9000"
algorithm = "least-connections"
forwarded = true
backends = ["10.0.0.1:80", {address = "10.0.0.2:80", weight = 3, backup = true}]
[timeouts]
connect = 2
backend_response = 7.5
[limits]
max_headers = 50
[health]
path = "/ready"
interval = 1.0
""",
    )
    cfg = from_args(["--config", path])
    assert cfg.listen == "127.0.0.1:9000" and cfg.algorithm == "least-connections"
    assert cfg.forwarded and cfg.source == path
    assert cfg.backends == (
        BackendSpec("10.0.0.1", 80),
        BackendSpec("10.0.0.2", 80, weight=3, backup=True),
    )
    assert cfg.timeouts.connect == 2 and cfg.timeouts.backend_response == 7.5
    assert cfg.limits.max_headers == 50 and cfg.health.path == "/ready"
    flagged = from_args(
        [
            "--config", path,
            "--listen", "127.0.0.1:9100",
            "--algorithm", "source-hash",
            "--hash-key", "header:X-User",
            "--backend", "10.0.0.9:8080,weight=2",
            "--timeout-connect", "0.5",
            "--check-interval", "0.3",
            "--no-checks",
            "--retries", "2",
        ]
    )  # fmt: skip
    assert flagged.listen == "127.0.0.1:9100" and flagged.algorithm == "source-hash"
    assert flagged.hash_key == "header:X-User"
    assert flagged.backends == (BackendSpec("10.0.0.9", 8080, weight=2.0),)
    # a flag replaces one field; the file's other fields in that section survive
    assert flagged.timeouts.connect == 0.5 and flagged.timeouts.backend_response == 7.5
    assert flagged.health.interval == 0.3 and flagged.health.path == "/ready"
    assert not flagged.health.enabled and flagged.retries.attempts == 2
    assert flagged.forwarded  # store_true flags cannot turn a file's true off


def test_parse_backend() -> None:
    assert parse_backend("h:1,weight=2.5,backup") == BackendSpec("h", 1, 2.5, True)
    assert parse_backend("[::1]:80").host == "::1"
    assert split_hostport(":80", "listen") == ("0.0.0.0", 80)


BAD_FLAGS = [
    (["--backend", "nonsense"], "expected HOST:PORT"),
    (["--backend", "h:0"], "port 0"),
    (["--backend", "h:99999"], "expected HOST:PORT"),
    (["--backend", "h:1,weight=x"], "weight must be a number"),
    (["--backend", "h:1,weight=0"], "weight must be in"),
    (["--backend", "h:1,color=red"], "unknown option"),
    (["--backend", "h:1", "--backend", "h:1"], "listed twice"),
    ([], "no backends"),
    (["--backend", "h:1", "--listen", "nope"], "listen"),
    (["--backend", "h:1", "--hash-key", "ip"], "invalid hash key"),
    (["--backend", "h:1", "--hash-key", "header:"], "invalid hash key"),
    (["--backend", "h:1", "--timeout-connect", "0"], "timeout connect must be > 0"),
    (["--backend", "h:1", "--timeout-queue", "nan"], "timeout queue must be > 0"),
    (["--backend", "h:1", "--timeout-upstream-idle", "75"], "below the backends' keep-alive"),
    (["--backend", "h:1", "--retries", "0"], "retries"),
    (["--backend", "h:1", "--check-interval", "0"], "health check"),
    (["--backend", "h:1", "--check-rise", "0"], "health check"),
    (["--backend", "h:1", "--check-path", "healthz"], "must start with /"),
    (["--backend", "h:1", "--slow-start", "-1"], "slow start"),
    (["--backend", "h:1", "--tls-cert", "c.pem"], "in pairs"),
    (["--backend", "h:1", "--tls-cert", "/no/c.pem", "--tls-key", "/no/k.pem"], "not found"),
    (["--backend", "h:1", "--redirect-http", ":80"], "needs an HTTPS listener"),
    (["--backend", "h:1", "--admin", "x"], "admin"),
    (["--backend", "h:1", "--admin-cert", "c.pem"], "go together"),
    (["--backend", "h:1", "--peer", "127.0.0.1:1"], "secret-file"),
    (["--backend", "h:1", "--vip", "10.0.0.5"], "ADDR/PREFIX"),
    (["--backend", "h:1", "--vip", "10.0.0.5/24"], "vip-interface"),
    (["--backend", "h:1", "--config", "/no/such.toml"], "not found"),
]


@pytest.mark.parametrize(("argv", "words"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags(argv: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_args(argv)
    msg = str(err.value)
    assert words in msg and "\n" not in msg


def test_pair_checks(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("x")
    base = ["--backend", "h:1", "--peer", "127.0.0.1:1", "--secret-file", str(secret)]
    with pytest.raises(ConfigError, match="bind-election"):
        from_args(base)
    with pytest.raises(ConfigError, match="same address"):
        from_args([*base, "--bind-election", "127.0.0.1:1"])
    with pytest.raises(ConfigError, match="priority"):
        from_args([*base, "--bind-election", "127.0.0.1:2", "--priority", "255"])
    assert from_args([*base, "--bind-election", "127.0.0.1:2"]).pair.peer == "127.0.0.1:1"


BAD_TOML = [
    ("listen = ", "invalid TOML"),
    ("colour = 1", "unknown setting 'colour'"),
    ("[timeouts]\nconect = 1", "unknown setting(s) conect"),
    ('[timeouts]\nconnect = "fast"', "connect must be a number"),
    ("[limits]\nmax_headers = 1.5", "max_headers must be an integer"),
    ('[health]\nenabled = "no"', "enabled must be true or false"),
    ("timeouts = 3", "must be a table"),
    ('backends = "h:1"', "backends must be a list"),
    ("backends = [5]", "invalid entry"),
    ("backends = [{address = 5}]", "invalid entry"),
    ('backends = [{address = "h:1", nope = 1}]', "nope"),
    ('backends = [{address = "h:1", weight = "x"}]', "weight must be a number"),
    ('backends = [{address = "h:1", weight = -1}]', "weight must be in"),
    ('backends = ["h:1"]\nlisten = 5', "listen must be a string"),
    ('backends = ["h:1"]\nforwarded = "yes"', "forwarded must be true or false"),
    ('backends = ["h:1"]\nlog_level = "verbose"', "unknown log level"),
    ('backends = ["h:1"]\ndiscover = "x:1"', "discover must be a list"),
    ('backends = ["h:1"]\nalgorithm = "random"', "unknown algorithm"),
    ('backends = ["h:1"]\ndiscover_interval = 0', "discover_interval"),
    ('backends = ["h:1"]\n[tls]\ncerts = "x"', "certs must be a list"),
    ('backends = ["h:1"]\n[tls]\ncerts = [["a"]]', "certs must be a list"),
    ('backends = ["h:1"]\n[limits]\nqueue_size = -1', "queue_size must be >= 0"),
]


@pytest.mark.parametrize(("text", "words"), BAD_TOML, ids=[t for t, _ in BAD_TOML])
def test_bad_toml(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_args(["--config", toml(tmp_path, text)])
    assert words in str(err.value)


def test_toml_read_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_toml(str(bad))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_toml(str(tmp_path))  # a directory


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Config().listen = "x"  # type: ignore[misc]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "balancer", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("--backend", "nonsense"),
        ("--backend", "h:1", "--timeout-connect", "-1"),
        ("--config", "/no/such/file.toml"),
    ],
)
def test_cli_bad_input_one_line_exit_2(args: tuple[str, ...]) -> None:
    res = run_cli(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("balancer: "), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_cli_argparse_errors_exit_2_without_traceback() -> None:
    res = run_cli("--algorithm", "random", "--backend", "h:1")
    assert res.returncode == 2 and "invalid choice" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_cannot_bind_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        res = run_cli("--backend", "127.0.0.1:1", "--listen", f"127.0.0.1:{port}", "--no-checks")
    assert res.returncode == 2 and "cannot start" in res.stderr
    assert "Traceback" not in res.stderr
