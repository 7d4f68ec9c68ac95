"""The project's shape, read from the code's own imports (function-local ones included): scripts are entry points
that import only the `fcsft` package and libraries, the package never imports a script, and its modules import each
other without a cycle."""

import ast

from conftest import REPO

SCRIPTS = {p.stem: p for p in REPO.glob("*.py")}
MODULES = {p.stem: p for p in (REPO / "fcsft").glob("*.py") if p.stem != "__init__"}


def imported_names(path):
    """Every module name an import statement in the file names, at any depth of the code."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "fcsft":  # from fcsft import bfcl_data, ...
                names += [f"fcsft.{alias.name}" for alias in node.names]
    return names


def project_imports(path):
    """(scripts imported, fcsft modules imported) by one file."""
    names = imported_names(path)
    scripts = sorted({n for n in names if n in SCRIPTS})
    modules = sorted({n.split(".")[1] for n in names if n.startswith("fcsft.") and n.split(".")[1] in MODULES})
    return scripts, modules


def find_cycle(graph):
    """One import cycle of `graph` (module -> modules it imports) as a list, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in graph:
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_scripts_import_only_the_package():
    offenders = {name: project_imports(path)[0] for name, path in SCRIPTS.items() if project_imports(path)[0]}
    assert not offenders, f"scripts importing scripts: {offenders}"


def test_the_package_never_imports_a_script():
    offenders = {name: project_imports(path)[0] for name, path in MODULES.items() if project_imports(path)[0]}
    assert not offenders, f"fcsft modules importing scripts: {offenders}"


def test_the_package_has_no_import_cycle():
    graph = {name: [m for m in project_imports(path)[1] if m != name] for name, path in MODULES.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_checks_see_what_they_check():
    """The detectors themselves: a cycle and a script import are found where they exist."""
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": []}) is None
    assert "train_sft" in SCRIPTS and "recipe" in MODULES
    assert project_imports(REPO / "train_sft.py")[1]  # train_sft.py does import the package
