"""The layout rules: namespace packages that keep `import ssl` working and `selfsup.ssl` importable,
and imports that flow from the stages to the core, never between stages."""

import ast
import re
import subprocess
import sys

from conftest import REPO

SOURCE_DIRS = ("selfsup", "ssl", "finetune", "tta", "compress", "eval")


def test_ssl_and_selfsup_are_implicit_namespace_packages():
    assert not (REPO / "ssl" / "__init__.py").exists()
    assert not (REPO / "selfsup" / "__init__.py").exists()


def test_from_repo_root_ssl_is_the_standard_library_and_selfsup_ssl_is_ours():
    code = "import ssl, selfsup.ssl; print(ssl.__file__); print(list(selfsup.ssl.__path__)[0]); ssl.create_default_context()"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "site-packages" not in out[0] and REPO.as_posix() not in out[0]
    assert out[0].endswith("ssl.py")
    assert out[1] == (REPO / "ssl").as_posix()


def test_every_stage_imports_under_the_selfsup_namespace():
    code = "import selfsup.ssl, selfsup.finetune, selfsup.tta, selfsup.compress, selfsup.eval, selfsup.data, selfsup.checkpoint, selfsup.architectures"
    subprocess.run([sys.executable, "-c", code], cwd="/", check=True)


def test_no_module_is_named_like_a_standard_library_module():
    clashes = [
        str(path.relative_to(REPO))
        for folder in SOURCE_DIRS
        for path in (REPO / folder).rglob("*")
        if (path.suffix == ".py" or path.is_dir()) and path.stem in sys.stdlib_module_names
    ]
    assert clashes == []


# --- Who may import whom (../shared/STYLE.md, "Our rules of thumb"; issue 9) ------------------------
# The core (selfsup/) imports no stage; a stage imports the core and itself, never another stage;
# eval/, finetune/ and tta/ never import ssl/.
STAGE_OF_PACKAGE = {
    "selfsup.ssl": "ssl",
    "selfsup.eval": "eval",
    "selfsup.finetune": "finetune",
    "selfsup.tta": "tta",
    "selfsup.compress": "compress",
}
# The one crossing allowed (issue 9's brief): pretraining's collapse monitor (ssl/monitor.py) runs
# eval's kNN protocol, a pure function over tensors, rather than keep a second copy of it.
ALLOWED_CROSSINGS = {("ssl", "selfsup.eval.knn")}


def _owner(module: str) -> str | None:
    """'core', a stage's folder name, or None for a module outside the project."""
    if module != "selfsup" and not module.startswith("selfsup."):
        return None
    for package, stage in STAGE_OF_PACKAGE.items():
        if module == package or module.startswith(package + "."):
            return stage
    return "core"


def _imports(path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (``from selfsup import x`` as selfsup.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "selfsup":
                found.update(f"selfsup.{alias.name}" for alias in node.names)
    return found


def _project_imports() -> list[tuple[str, str, str]]:
    """(file, importing folder, imported selfsup module) for every source file of every folder."""
    edges = []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for module in _imports(path):
                if _owner(module) is not None:
                    edges.append(
                        (str(path.relative_to(REPO)), "core" if folder == "selfsup" else folder, module)
                    )
    return edges


def test_the_layout_check_sees_the_imports_it_rules_on():
    edges = _project_imports()
    assert (
        "ssl/train.py",
        "ssl",
        "selfsup.loop",
    ) in edges  # a stage on the core: what a rule would miss if blind
    assert ("eval/probe.py", "eval", "selfsup.eval.knn") in edges


def test_the_core_imports_no_stage():
    assert [(f, m) for f, side, m in _project_imports() if side == "core" and _owner(m) != "core"] == []


def test_eval_finetune_tta_and_compress_never_import_ssl():
    assert [(f, m) for f, side, m in _project_imports() if side != "ssl" and _owner(m) == "ssl"] == []


def test_no_stage_imports_another_stage_except_through_the_core():
    crossings = [
        (f, m)
        for f, side, m in _project_imports()
        if side != "core" and _owner(m) not in ("core", side) and (side, m) not in ALLOWED_CROSSINGS
    ]
    assert crossings == []


def test_ci_runs_the_same_lint_as_make_lint():
    """.ci/run calls `make test`, which must run `make lint` (ruff check and ruff format --check)."""
    makefile = (REPO / "Makefile").read_text()
    targets = dict(re.findall(r"^(\w+):([^\n]*)$", makefile, flags=re.M))
    lint_recipe = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "lint" in targets["test"].split() and "make test" in (REPO / ".ci" / "run").read_text()
    assert "ruff check" in lint_recipe and "ruff format --check" in lint_recipe
