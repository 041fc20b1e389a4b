"""balancer.config: flags vs TOML, validation messages, and the CLI's exit on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from balancer.config import (
    BackendSpec,
    Config,
    ConfigError,
    ReloadResult,
    build_parser,
    diff,
    from_args,
    in_effect,
    load_toml,
    parse_backend,
    split_hostport,
    validate,
)
from balancer.config.schema import _leaf, flag_of, is_live, leaves

REPO = Path(__file__).resolve().parents[3]


def toml(tmp_path: Path, text: str) -> str:
    p = tmp_path / "lb.toml"
    p.write_text(text)
    return str(p)


def test_defaults_are_explicit() -> None:
    cfg = from_args(["--backend", "127.0.0.1:9001"])
    assert cfg.backends == (BackendSpec("127.0.0.1", 9001),)
    assert cfg.listen == "127.0.0.1:8080" and cfg.algorithm == "round-robin"
    assert cfg.timeouts.backend_idle < 75
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
[health_check]
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
    assert cfg.limits.max_headers == 50 and cfg.health_check.path == "/ready"
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
            "--attempts", "2",
        ]
    )  # fmt: skip
    assert flagged.listen == "127.0.0.1:9100" and flagged.algorithm == "source-hash"
    assert flagged.hash_key == "header:X-User"
    assert flagged.backends == (BackendSpec("10.0.0.9", 8080, weight=2.0),)
    # a flag replaces one field; the file's other fields in that section survive
    assert flagged.timeouts.connect == 0.5 and flagged.timeouts.backend_response == 7.5
    assert flagged.health_check.interval == 0.3 and flagged.health_check.path == "/ready"
    assert not flagged.health_check.enabled and flagged.retries.attempts == 2
    assert flagged.forwarded  # store_true flags cannot turn a file's true off


def test_parse_backend() -> None:
    assert parse_backend("h:1,weight=2.5,backup") == BackendSpec("h", 1, 2.5, True)
    assert parse_backend("[::1]:80").host == "::1"
    named = parse_backend("h:1,name=b1,weight=2")
    assert named == BackendSpec("h", 1, 2.0, False, "b1")
    assert (named.id, named.address) == ("b1", "h:1")
    assert parse_backend("h:1").id == "h:1"  # without a name the id stays host:port


def test_toml_backend_names(tmp_path: Path) -> None:
    text = 'backends = ["h:1,name=b1", {address = "h:2", name = "b2.x_y-3"}, "h:3"]\n'
    cfg = from_args(["--config", toml(tmp_path, text)], warn=lambda _: None)
    assert [(b.id, b.address) for b in cfg.backends] == [
        ("b1", "h:1"),
        ("b2.x_y-3", "h:2"),
        ("h:3", "h:3"),
    ]
    assert split_hostport(":80", "listen") == ("0.0.0.0", 80)


BAD_FLAGS = [
    (["--backend", "nonsense"], "expected HOST:PORT"),
    (["--backend", "h:0"], "port 0"),
    (["--backend", "h:99999"], "expected HOST:PORT"),
    (["--backend", "h:1,weight=x"], "weight must be a number"),
    (["--backend", "h:1,weight=0"], "weight must be in"),
    (["--backend", "h:1,color=red"], "unknown option"),
    (["--backend", "h:1", "--backend", "h:1"], "(--backend) lists the address 'h:1' twice"),
    (["--backend", "h:1,name="], "h:1: name '' is invalid"),
    (["--backend", "h:1,name=a b"], "h:1: name 'a b' is invalid"),
    (["--backend", "h:1,name=h:2"], "h:1: name 'h:2' is invalid"),
    (["--backend", "h:1,name=-x"], "h:1: name '-x' is invalid"),
    (["--backend", "h:1,name=b/1"], "h:1: name 'b/1' is invalid"),
    (["--backend", "h:1,name=" + "x" * 64], "is invalid: use 1-63 characters"),
    (["--backend", "h:1,name=b1", "--backend", "h:2,name=b1"], "lists the name 'b1' twice"),
    ([], "no backends"),
    (["--backend", "h:1", "--listen", "nope"], "listen (--listen): expected HOST:PORT"),
    (["--backend", "h:1", "--algorithm", "random"], "argument --algorithm: invalid choice"),
    (["--backend", "h:1", "--priority", "high"], "argument --priority: invalid int value"),
    (["--backend", "h:1", "--hash-key", "ip"], "hash_key (--hash-key) 'ip' is invalid"),
    (["--backend", "h:1", "--hash-key", "header:"], "hash_key (--hash-key) 'header:' is invalid"),
    (["--backend", "h:1", "--discover", "x"], "discover (--discover): expected HOST:PORT"),
    (["--backend", "h:1", "--timeout-connect", "0"], "timeouts.connect (--timeout-connect) must"),
    (["--backend", "h:1", "--timeout-queue", "nan"], "timeouts.queue (--timeout-queue) must"),
    (["--backend", "h:1", "--timeout-tunnel-idle", "inf"], "timeouts.tunnel_idle"),
    (["--backend", "h:1", "--timeout-backend-idle", "75"], "below the backends' keep-alive"),
    (["--backend", "h:1", "--attempts", "0"], "retries.attempts (--attempts) must be"),
    (["--backend", "h:1", "--check-interval", "0"], "health_check.interval (--check-interval)"),
    (["--backend", "h:1", "--check-timeout", "-1"], "health_check.timeout (--check-timeout)"),
    (["--backend", "h:1", "--check-rise", "0"], "health_check.rise (--check-rise) must be"),
    (["--backend", "h:1", "--check-fall", "0"], "health_check.fall (--check-fall) must be"),
    (["--backend", "h:1", "--check-path", "healthz"], "health_check.path (--check-path) must"),
    (["--backend", "h:1", "--slow-start", "-1"], "slow_start (--slow-start) must be"),
    (["--backend", "h:1", "--tls-cert", "c.pem"], "in pairs"),
    (["--backend", "h:1", "--tls-cert", "/no/c.pem", "--tls-key", "/no/k.pem"], "tls.certs"),
    (["--backend", "h:1", "--redirect-http", ":80"], "needs an HTTPS listener"),
    (["--backend", "h:1", "--admin", "x"], "admin.listen (--admin): expected HOST:PORT"),
    (["--backend", "h:1", "--admin-cert", "c.pem"], "go together"),
    (["--backend", "h:1", "--priority", "0"], "pair.priority (--priority) must be between"),
    (["--backend", "h:1", "--priority", "255"], "pair.priority (--priority) must be between"),
    (["--backend", "h:1", "--advert-interval", "0"], "pair.advert_interval (--advert-interval)"),
    (["--backend", "h:1", "--peer", "127.0.0.1:1"], "pair.secret_file (--secret-file)"),
    (["--backend", "h:1", "--peer", ":1"], "pair.peer (--peer): expected HOST:PORT"),
    (["--backend", "h:1", "--vip", "10.0.0.5"], "ADDR/PREFIX"),
    (["--backend", "h:1", "--vip", "nope/24"], "ADDR/PREFIX"),
    (["--backend", "h:1", "--vip", "10.0.0.5/24"], "pair.vip_interface (--vip-interface)"),
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
    with pytest.raises(ConfigError, match=r"pair.bind \(--bind-election\) is required"):
        from_args(base)
    with pytest.raises(ConfigError, match="is this node itself"):
        from_args([*base, "--bind-election", "127.0.0.1:1"])
    for bind in ("127.0.0.1:x", ":2"):
        with pytest.raises(ConfigError, match=r"pair.bind \(--bind-election\): expected HOST:"):
            from_args([*base, "--bind-election", bind])
    with pytest.raises(ConfigError, match=r"pair\.priority"):
        from_args([*base, "--bind-election", "127.0.0.1:2", "--priority", "255"])
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ConfigError, match=r"pair.secret_file \(--secret-file\) is empty"):
        from_args([*base, "--bind-election", "127.0.0.1:2", "--secret-file", str(empty)])
    ok = from_args([*base, "--bind-election", "127.0.0.1:2", "--priority", "254"])
    assert ok.pair.peer == "127.0.0.1:1" and ok.pair.priority == 254


BAD_TOML = [
    ("listen = ", "invalid TOML"),
    ("colour = 1", "unknown setting 'colour'"),
    ("[timeouts]\nconect = 1", "unknown setting(s) conect"),
    ('[timeouts]\nconnect = "fast"', "connect must be a number"),
    ("[limits]\nmax_headers = 1.5", "max_headers must be an integer"),
    ('[health_check]\nenabled = "no"', "enabled must be true or false"),
    ("timeouts = 3", "must be a table"),
    ('backends = "h:1"', "backends must be a list"),
    ("backends = [5]", "invalid entry"),
    ("backends = [{address = 5}]", "invalid entry"),
    ('backends = [{address = "h:1", nope = 1}]', "nope"),
    ('backends = [{address = "h:1", weight = "x"}]', "weight must be a number"),
    ('backends = [{address = "h:1", weight = -1}]', "weight must be in"),
    ('backends = ["h:1"]\nlisten = 5', "listen must be a string"),
    ('backends = ["h:1"]\nforwarded = "yes"', "forwarded must be true or false"),
    ('backends = ["h:1"]\nlog_level = "verbose"', "log_level (--log-level) 'verbose' is unknown"),
    ('backends = ["h:1"]\ndiscover = "x:1"', "discover must be a list"),
    ('backends = ["h:1"]\nalgorithm = "random"', "algorithm (--algorithm) 'random' is unknown"),
    ('backends = ["h:1"]\ndiscover_interval = 0', "discover_interval"),
    ('backends = ["h:1"]\n[tls]\ncerts = "x"', "certs must be a list"),
    ('backends = ["h:1"]\n[tls]\ncerts = [["a"]]', "certs must be a list"),
    ('backends = ["h:1"]\n[limits]\nqueue_size = -1', "limits.queue_size must be >= 0"),
    ('backends = ["h:1"]\n[limits]\nmax_headers = 0', "limits.max_headers must be >= 1"),
    ('backends = ["h:1"]\n[limits]\nbackend_max_connections = 0', "must be >= 1, got 0"),
    ('backends = ["h:1"]\n[outlier]\nmax_ejection = 1', "outlier.max_ejection must be >="),
    ('backends = ["h:1"]\n[outlier]\nbase_ejection = 0', "outlier.base_ejection must be"),
    ('backends = ["h:1"]\n[outlier]\nconsecutive_failures = 0', "outlier.consecutive_failures"),
    ('backends = ["h:1"]\n[outlier]\nconsecutive_5xx = 0', "outlier.consecutive_5xx must be"),
    ('backends = ["h:1"]\n[outlier]\nmax_ejection_percent = 101', "max_ejection_percent must"),
    ('backends = ["h:1"]\n[outlier]\nmax_ejection_percent = -1', "max_ejection_percent must"),
    ('backends = ["h:1"]\n[retries]\nbudget_ratio = -0.1', "retries.budget_ratio must be"),
    ('backends = ["h:1"]\n[retries]\nbudget_min_per_second = -1', "budget_min_per_second must"),
    ('backends = ["h:1"]\n[retries]\nbudget_ratio = nan', "retries.budget_ratio must be"),
    ('backends = ["h:1"]\n[health_check]\nfast_interval = 0', "health_check.fast_interval"),
    ('backends = ["h:1"]\n[pair]\nadvert_interval = -1', "pair.advert_interval"),
    ('backends = ["h:1"]\n[tls]\nbackend_cert = "c.pem"', "tls.backend_cert and tls.backend_key"),
    ('backends = ["h:1"]\n[timeouts]\nbackend_idle = 80', "timeouts.backend_idle"),
    ('backends = ["h:1"]\n[health]\n[health_check]', "give only [health_check]"),
    ('backends = ["h:1"]\n[timeouts]\nupstream_idle = 1\nbackend_idle = 2', "give only"),
    ('backends = [{address = "h:1", name = ""}]', "(--backend) h:1: name '' is invalid"),
    ('backends = [{address = "h:1", name = 3}]', "backends: name must be a string"),
    ('backends = [{address = "h:1", name = "a"}, "h:2,name=a"]', "lists the name 'a' twice"),
]


@pytest.mark.parametrize(("text", "words"), BAD_TOML, ids=[t for t, _ in BAD_TOML])
def test_bad_toml(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_args(["--config", toml(tmp_path, text)], warn=lambda _: None)
    assert words in str(err.value) and "\n" not in str(err.value)


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
        ("--backend", "h:1,name=no good"),
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


def test_cli_outlier_rule_is_one_line_exit_2(tmp_path: Path) -> None:
    # this used to start the process, then die with a ValueError traceback
    path = toml(tmp_path, 'backends = ["127.0.0.1:1"]\n[outlier]\nmax_ejection = 1\n')
    res = run_cli("--config", path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (
        "balancer: outlier.max_ejection must be >= outlier.base_ejection (5), got 1"
    )


def test_cli_argparse_error_is_one_line() -> None:
    res = run_cli("--backend", "h:1", "--priority", "high")
    assert res.returncode == 2
    assert res.stderr.strip() == "balancer: argument --priority: invalid int value: 'high'"


# --- renamed flags and keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "read"),
    [
        (["--retries", "2"], "--attempts", lambda c: c.retries.attempts == 2),
        (["--retries=2"], "--attempts", lambda c: c.retries.attempts == 2),
        (
            ["--timeout-upstream-idle", "9"],
            "--timeout-backend-idle",
            lambda c: c.timeouts.backend_idle == 9,
        ),
    ],
)
def test_deprecated_flags_still_work_with_one_warning(old: list[str], new: str, read: Any) -> None:
    warnings: list[str] = []
    cfg = from_args(["--backend", "h:1", *old], warn=warnings.append)
    assert read(cfg)
    assert len(warnings) == 1 and new in warnings[0] and "deprecated" in warnings[0]


def test_deprecated_toml_names_still_work_with_one_warning(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        'backends = ["h:1"]\n[health]\nrise = 4\n[timeouts]\nupstream_idle = 9\n',
    )
    warnings: list[str] = []
    cfg = from_args(["--config", path], warn=warnings.append)
    assert cfg.health_check.rise == 4 and cfg.timeouts.backend_idle == 9
    assert len(warnings) == 2
    assert "[health] is deprecated, use [health_check]" in warnings[0]
    assert "upstream_idle is deprecated, use backend_idle" in warnings[1]


def test_cli_deprecation_warning_is_one_line_on_stderr() -> None:
    res = run_cli("--retries", "0", "--backend", "h:1")  # invalid: exits after warning
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "balancer: warning: --retries is deprecated, use --attempts",
        "balancer: retries.attempts (--attempts) must be an integer >= 1, got 0",
    ]


def test_example_toml_uses_only_new_names() -> None:
    warnings: list[str] = []
    cfg = load_toml(str(REPO / "docs" / "example.toml"), warn=warnings.append)
    assert warnings == []
    validate(cfg)


# --- the schema: reload behaviour and flags come from field metadata ----------------------------


def test_every_setting_says_whether_a_reload_applies_it() -> None:
    keys = leaves(Config())
    for key in keys:
        assert isinstance(_leaf(key).metadata.get("live"), bool), key
    assert is_live("timeouts.connect") and is_live("access_log") and is_live("log_level")
    assert is_live("retries.budget_ratio") and is_live("admin.token_file")
    assert not is_live("listen") and not is_live("health_check.interval")
    assert not is_live("outlier.max_ejection") and not is_live("pair.priority")


def test_every_flag_in_the_schema_exists_on_the_command_line() -> None:
    options = {o for a in build_parser()._actions for o in a.option_strings}
    for key in leaves(Config()):
        flag = flag_of(key)
        if flag is not None:
            assert flag in options or f"--no-{flag[2:]}" in options or flag == "--no-checks", key


def test_every_command_line_flag_sets_a_schema_setting() -> None:
    in_schema = {flag_of(key) for key in leaves(Config())}
    for action in build_parser()._actions:
        for option in action.option_strings:
            if option in ("-h", "--help", "--config", "--tls-key"):
                continue  # --tls-key is the other half of --tls-cert
            if option.startswith("--no-") and "--" + option[5:] in in_schema:
                continue  # the off half of --preempt, --http2
            assert option in in_schema, option


def test_every_flag_reaches_its_setting(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("x")
    cfg = from_args(
        [
            "--backend", "h:1", "--discover", "svc:80", "--listen", "127.0.0.1:1",
            "--algorithm", "source-hash", "--hash-key", "cookie:u", "--slow-start", "2",
            "--access-log", "-", "--log-level", "debug", "--forwarded", "--tls-facts",
            "--admin", "127.0.0.1:2", "--admin-token-file", "t", "--admin-client-ca", "ca",
            "--peer", "127.0.0.1:3", "--bind-election", "127.0.0.1:4", "--priority", "7",
            "--advert-interval", "0.5", "--no-preempt", "--secret-file", str(secret),
            "--timeout-backend-idle", "9", "--attempts", "4", "--check-path", "/r",
            "--check-interval", "1", "--check-timeout", "0.7", "--check-rise", "3",
            "--check-fall", "4", "--no-checks",
        ]
    )  # fmt: skip
    assert cfg.discover == ("svc:80",) and cfg.listen == "127.0.0.1:1"
    assert (cfg.algorithm, cfg.hash_key, cfg.slow_start) == ("source-hash", "cookie:u", 2)
    assert (cfg.access_log, cfg.log_level, cfg.forwarded, cfg.tls_facts) == (
        "-",
        "debug",
        True,
        True,
    )
    assert (cfg.admin.listen, cfg.admin.token_file, cfg.admin.client_ca) == (
        "127.0.0.1:2",
        "t",
        "ca",
    )
    p = cfg.pair
    assert (p.peer, p.bind, p.priority, p.advert_interval) == ("127.0.0.1:3", "127.0.0.1:4", 7, 0.5)
    assert not p.preempt and p.secret_file == str(secret)
    assert cfg.timeouts.backend_idle == 9 and cfg.retries.attempts == 4
    h = cfg.health_check
    assert (h.path, h.interval, h.timeout, h.rise, h.fall, h.enabled) == ("/r", 1, 0.7, 3, 4, False)


def test_reload_diff_sorts_changes_by_the_schema() -> None:
    old = from_args(["--backend", "h:1"])
    new = from_args(
        [
            "--backend", "h:2",
            "--listen", "127.0.0.1:9",
            "--access-log", "-",
            "--log-level", "debug",
            "--check-rise", "5",
            "--timeout-connect", "3",
        ]
    )  # fmt: skip
    result = diff(old, new)
    assert result.applied == ["backends", "access_log", "log_level", "timeouts.connect"]
    assert result.restart_needed == ["listen", "health_check.rise"]
    assert result.refused is None
    assert result.summary() == (
        "applied backends, access_log, log_level, timeouts.connect; "
        "restart needed for listen, health_check.rise"
    )
    assert diff(old, old).summary() == "no changes"
    # what runs after the reload: live values are new, restart-only ones stay as they were
    running = in_effect(old, new)
    assert running.backends == new.backends and running.timeouts.connect == 3
    assert running.listen == old.listen and running.health_check.rise == old.health_check.rise
    assert diff(running, new).restart_needed == ["listen", "health_check.rise"]  # still owed


def test_refused_reload_result() -> None:
    result = ReloadResult(refused="no backends")
    assert result.as_dict() == {"applied": [], "restart_needed": [], "refused": "no backends"}
    assert result.summary() == "refused, keeping the old configuration: no backends"


def test_config_package_imports_no_io_modules() -> None:
    code = (
        "import sys, balancer.config\n"
        "print(sorted({'asyncio', 'socket', 'ssl'} & set(sys.modules)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


def test_the_one_hostport_parser_for_pair_addresses() -> None:
    # the pair reads its addresses with this parser; config has refused bad ones already
    assert split_hostport("[::1]:5405", "pair.peer", wildcard=False) == ("::1", 5405)
    assert split_hostport("lb-a:1", "pair.peer", wildcard=False) == ("lb-a", 1)
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        split_hostport(":5405", "pair.peer", wildcard=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "pair.secret_file (--secret-file) is required in a pair"),
        (
            ["--secret-file", "/nonexistent/secret"],
            "pair.secret_file (--secret-file) names a file that is not there: /nonexistent/secret",
        ),
        (["--peer", "127.0.0.1:5405", "--secret-file", "S"], "is this node itself"),
        (["--peer", "nonsense", "--secret-file", "S"], "expected HOST:PORT, got 'nonsense'"),
        (
            ["--bind-election", "127.0.0.1:99999", "--secret-file", "S"],
            "expected HOST:PORT, got '127.0.0.1:99999'",
        ),
    ],
)
def test_pair_settings_are_validated_once_here(
    tmp_path: Path, args: list[str], message: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    base = ["--backend", "h:1", "--peer", "127.0.0.2:5405", "--bind-election", "127.0.0.1:5405"]
    argv = base + [str(secret) if a == "S" else a for a in args]
    with pytest.raises(ConfigError) as info:
        from_args(argv)
    assert message in str(info.value) and "\n" not in str(info.value)
