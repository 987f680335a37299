"""What pyproject.toml declares is what the code imports, and the reverse."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
# Distribution name -> import name, where they differ.
IMPORT_NAME = {
    "pillow": "PIL",
    "pyyaml": "yaml",
    "segment-anything": "segment_anything",
    "pytorch-fid": "pytorch_fid",
    "huggingface-hub": "huggingface_hub",
}
# Declared, never imported by name, each for a reason given in pyproject.toml.
NOT_IMPORTED = {
    "accelerate": "diffusers/transformers use it for low-memory loading",
    "onnxruntime": "NudeNet's runtime (its presence is checked with importlib.util.find_spec)",
}


def imports(package: str) -> set[str]:
    """Top-level names of every absolute import in a package's source."""
    out = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
    return {m for m in out if m not in sys.stdlib_module_names and m not in ("mace_core", "mace_ray")}


def declared(*groups: str) -> dict[str, str]:
    """Import name -> distribution name of the main dependencies and the given extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for g in groups:
        reqs += project["optional-dependencies"][g]
    names = [Requirement(r).name.lower() for r in reqs if not r.startswith("mace-ray")]
    return {IMPORT_NAME.get(n, n.replace("-", "_")): n for n in names}


def test_every_import_of_the_package_is_declared():
    used = imports("mace_core") | imports("mace_ray")
    missing = used - set(declared("eval"))
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_every_declared_dependency_is_used():
    used = imports("mace_core") | imports("mace_ray")
    unused = {d for m, d in declared("eval").items() if m not in used and d not in NOT_IMPORTED}
    assert not unused, f"declared but never imported: {sorted(unused)}"
    for dist in NOT_IMPORTED:
        assert dist in declared("eval").values(), f"{dist} is listed as a reasoned exception but not declared"


def test_erasing_needs_no_eval_extra():
    """The erase path imports nothing of the eval extra: a plain `pip install mace-ray` erases."""
    eval_only = set(declared("eval")) - set(declared())
    # Everything but eval and audit (their packages and their CLI modules), in every subpackage.
    erase_modules = [
        p
        for p in [*(REPO / "mace_ray").rglob("*.py"), *(REPO / "mace_core").rglob("*.py")]
        if not {"eval", "evaluation", "audit"} & {*p.relative_to(REPO).parent.parts, p.stem}
    ]
    assert len(erase_modules) > 60, len(erase_modules)  # the subpackages are walked
    for path in erase_modules:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            assert not set(names) & eval_only, f"{path.name} imports {set(names) & eval_only}"


def test_the_erase_code_imports_with_the_eval_packages_absent():
    """Importing the CLI and the erase job must not pull in the eval extra (torchvision stays:
    the setup installs it with torch, and transformers' image processors use it)."""
    blocked = ("matplotlib", "nudenet", "onnxruntime", "pytorch_fid")
    code = (
        f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
        "import mace_ray.cli.main, mace_ray.erase.driver, mace_ray.erase.concept_worker, mace_core.masking\n"
        "from typer.testing import CliRunner\n"
        "args = ['eval', 'tiny', '--suite', 'coco', '--output', '/nonexistent/x']\n"
        "r = CliRunner().invoke(mace_ray.cli.main.app, args)\n"
        "import json; print(json.dumps([r.exit_code, r.stderr.strip()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    code_, message = json.loads(out.stdout.strip().splitlines()[-1])
    # eval itself says in one line what to install
    assert code_ == 2 and len(message.splitlines()) == 1, message
    assert "mace-ray[eval]" in message and "matplotlib" in message, message
