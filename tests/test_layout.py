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


# -- the import direction inside xatl/ ---------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _xatl_imports(path: Path) -> set[str]:
    """The xatl modules a file imports, at any depth of its code (late imports included); `from
    package import name` counts the submodule when there is one."""
    known = {_module_name(p) for p in _library_files()}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known}


def _files_under(folder: str) -> list[Path]:
    path = ROOT / folder
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def test_the_engine_imports_no_mixer_module():
    """The serving engine runs the model through `decode_step` and batches states through the mixer
    state contract (`xatl.mixers.base`); it never reads a mixer's own layout."""
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in _files_under("xatl/serving")
        for module in _xatl_imports(path)
        if module.startswith("xatl.mixers") and module != "xatl.mixers.base"
    ]
    assert offenders == []


def test_donors_import_no_model():
    """Donors are read into the canonical layout and checked against it (`canonical_shapes`); the
    model meets the donor in `xatl.transfer` and `xatl.convert`."""
    above = ("xatl.model", "xatl.mixers", "xatl.transfer", "xatl.convert", "xatl.training", "xatl.serving")
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in _files_under("xatl/donors")
        for module in _xatl_imports(path)
        if module.startswith(above)
    ]
    assert offenders == []


def test_the_config_imports_nothing_above_it():
    """The config is plain data: it imports only the torch-free option tables beside it."""
    for name in ("xatl/config.py", "xatl/mixer_options.py", "xatl/artifacts.py"):
        allowed = {"xatl.mixer_options"} if name == "xatl/config.py" else set()
        assert _xatl_imports(ROOT / name) - allowed == set(), name


def test_no_import_circle_in_the_library():
    graph = {_module_name(path): _xatl_imports(path) for path in _library_files()}
    # a module importing its own package (`from xatl.donors import gguf_file` inside xatl/donors/)
    # finds it initialised already: that edge is no circle
    for name in list(graph):
        graph[name] = {m for m in graph[name] if not (name == m or name.startswith(m + "."))}
    circles = []

    def visit(module, trail):
        if module in trail:
            circles.append(" -> ".join(trail[trail.index(module):] + [module]))
            return
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, trail + [module])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [])
    assert circles == []
