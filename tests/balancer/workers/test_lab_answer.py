"""A worker's answer to the supervisor's lab request (pure enough: a fake Lab): its rows,
bounded so the frame stays under the codec's limit, and its aggregates."""

from __future__ import annotations

from typing import Any

from balancer.lab.table import ConnTable
from balancer.workers.codec import MAX_FRAME, encode
from balancer.workers.worker import LAB_MAX_ROWS, _lab_answer


class FakeLab:
    def __init__(self, rows: int) -> None:
        self.table = ConnTable(lambda: 0.0)
        self.rows = rows

    def connections(self, closed: bool = False) -> dict[str, Any]:
        row = {"id": 1, "peer": "[2001:db8::1]:65535", "pad": "x" * 1200}  # a long row
        out: dict[str, Any] = {"connections": [dict(row, id=i) for i in range(self.rows)]}
        if closed:
            out["closed"] = [dict(row, id=-1)]
        return out

    def connection(self, cid: int) -> dict[str, Any] | None:
        return {"id": cid} if cid == 7 else None


def test_an_answer_is_bounded_and_says_how_many_it_left_off() -> None:
    many = _lab_answer(FakeLab(LAB_MAX_ROWS + 500), {"type": "lab", "req": 3})  # type: ignore[arg-type]
    assert many["req"] == 3 and len(many["connections"]) == LAB_MAX_ROWS
    assert many["left_off"] == 500 and "lab" in many
    assert len(encode(many)) < MAX_FRAME
    few = _lab_answer(FakeLab(2), {"type": "lab", "req": 4, "closed": True})  # type: ignore[arg-type]
    assert [r["id"] for r in few["connections"]] == [0, 1] and few["left_off"] == 0
    assert [r["id"] for r in few["closed"]] == [-1]


def test_one_connection_is_answered_by_id() -> None:
    lab = FakeLab(0)
    assert _lab_answer(lab, {"type": "lab", "req": 1, "id": 7})["conn"] == {"id": 7}  # type: ignore[arg-type]
    assert _lab_answer(lab, {"type": "lab", "req": 2, "id": 8})["conn"] is None  # type: ignore[arg-type]
