"""Package discovery: every package under edgekit/ ships (no hand-kept list), plus the target
profiles, which live in the repository's targets/ directory and install as edgekit.profiles.
Everything else (metadata, dependencies, extras) is in setup.cfg."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["edgekit", "edgekit.*"]) + ["edgekit.profiles"],
    package_dir={"edgekit.profiles": "targets"},
)
