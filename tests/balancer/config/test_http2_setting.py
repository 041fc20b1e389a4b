"""`http2`: on by default, `--no-http2` or `http2 = false` turns it off, restart-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from balancer.config import ConfigError, from_args
from balancer.config.schema import is_live


def test_http2_is_on_by_default_and_the_flag_turns_it_off() -> None:
    args = ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"]
    assert from_args(args).http2 is True
    assert from_args([*args, "--no-http2"]).http2 is False
    assert not is_live("http2")  # the listener's protocols are chosen at bind time


def test_the_file_sets_it_and_the_flag_wins(tmp_path: Path) -> None:
    f = tmp_path / "lb.toml"
    f.write_text('listen = "127.0.0.1:0"\nbackends = ["127.0.0.1:1"]\nhttp2 = false\n')
    assert from_args(["--config", str(f)]).http2 is False
    assert from_args(["--config", str(f), "--http2"]).http2 is True


def test_a_bad_value_is_one_line_naming_the_key(tmp_path: Path) -> None:
    f = tmp_path / "lb.toml"
    f.write_text('http2 = "yes"\n')
    with pytest.raises(ConfigError, match="http2 must be true or false"):
        from_args(["--config", str(f)])


def test_each_listener_has_its_own_http2() -> None:
    args = ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1", "--no-http2"]
    args += ["--listener", "127.0.0.1:1,http2=off", "--listener", "127.0.0.1:2"]
    cfg = from_args(args)
    assert [lst.http2 for lst in cfg.listeners] == [False, False, True]
    with pytest.raises(ConfigError, match="http2 must be on or off"):
        from_args([*args, "--listener", "127.0.0.1:3,http2=maybe"])


def test_listener_tables_set_http2_and_exclude_the_top_level_key(tmp_path: Path) -> None:
    f = tmp_path / "lb.toml"
    tables = '[[listener]]\nlisten = "127.0.0.1:0"\n[[listener]]\nlisten = "127.0.0.1:1"\n'
    f.write_text('backends = ["127.0.0.1:1"]\n' + tables + "http2 = false\n")
    cfg = from_args(["--config", str(f)])
    assert [lst.http2 for lst in cfg.listeners] == [True, False]
    f.write_text('backends = ["127.0.0.1:1"]\nhttp2 = false\n' + tables)
    with pytest.raises(ConfigError, match="not both"):
        from_args(["--config", str(f)])
