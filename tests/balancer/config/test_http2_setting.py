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
