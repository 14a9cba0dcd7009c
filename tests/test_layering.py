"""The package layers: shared plumbing at the bottom, the ``tandem`` command on top, no cycles in between."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("services", "workers", "balancer", "profiler", "gateway", "bench", "tandem")
# what each package may import from the others (besides itself)
ALLOWED = {
    "services": set(),
    "workers": {"services"},
    "balancer": {"services"},
    "profiler": {"services", "workers"},
    "gateway": {"services", "profiler"},
    "bench": {"services", "workers", "balancer", "profiler", "gateway", "tandem"},
    "tandem": {"services", "workers", "balancer", "profiler", "gateway", "bench"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_the_layers_below_it(package: str) -> None:
    bad = {}
    for path in (ROOT / package).rglob("*.py"):
        if "proto" in path.parts:
            continue
        extra = imported_packages(path) - ALLOWED[package] - {package}
        if extra:
            bad[str(path.relative_to(ROOT))] = sorted(extra)
    assert not bad, f"{package} imports packages above it: {bad}"


@pytest.mark.parametrize("module", ["workers.scheduler", "workers.true_lengths", "workers.service", "balancer.service",
                                    "gateway.service", "profiler.service", "bench.simulator", "tandem.cli"])
def test_module_imports_on_its_own(module: str) -> None:
    """Each entry point imports first in a fresh interpreter (an import cycle shows only in some orders)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
