"""bench.workers_cost: bad arguments are one line and exit 2; a short `cpu` run splits the
CPU per request by process (supervisor and each worker) and adds them up."""

from __future__ import annotations

import re
import shutil

import pytest

from bench import workers_cost


@pytest.mark.parametrize(
    "argv",
    [
        ["cpu", "--workers", "0"],
        ["cpu", "--seconds", "0"],
        ["instructions", "--requests", "3"],
        ["nothing"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        workers_cost.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nginx", "wrk", "taskset")), reason="needs nginx, wrk"
)
def test_cpu_per_request_of_each_process_adds_up() -> None:
    text = workers_cost.cpu(2, 2)
    per = [float(m) for m in re.findall(r"^  (?:supervisor|worker \d) +([\d.]+) us", text, re.M)]
    total = re.search(r"^  total +([\d.]+) us", text, re.M)
    assert len(per) == 3, text  # the supervisor and two workers
    assert total is not None and abs(sum(per) - float(total.group(1))) < 0.02, text
    served = re.match(r"--workers 2: (\d+) requests", text)
    assert served is not None and int(served.group(1)) > 0, text
