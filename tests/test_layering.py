"""The tree is the architecture: the engine (nn) and its loop (training) never import the
services around them, checked in a fresh interpreter so nothing imported by other tests counts."""

import subprocess
import sys

import pytest

CHECK = """
import importlib, pkgutil, sys
import convtrain.{package} as package
for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(module.name)
print(" ".join(sorted(name for name in {forbidden!r} if name in sys.modules)))
"""


@pytest.mark.parametrize("package, forbidden", [
    ("nn", ("mlflow", "optuna", "typer", "rich")),
    ("training", ("mlflow", "optuna", "typer")),
    ("data", ("mlflow", "optuna", "typer", "rich")),
])
def test_a_lower_layer_imports_none_of_the_services_above_it(package, forbidden):
    done = subprocess.run([sys.executable, "-c", CHECK.format(package=package, forbidden=forbidden)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"convtrain.{package} imports {done.stdout.strip()}"


def test_only_the_entry_points_stay_at_the_top_of_the_package():
    from pathlib import Path

    import convtrain

    top = {p.name for p in Path(convtrain.__file__).parent.glob("*.py")}
    assert top == {"__init__.py", "__main__.py", "errors.py", "config.py", "cli.py"}
