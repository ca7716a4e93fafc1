"""The shape of the code: the import graph (read with ast, every import anywhere in a file) has
no cycle between modules or between packages, ``config`` imports nothing else of the project,
the reader backends import only the reader base, config's lists match what they name, and no
module changes process-wide state when it is imported."""
import pytest
import ast
import json
import os
import subprocess
import sys
from typing import Dict, List, Set

from tests.conftest import REPO

PACKAGES = ("config", "data", "model", "utils")
SCRIPTS = ("tiles_creator", "train_net", "test_net", "quick_start")


def _modules() -> Dict[str, str]:
    """Module name -> file, for the project's packages and entry scripts."""
    found = {s: os.path.join(REPO, f"{s}.py") for s in SCRIPTS}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), REPO)[:-3].replace(os.sep, ".")
                    found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, name)
    return found


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the project modules it imports (at the top or inside a function)."""
    modules = _modules()

    def owner(name: str):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.add(owner(node.module))
                targets |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}: relative import (the project uses absolute imports)")
        graph[module] = {t for t in targets if t and t != module}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules_or_packages():
    graph = import_graph()
    assert "data.readers.tiff" in graph and "model.callbacks" in graph  # the walk sees the subpackages
    assert cycles(graph) == []
    packages = {}
    for module, targets in graph.items():
        top = module.split(".")[0]
        packages.setdefault(top, set()).update(t.split(".")[0] for t in targets if t.split(".")[0] != top)
    assert cycles(packages) == [], packages


def test_config_imports_nothing_else_of_the_project():
    graph = import_graph()
    outside = {m: sorted(t for t in targets if not t.startswith("config")) for m, targets in graph.items()
               if m.startswith("config")}
    assert all(not v for v in outside.values()), outside


def test_reader_backends_import_only_the_reader_base():
    graph = import_graph()
    backends = ("data.readers.tiff", "data.readers.openslide_reader", "data.readers.dicom", "data.readers.memory")
    for backend in backends:
        readers = {t for t in graph[backend] if t.startswith("data.readers")}
        assert readers <= {"data.readers.base", "data.readers.pixel_size"}, (backend, readers)


def test_config_lists_match_what_they_name():
    import segmentation_models_pytorch as smp

    from config.choices import ARCHITECTURES, LOSS_NAMES, SMP_ARCHITECTURES
    from model.build import MODELS
    from utils.losses import LOSSES

    assert set(LOSS_NAMES) == set(LOSSES)
    assert set(ARCHITECTURES) <= set(MODELS.names())  # (tests register stand-in models too)
    assert {a for a in MODELS.names() if not a.startswith("Test")} == set(ARCHITECTURES)
    assert sorted(c.__name__ for c in smp.MODEL_ARCHITECTURES_MAPPING.values()) == sorted(SMP_ARCHITECTURES)


PROBE = r"""
import csv, json, logging, os, sys, warnings
import matplotlib
repo = os.path.abspath(sys.argv[1])
calls = []

def spy(owner, name):
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        filename = sys._getframe(1).f_code.co_filename
        caller = os.path.abspath(filename)
        if not filename.startswith("<") and caller.startswith(repo + os.sep) and os.sep + "site-packages" + os.sep not in caller:
            calls.append(f"{name} from {os.path.relpath(caller, repo)}")
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)

for owner, name in ((warnings, "filterwarnings"), (warnings, "simplefilter"), (csv, "field_size_limit"),
                    (matplotlib, "use"), (logging.Logger, "addHandler"), (logging.Logger, "removeHandler"),
                    (logging.Logger, "setLevel"), (logging, "basicConfig")):
    spy(owner, name)
import importlib
for name in sys.argv[2:]:
    importlib.import_module(name)
print(json.dumps(calls))
"""


@pytest.mark.slow
def test_no_module_changes_process_wide_state_on_import():
    """Importing every module of the project calls nothing that changes the process: warning
    filters, the csv field limit, matplotlib's backend, logging handlers or levels (the
    scripts' set-up, utils.setup.configure_process / setup_logging, does that, once)."""
    modules = sorted(m for m in _modules() if m not in SCRIPTS)
    out = subprocess.run([sys.executable, "-c", PROBE, REPO, *modules], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    # the probe does see such a call
    probe = subprocess.run([sys.executable, "-c", PROBE.replace("import importlib", "import importlib\nfrom utils."
                            "setup import configure_process\nconfigure_process()"), REPO], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert "filterwarnings from utils/setup.py" in probe.stdout and "use from utils/setup.py" in probe.stdout
