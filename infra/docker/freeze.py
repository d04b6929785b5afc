"""Print the exact installed version of atoken's runtime dependencies, all the way down (less local build tags
such as torch's +cpu, so that the GPU image's +cu128 build meets the same pin): the images' PIP_CONSTRAINT file.

    .venv/bin/python infra/docker/freeze.py > infra/docker/constraints.txt
"""

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(requirements: list[str]) -> dict[str, str]:
    """name → installed version of every distribution `requirements` need at run time, all the way down."""
    pins: dict[str, str] = {}
    pending: list[tuple[list[str], frozenset]] = [(requirements, frozenset())]
    while pending:
        lines, extras = pending.pop()
        for line in lines:
            requirement = Requirement(line)
            if requirement.marker and not any(
                requirement.marker.evaluate({"extra": extra}) for extra in (extras or {""})
            ):
                continue
            key = canonicalize_name(requirement.name)
            try:
                version = importlib.metadata.version(key)
            except importlib.metadata.PackageNotFoundError:
                continue  # an optional dependency this environment does not need
            if key not in pins or requirement.extras:
                pins[key] = version.split("+")[0]
                pending.append((importlib.metadata.distribution(key).requires or [], frozenset(requirement.extras)))
    return pins


if __name__ == "__main__":
    print("# Exact versions for the images' installs (PIP_CONSTRAINT), from the .venv the tests passed in:")
    print("#   .venv/bin/python infra/docker/freeze.py > infra/docker/constraints.txt")
    # pyproject, not atoken's installed metadata: an editable install keeps the metadata of its install time.
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    for name, version in sorted(closure(project["dependencies"]).items()):
        print(f"{name}=={version}")
