"""Install the four top-level source folders as subpackages of one `facegen` package.

The folders keep the layout the project is known by (models/, engine/, cluster/, jobs/) while the
installed import names are facegen.models, facegen.engine, facegen.cluster and facegen.jobs, so a
user's own `models` or `engine` package never mixes with ours. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

SOURCE_FOLDERS = ("models", "engine", "cluster", "jobs")

packages = [f"facegen.{name}" for name in find_packages(include=[f"{top}*" for top in SOURCE_FOLDERS])]
package_dir = {f"facegen.{top}": top for top in SOURCE_FOLDERS}

setup(packages=packages, package_dir=package_dir)
