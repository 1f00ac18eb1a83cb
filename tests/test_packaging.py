"""The pack as CI, ComfyUI-Manager and ComfyUI see it."""
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    block = ci.split("# --- the README's test command")[1].split("\n")[1].strip()
    assert "pytest" in block
    assert block in (ROOT / "README.md").read_text(), "README and .ci/run must show the same test command"


def test_dependencies_are_floors_and_torch_is_not_pinned():
    reqs = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert reqs and all(">=" in r and "==" not in r and "~=" not in r for r in reqs), reqs
    assert not any(r.startswith(("torch", "torchvision", "torchaudio")) for r in reqs)
    py = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"dependencies = \[(.*?)\]", py, re.S).group(1)
    assert "==" not in deps and "torchvision" not in deps and "torch>=" in deps
    assert "[tool.comfy]" in py and "PublisherId" in py
    assert "torch==" in (ROOT / ".ci" / "constraints.txt").read_text()


def _floors(lines) -> dict:
    out = {}
    for line in lines:
        m = re.fullmatch(r'\s*"?([A-Za-z0-9_.-]+)>=([^",;\s]+)((?:,!=[^",;\s]+)*)"?,?\s*', line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = ">=" + m.group(2) + m.group(3)
    return out


def test_requirements_and_pyproject_declare_the_same_floors():
    py = (ROOT / "pyproject.toml").read_text()
    deps = _floors(re.search(r"dependencies = \[(.*?)\]", py, re.S).group(1).splitlines())
    reqs = _floors((ROOT / "requirements.txt").read_text().splitlines())
    assert deps.pop("torch") and reqs == deps, (reqs, deps)


def test_the_lock_pins_every_package_at_or_above_its_floor():
    """.ci/constraints.txt (what the README's test command and .ci/run install) pins exact versions only, torch on
    the local CPU build, and every declared dependency inside its declared range."""
    from packaging.specifiers import SpecifierSet

    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>~!,;]", version), line
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    assert pins["torch"] == "2.13.0"
    py = (ROOT / "pyproject.toml").read_text()
    declared = _floors(re.search(r"dependencies = \[(.*?)\]", py, re.S).group(1).splitlines())
    declared.update(_floors(re.search(r"^test = \[(.*?)\]", py, re.M | re.S).group(1).split(",")))
    for name, spec in declared.items():
        assert name in pins, f"{name} is declared but not locked"
        assert SpecifierSet(spec).contains(pins[name]), (name, pins[name], spec)


def test_ci_runs_the_lock_then_the_floors_and_the_newest_set():
    ci = (ROOT / ".ci" / "run").read_text().split("# --- the README's test command")[1]  # the script, not its header
    assert ci.index("python3 -m pytest") < ci.index("bash .ci/versions floors") < ci.index("bash .ci/versions newest")
    versions = (ROOT / ".ci" / "versions").read_text()
    assert '"$rc" -eq 5' in versions and '"$lock_rc" -eq 5' in ci  # pytest's "no tests collected" is a failure
    assert "grep -E '^torch==' .ci/constraints.txt" in versions  # torch stays the local CPU build


def test_registry_ids_prefixes_and_tooltips():
    import tunelab

    classes, names = tunelab.NODE_CLASS_MAPPINGS, tunelab.NODE_DISPLAY_NAME_MAPPINGS
    assert {"TuneLabLoadPipeline", "TuneLabGenerate", "TuneLabLoadLora", "TuneLabApplyWrongLora",
            "TuneLabCompare"} <= set(classes)
    for node_id, cls in classes.items():
        assert node_id.startswith("TuneLab") and names[node_id].startswith("TuneLab ")
        assert cls.CATEGORY.startswith("TuneLab/")
        assert callable(getattr(cls, cls.FUNCTION))
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, value in spec.get(section, {}).items():
                assert len(value) == 2 and value[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)


def test_import_loads_no_model_and_no_comfyui():
    code = ("import sys, tunelab\n"
            "from tunelab.core import models\n"
            "assert not models._CACHE\n"
            "assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules\n"
            "assert 'diffusers.pipelines' not in sys.modules, 'importing the pack must not build pipelines'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_only_host_imports_comfyui():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.name == "host.py" or "tests" in path.parts or ".venv" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(import|from)\s+(comfy|folder_paths)\b", text, re.M):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_pack_loads_under_another_folder_name(tmp_path):
    """ComfyUI imports custom_nodes/<any-folder-name>/__init__.py as a package; relative imports must hold."""
    link = tmp_path / "Some-Pack.Name"
    link.symlink_to(ROOT)
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('x_y_z', r'{link / '__init__.py'}', "
            f"submodule_search_locations=[r'{link}'])\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['x_y_z'] = m; spec.loader.exec_module(m)\n"
            "assert 'TuneLabLoadPipeline' in m.NODE_CLASS_MAPPINGS\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_missing_dependency_hides_only_its_nodes(monkeypatch, caplog):
    import sys

    from tunelab.nodes import registry

    full, _ = registry.build()
    # a node module whose import fails the way a missing optional package does
    monkeypatch.setitem(sys.modules, "tunelab.nodes.instruct", None)
    with caplog.at_level("WARNING", logger="tunelab"):
        classes, names = registry.build()
    assert "TuneLabInstructEdit" not in classes and "TuneLabInstructEdit" in full
    assert set(full) - set(classes) == {k for k in full if k.startswith("TuneLabInstruct")}
    assert "TuneLabLoadPipeline" in classes and set(classes) == set(names)
    assert any("instruct" in r.getMessage() and "not installed" in r.getMessage() for r in caplog.records)


def _relative_imports(path: Path) -> set:
    """Sibling modules `path` imports relatively, at module level or inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return found


def test_layout_root_holds_only_entry_points_and_core_has_no_import_circle():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if tracked:  # a git checkout (CI, development)
        assert sorted(p for p in tracked if "/" not in p) == ["__init__.py", "__main__.py", "host.py"]
    for package in ("core", "cli", "nodes", "training"):
        modules = {p.stem: p for p in (ROOT / package).glob("*.py")}
        graph = {m: _relative_imports(p) & set(modules) - {m} for m, p in modules.items()}
        cycles = []

        def walk(node, path, seen):
            for dep in sorted(graph[node]):
                if dep in path:
                    cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
                elif dep not in seen:
                    seen.add(dep)
                    walk(dep, path + [dep], seen)

        for m in sorted(graph):
            walk(m, [m], {m})
        assert not cycles, f"import circles in {package}/: {sorted(set(cycles))[:5]}"


def test_suite_runs_from_a_checkout_folder_of_any_name(tmp_path):
    """A checkout named like a ComfyUI custom-nodes folder (`ComfyUI-TuneLab`) is not a Python identifier; pytest
    must not import the pack's root `__init__.py` by that name (tests/conftest.py collects the root as a folder)."""
    import shutil

    copy = tmp_path / "ComfyUI-TuneLab"  # a copy, not a link: pytest resolves links to the real folder name
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "*.jpg"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_packaging.py", "-k", "registry_ids"],
                          cwd=copy, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
