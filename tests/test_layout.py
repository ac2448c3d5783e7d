"""The dependency direction of the house: xatl/ knows nothing of service/ or worker/ and reads no
environment variables (settings reach it as arguments)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _library_files():
    files = sorted((ROOT / "xatl").rglob("*.py"))
    assert files, "xatl/ has no Python files"
    return files


def _imported_modules(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_library_imports_nothing_from_service_or_worker():
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in _library_files()
        for module in _imported_modules(ast.parse(path.read_text()))
        if module.split(".")[0] in ("service", "worker")
    ]
    assert offenders == []


def test_library_reads_no_environment_variables():
    offenders = []
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                if isinstance(node.value, ast.Name) and node.value.id == "os":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_no_file_names_a_path_of_the_machine_it_was_written_on():
    """Code, docs and results name files relative to the repository or `../shared/...`: a reader
    elsewhere has no such folder as the one this clone lies in."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    here = f"{ROOT.parent}/"
    offenders = []
    for name in filter(None, tracked.stdout.split("\0")):
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary (a plot)
        offenders += [f"{name}:{n}" for n, line in enumerate(text.splitlines(), 1) if here in line]
    assert offenders == []
