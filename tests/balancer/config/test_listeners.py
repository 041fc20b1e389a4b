"""Listeners as a list: `[[listener]]` tables, the first one as `--listen`/`--mode`, their
validation, backend `sni=`/`proxy_protocol=`, and reloads that mark them restart-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from balancer.config import ConfigError, ListenerSettings, diff, from_args


def load(tmp_path: Path, text: str, *flags: str) -> object:
    p = tmp_path / "lb.toml"
    p.write_text(text)
    return from_args(["--config", str(p), *flags], warn=lambda _: None)


def test_flags_set_the_first_listener() -> None:
    cfg = from_args(["--backend", "h:1", "--mode", "tcp", "--accept-proxy", "10.0.0.0/8, ::1/128"])
    assert cfg.listeners == (ListenerSettings("127.0.0.1:8080", "tcp", ("10.0.0.0/8", "::1/128")),)
    assert from_args(["--backend", "h:1"]).listeners[0].mode == "http"


def test_listener_tables(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
backends = ["h:1"]
[[listener]]
listen = "127.0.0.1:8443"
[[listener]]
listen = "127.0.0.1:9443"
mode = "tcp"
accept_proxy = "172.16.0.0/12"
""",
        "--mode",
        "http",
    )
    assert cfg.listeners == (  # type: ignore[attr-defined]
        ListenerSettings("127.0.0.1:8443", "http"),
        ListenerSettings("127.0.0.1:9443", "tcp", ("172.16.0.0/12",)),
    )
    # --listen replaces the first table's address only
    cfg = load(tmp_path, (tmp_path / "lb.toml").read_text(), "--listen", "127.0.0.1:1")
    assert [lst.listen for lst in cfg.listeners] == ["127.0.0.1:1", "127.0.0.1:9443"]  # type: ignore[attr-defined]


def test_listener_flag_adds_listeners() -> None:
    cfg = from_args(
        ["--backend", "h:1", "--listen", ":1", "--listener", ":2,mode=tcp,accept_proxy=10.0.0.0/8"]
    )
    assert [(lst.listen, lst.mode) for lst in cfg.listeners] == [(":1", "http"), (":2", "tcp")]
    assert cfg.listeners[1].accept_proxy == ("10.0.0.0/8",)
    with pytest.raises(ConfigError, match="unknown option 'tls'"):
        from_args(["--backend", "h:1", "--listener", ":2,tls"])


def test_backend_options() -> None:
    cfg = from_args(
        [
            "--backend", "a:443,sni=a.test,sni=*.a.test,proxy_protocol=v2",
            "--backend", "b:443",
            "--proxy-protocol", "v1", "--mode", "tcp",
        ]
    )  # fmt: skip
    a, b = cfg.backends
    assert a.sni == ("a.test", "*.a.test") and b.sni is None
    assert (cfg.backend_proxy(a), cfg.backend_proxy(b)) == ("v2", "v1")


def test_toml_backend_sni(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        'mode = "tcp"\nbackends = [{address = "a:1", sni = ["x.test"], proxy_protocol = "v1"}]',
    )
    assert cfg.backends[0].sni == ("x.test",)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mode", "udp"], "argument --mode: invalid choice"),
        (["--accept-proxy", "10.0.0.0/33"], "accept_proxy (--accept-proxy) must be CIDRs"),
        (["--backend", "c:1,sni=Bad_Name"], "sni 'Bad_Name' is invalid"),
        (["--backend", "c:1,sni=*"], "sni '*' is invalid"),
        (
            ["--mode", "tcp", "--backend", "c:1,proxy_protocol=v3"],
            "proxy_protocol 'v3': choose v1 or v2",
        ),
        (["--proxy-protocol", "v2"], "proxy_protocol (--proxy-protocol) needs a TCP-mode"),
        (["--check-type", "udp"], "argument --check-type: invalid choice"),
    ],
)
def test_bad_values_are_one_line(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_args(["--backend", "h:1", *flags])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('listen = "127.0.0.1:1"\n[[listener]]\nlisten = "127.0.0.1:2"', "not both"),
        ('[[listener]]\nlisten = "127.0.0.1:2"\nport = 3', "unknown setting(s) port"),
        ("[[listener]]\nmode = 4", "mode must be a string"),
        (
            '[[listener]]\nlisten = "127.0.0.1:2"\n[[listener]]\nlisten = "127.0.0.1:2"',
            "listener[2].listen binds 127.0.0.1:2 a second time",
        ),
        ('[[listener]]\nlisten = "127.0.0.1:2"\n[[listener]]\nmode = "x"', "listener[2].mode"),
    ],
)
def test_bad_listener_tables(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, 'backends = ["h:1"]\n' + text)
    assert message in str(err.value)


def test_listener_changes_need_a_restart() -> None:
    old = from_args(["--backend", "h:1"])
    new = from_args(["--backend", "h:1", "--mode", "tcp", "--proxy-protocol", "v2"])
    result = diff(old, new)
    assert result.restart_needed == ["mode"] and result.applied == ["proxy_protocol"]
    newer = from_args(["--backend", "h:1", "--listener", ":9,mode=tcp"])
    assert diff(old, newer).restart_needed == ["more_listeners"]
