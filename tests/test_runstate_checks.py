"""The run's own files as a resume reads them: the log a kill may have cut, the rules of the run keys."""

import json

import pytest

from selfsup import runstate
from selfsup.errors import UsageError


def write_log(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps) + tail)


def test_a_log_line_cut_by_a_kill_is_dropped_with_one_warning(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    write_log(log, range(6), tail='{"step": 6, "lo')  # killed in the middle of its last write
    runstate.truncate_log(log, 4)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1, 2, 3]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "line 7" in err[0]


def test_garbage_inside_the_log_is_one_line_naming_the_file_and_line(tmp_path):
    log = tmp_path / "log.jsonl"
    write_log(log, range(3), tail="not json at all\n" + json.dumps({"step": 3}) + "\n")
    with pytest.raises(UsageError, match=rf"{log} line 4 is not a JSON record.*delete") as refusal:
        runstate.truncate_log(log, 2)
    assert "\n" not in str(refusal.value)
    log.write_bytes(b'{"step": 0}\n\xff\xfe\n{"step": 1}\n')  # bytes that are not even text
    with pytest.raises(UsageError, match=r"line 2 is not a JSON record"):
        runstate.truncate_log(log, 1)
