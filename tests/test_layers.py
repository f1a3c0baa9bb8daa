"""The package's modules import each other without cycles, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import leukoscope

PACKAGE = Path(leukoscope.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every leukoscope module that ``path`` imports, at module level or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c.startswith("leukoscope") and c != name}
    return found


def test_no_import_cycles():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {i for i in imports_of(p) if i in modules} for m, p in modules.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle of the layers
    graph = {m: {i for i in deps if not (m == i.rsplit(".", 1)[0])} for m, deps in graph.items()}
    visiting, done, cycles = set(), set(), []

    def visit(module: str, path: list[str]) -> None:
        if module in done:
            return
        if module in visiting:
            cycles.append(path[path.index(module):] + [module])
            return
        visiting.add(module)
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_predicting_imports_neither_scikit_learn_nor_onnx(tmp_path):
    """Predicting with a bundled model needs PyTorch and ONNX Runtime, not scikit-learn (evaluation's metrics) nor the
    onnx package (the graph's first export): importing those two took 1.7 of the 5 seconds that predicting one image took."""
    import subprocess
    import sys

    from conftest import make_image_folder

    from leukoscope.cli import main

    data = make_image_folder(tmp_path / "data", n_per_class=1)
    assert main(["predict", "wbc", str(data), "--out", str(tmp_path / "warm.csv")]) == 0  # the ONNX graph cached (onnx exports it)
    code = ("import sys; from leukoscope.cli import main; "
            f"code = main(['predict', 'wbc', {str(data)!r}, '--out', {str(tmp_path / 'p.csv')!r}]); "
            "print(sorted(m for m in ('sklearn', 'onnx', 'onnxruntime') if m in sys.modules)); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "['onnxruntime']"
    field = next((data / "blast").iterdir())  # count's report: no Grad-CAM (its PNG helper cost 3 s of imports)
    code = ("import sys; from leukoscope.cli import main; "
            f"code = main(['count', {str(field)!r}, '--out', {str(tmp_path / 'count')!r}]); print('pytorch_grad_cam' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.stdout.splitlines()[-1] == "False", done.stderr


def test_help_and_a_misspelt_command_answer_without_importing_pytorch():
    """``leukoscope --help``, a command's help and a typo's suggestion took 2.4 s, most of it importing PyTorch for
    option values; they come from ``options`` now (0.2-0.3 s)."""
    import subprocess
    import sys

    code = ("import sys; from leukoscope.cli import build_parser, main; build_parser(); code = main(['predcit']); "
            "print(code, sorted(m for m in ('torch', 'sklearn', 'onnxruntime', 'scipy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.splitlines()[-1] == "2 []", done.stderr
    assert "did you mean 'predict'?" in done.stderr
