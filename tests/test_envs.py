"""The conda environment files and the pip lock files pin the same versions."""

import re
from pathlib import Path

import pytest
import yaml

ENVS = Path(__file__).resolve().parents[1] / "envs"


def pip_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_conda_pins_equal_pip_lock(flavour):
    env = yaml.safe_load((ENVS / f"esparse-{flavour}.yaml").read_text())
    lock = pip_pins(ENVS / f"requirements-{flavour}.txt")
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert pip_section, "the conda file must pin its pip packages"
    for requirement in pip_section:
        name, version = requirement.split("==", 1)
        key = re.sub(r"[-_.]+", "-", name).lower()
        assert key in lock, f"{name} is pinned in esparse-{flavour}.yaml but not in requirements-{flavour}.txt"
        assert lock[key] == version, f"{name}: conda file pins {version}, lock file pins {lock[key]}"


def test_pyproject_dependencies_are_locked():
    import tomllib

    project = tomllib.loads((ENVS.parent / "pyproject.toml").read_text())["project"]
    lock = pip_pins(ENVS / "requirements-cpu.txt")
    names = list(project["dependencies"])
    for extra in ("workflow", "eval", "kernels", "test"):
        names += project["optional-dependencies"][extra]
    for requirement in names:
        name = re.split(r"[<>=!~\[ ]", requirement, 1)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in lock, f"{name} from pyproject.toml is not in the lock file"


def test_cpu_and_cuda_locks_differ_only_in_comments():
    assert pip_pins(ENVS / "requirements-cpu.txt") == pip_pins(ENVS / "requirements-cuda.txt")
