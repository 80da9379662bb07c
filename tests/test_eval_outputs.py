"""probe checks that its report folder can be written before it extracts a single feature."""

import pytest

from selfsup.eval import cli, probe


def test_an_unwritable_out_fails_before_any_feature_is_extracted(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("features were extracted before the output folder was checked")

    monkeypatch.setattr(probe, "extract_features", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "--model",
                "vit_tiny_patch16_224",
                "--random-init",
                "--dataset",
                "synthetic",
                "--img-size",
                "32",
                "--out",
                str(blocker / "report"),
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--out" in err and "not writable" in err
