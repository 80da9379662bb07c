"""The namespace rules that keep `import ssl` working and `selfsup.ssl` importable."""

import subprocess
import sys

from conftest import REPO

SOURCE_DIRS = ("selfsup", "ssl", "finetune", "tta", "eval")


def test_ssl_and_selfsup_are_implicit_namespace_packages():
    assert not (REPO / "ssl" / "__init__.py").exists()
    assert not (REPO / "selfsup" / "__init__.py").exists()


def test_from_repo_root_ssl_is_the_standard_library_and_selfsup_ssl_is_ours():
    code = "import ssl, selfsup.ssl; print(ssl.__file__); print(list(selfsup.ssl.__path__)[0]); ssl.create_default_context()"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert "site-packages" not in out[0] and REPO.as_posix() not in out[0]
    assert out[0].endswith("ssl.py")
    assert out[1] == (REPO / "ssl").as_posix()


def test_every_stage_imports_under_the_selfsup_namespace():
    code = "import selfsup.ssl, selfsup.finetune, selfsup.tta, selfsup.eval, selfsup.data, selfsup.checkpoint"
    subprocess.run([sys.executable, "-c", code], cwd="/", check=True)


def test_no_module_is_named_like_a_standard_library_module():
    clashes = [
        str(path.relative_to(REPO))
        for folder in SOURCE_DIRS
        for path in (REPO / folder).rglob("*")
        if (path.suffix == ".py" or path.is_dir()) and path.stem in sys.stdlib_module_names
    ]
    assert clashes == []
