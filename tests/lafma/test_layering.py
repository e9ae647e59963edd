"""lafma/ is pure PyTorch: no ray, mlflow or deepspeed, imported or reachable."""

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"ray", "mlflow", "deepspeed"}
LIB = Path(__file__).parents[2] / "lafma"


def test_no_forbidden_imports_in_the_library_source():
    offenders = []
    for path in sorted(LIB.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(LIB.parent)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in FORBIDDEN]
    assert len(list(LIB.rglob("*.py"))) > 10
    assert not offenders, offenders


def test_importing_the_whole_library_loads_none_of_them():
    modules = sorted("lafma." + ".".join(p.relative_to(LIB).with_suffix("").parts)
                     for p in LIB.rglob("*.py") if p.name != "__init__.py")
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + \
        f"print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
