"""Load with hang-ups: clients that connect, send, hang up at random points (queued, prompt being read,
mid-stream) and reconnect, against a real server; afterwards nothing is stuck and the books agree
(``python -m evaluation.server_load``, a short run). Marked slow; CI runs it."""

from __future__ import annotations

import json

import pytest

from evaluation import server_load as load


@pytest.mark.slow
def test_clients_hanging_up_at_random_leave_nothing_stuck_and_the_books_agree(tmp_path, capsys):
    out = tmp_path / "load.json"
    rc = load.main(["--clients", "6", "--slots", "2", "--seconds", "40", "--threads", "1", "--budget", "128",
                    "--buffer", "32", "--reply-tokens", "32", "--json", str(out)])
    print(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert rc == 0 and all(result["checks"].values()), result["checks"]
    assert result["hung_up"] >= 5 and result["hung_up_before_response"] >= 1
    assert result["hung_up_by_plan"]["mid-stream"] >= 1
    assert result["fresh_compared"] >= 3 and result["answered"] >= 5
