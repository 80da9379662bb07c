"""The run's own files as a resume reads them: the log a kill may have cut, the rules of the run keys."""

import json
import re
from dataclasses import dataclass

import pytest

from selfsup import runstate
from selfsup.config import setting
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


@dataclass(kw_only=True)
class StageConfig(runstate.RunKeys):
    """A stage's config as the stages declare theirs: the run keys and its own, checked on creation."""

    out: str = "runs/x"
    epochs: int = setting(3, ge=1)
    batch_size: int = setting(8, ge=1)
    num_workers: int = setting(0, ge=0)
    threads: int | None = setting(None, ge=1)

    def __post_init__(self) -> None:
        runstate.check_run_settings(self)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"max_steps": 0}, "max_steps must be at least 1 (or null), got 0"),
        ({"threads": 0}, "threads must be at least 1 (or null), got 0"),
        ({"keep_checkpoints": 0}, "keep_checkpoints must be at least 1, got 0"),
        ({"epochs": 0}, "epochs must be at least 1, got 0"),
    ],
)
def test_a_config_built_in_code_is_held_to_the_rules_its_fields_declare(change, says):
    """The run keys' least values are their ``setting(ge=...)`` rules, written once."""
    with pytest.raises(UsageError, match=f"^{re.escape(says)}$"):
        StageConfig(**change)
    StageConfig()  # the defaults pass
