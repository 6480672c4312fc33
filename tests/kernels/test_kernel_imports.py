"""The kernels/ import rule (issue 13): a kernel file imports, from inside the package, only kernels/common.py, and
only its public names; private helpers are never shared across kernel files. Read from the source, no import."""
import ast
import pathlib

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "kernels"


def _relative_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            yield node.module, [a.name for a in node.names]


def test_kernel_files_import_only_public_names_of_common():
    bad = []
    for path in sorted(KERNELS.glob("*.py")):
        if path.name in ("common.py", "__init__.py"):
            continue
        for module, names in _relative_imports(path):
            if module != "common":
                bad.append(f"{path.name} imports from .{module}")
            bad += [f"{path.name} imports private {n} from .common" for n in names if n.startswith("_")]
    assert not bad, "\n".join(bad)


def test_common_imports_no_kernel_file():
    assert not list(_relative_imports(KERNELS / "common.py"))
