"""The package's imports point one way (docs/internals.md): every ``import`` of every module,
function-level ones included, is checked against the layer rules below."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "kmdask"

# What each part may import of kmdask (module prefixes): "kmdask" alone is the package itself
# (its __version__), "*" is anything.
LEAVES = ("kmdask.errors", "kmdask.log", "kmdask.rng")
RULES = {
    "kmdask.errors": (),
    "kmdask.log": (),
    "kmdask.rng": (),
    "kmdask.data": ("kmdask", *LEAVES, "kmdask.data"),
    "kmdask.engine": ("kmdask", *LEAVES, "kmdask.engine"),
    "kmdask.mccaffrey": ("kmdask", *LEAVES, "kmdask.mccaffrey", "kmdask.engine.executor",
                         "kmdask.engine.kernels", "kmdask.engine.params",
                         "kmdask.engine.waits"),
    # batch reaches algorithms only through the fit-kind registry; label scores are numpy
    "kmdask.batch": ("kmdask", *LEAVES, "kmdask.data", "kmdask.batch", "kmdask.engine.metrics"),
    "kmdask.batch.fitkinds": ("kmdask", *LEAVES, "kmdask.batch", "kmdask.engine.estimator",
                              "kmdask.engine.criteria", "kmdask.mccaffrey.fit"),
    "kmdask.report": ("kmdask", *LEAVES, "kmdask.report", "kmdask.batch.rundir",
                      "kmdask.batch.spec", "kmdask.batch.extensions"),
    "kmdask.errorcases": ("*",),  # may use everything; reached only by registration
    "kmdask.cli": ("*",),
    "kmdask.bench": ("*",),
    "kmdask.bench_storage": ("*",),
    "kmdask.__main__": ("kmdask.cli",),
    "kmdask": LEAVES,  # __init__: the errors it re-exports; the rest lazily, by name
}
NEVER = {"kmdask.report": ("dask", "distributed")}  # third-party modules a part may not use


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement, relative ones resolved."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from kmdask.engine import kernels" imports the module kmdask.engine.kernels
            for a in node.names:
                sub = f"{base}.{a.name}"
                is_module = (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists() \
                    or (PKG.parent / Path(*sub.split("."))).is_dir()
                out.append((node.lineno, sub if is_module else base))
    return out


def _rule(module: str) -> tuple[str, tuple[str, ...]]:
    best = max((k for k in RULES if module == k or module.startswith(k + ".")), key=len)
    return best, RULES[best]


def _allowed(target: str, prefixes: tuple[str, ...]) -> bool:
    return "*" in prefixes or any(
        target == p or (p != "kmdask" and target.startswith(p + ".")) for p in prefixes)


def test_imports_follow_the_layers():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = _module_name(path)
        part, allowed = _rule(me)
        for line, target in _imports(path):
            rel = path.relative_to(PKG.parent)
            if target.split(".")[0] == "kmdask":
                if target.startswith("kmdask.errorcases") and not me.startswith(
                        "kmdask.errorcases"):
                    bad.append(f"{rel}:{line}: imports {target} (errorcases is reached only "
                               "through the extension registry)")
                elif target == "kmdask.cli" and me != "kmdask.__main__":
                    bad.append(f"{rel}:{line}: imports the command line")
                elif not _allowed(target, allowed):
                    bad.append(f"{rel}:{line}: {part} may not import {target}")
            elif target.split(".")[0] in NEVER.get(part, ()):
                bad.append(f"{rel}:{line}: {part} may not import {target}")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_rule_checker_catches_an_arrow_against_the_flow():
    """A test that cannot fail is a defect: an engine module importing batch is caught."""
    fake = PKG / "engine" / "_layout_probe.py"
    try:
        fake.write_text("from kmdask.batch import spec\nimport distributed\n")
        with pytest.raises(AssertionError, match="kmdask.engine may not import "
                                                 "kmdask.batch.spec"):
            test_imports_follow_the_layers()
    finally:
        fake.unlink(missing_ok=True)


def test_importing_the_report_and_the_specs_imports_no_dask():
    """The report reads run directories and specs only; reading a job spec needs no dask."""
    code = ("import sys; import kmdask.report.build, kmdask.report.kinds as k, "
            "kmdask.batch.spec as s; k.figure_kinds(); s.load_job('jobs/sweep.yaml'); "
            "print(sorted(m for m in ('dask', 'distributed') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=PKG.parent, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_figure_kinds_of_specs_and_report_agree():
    from kmdask.batch.spec import figure_kinds
    from kmdask.report.kinds import figure_kinds as drawers

    assert set(figure_kinds()) == set(drawers())
