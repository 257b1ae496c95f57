"""The locked environment: pyproject.toml, requirements.lock, the Makefile's install, the
workflow's conda environment and the Apptainer definition must all describe one set of
packages. The conda environment and the image cannot be built here, so they are parsed and
compared with the lock; `snakemake --lint` checks that every rule names the environment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11, the version of the lock

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCK = REPO / "requirements.lock"
TORCH_PINS = {"torch": "2.14.1", "torchvision": "0.29.1"}  # the builds this project runs on


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if not requirement:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!_-]+)", requirement)
        assert match, f"requirements.lock: not an exact pin: {line!r}"
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = project["dependencies"] + extras["workflow"] + extras["offline"] + extras["dev"]
    return [Requirement(text) for text in declared]


def test_lock_pins_every_declared_package_within_its_bounds():
    pins = lock_pins()
    assert len(pins) > 100  # every package, not just the direct ones
    for requirement in pyproject_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is declared in pyproject.toml but not locked; run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} in requirements.lock breaks pyproject's {requirement}")
    assert "bayestune" not in pins  # the package itself is installed from the checkout


def test_torch_is_pinned_alike_in_pyproject_and_lock():
    declared = {canonicalize_name(r.name): str(r.specifier) for r in pyproject_requirements()}
    pins = lock_pins()
    for name, version in TORCH_PINS.items():
        assert declared[name] == f"=={version}", name
        assert pins[name] == version, name


def test_lock_says_how_it_was_made():
    header = LOCK.read_text().split("\n\n", 1)[0]
    assert "pip-compile with Python 3.11" in header and "make lock" in header
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\nlock:", 1)[1].split("\n\n", 1)[0]
    for extra in ("workflow", "offline", "dev"):
        assert f"--extra {extra}" in recipe
    assert "pip-compile" in recipe and "pyproject.toml" in recipe


def test_make_install_installs_torch_then_the_lock_then_the_package(tmp_path):
    """The recipe as make would run it in a fresh clone (printed, not run)."""
    printed = subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path}/venv"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    pips = [line for line in printed.splitlines() if "pip install" in line]
    torch_step = next(i for i, line in enumerate(pips)
                      if "torch==2.14.1" in line and "torchvision==0.29.1" in line)
    lock_step = next(i for i, line in enumerate(pips) if "-r requirements.lock" in line)
    package_step = next(i for i, line in enumerate(pips) if "--no-deps" in line)
    assert torch_step < lock_step < package_step
    assert pips[package_step].rstrip().endswith("-e .")


def test_conda_env_pins_are_the_lock():
    env = yaml.safe_load((REPO / "workflow/envs/bayestune.yaml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict))
    pins = {}
    for line in pip_section:
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
    assert pins == lock_pins(), "workflow/envs/bayestune.yaml is out of date: run make lock"


def def_sections(text: str) -> dict[str, str]:
    """An Apptainer definition: the header keywords and each %section's body."""
    sections, name = {"header": ""}, "header"
    for line in text.splitlines():
        if line.startswith("%"):
            name = line[1:].split()[0]
            sections[name] = ""
        elif not line.lstrip().startswith("#"):
            sections[name] += line + "\n"
    return sections


def test_container_definition_installs_the_lock():
    sections = def_sections((REPO / "containers/bayestune.def").read_text())
    header = dict(line.split(":", 1) for line in sections["header"].splitlines() if ":" in line)
    assert header["Bootstrap"].strip() == "docker"
    assert re.fullmatch(r"python:3\.11[\w.-]*", header["From"].strip())
    copied = {line.split()[0] for line in sections["files"].splitlines() if line.strip()}
    assert {"requirements.lock", "pyproject.toml", "src"} <= copied
    post = [line.strip() for line in sections["post"].splitlines() if "pip install" in line]
    torch_step = next(i for i, line in enumerate(post) if "requirements.lock | cut" in line)
    lock_step = next(i for i, line in enumerate(post) if "-r requirements.lock" in line)
    package_step = next(i for i, line in enumerate(post) if "--no-deps ." in line)
    assert torch_step < lock_step < package_step
    # The torch step reads its pins from the lock: the same grep, run here, finds both.
    pins = subprocess.run(["sh", "-c", "grep -E '^torch(vision)?==' requirements.lock | cut -d' '"
                           " -f1"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert pins == [f"{n}=={v}" for n, v in TORCH_PINS.items()]
    assert "python -m bayestune" in sections["runscript"]


@pytest.mark.parametrize("config", ["config/config.yaml", "config/demo.yaml"])
def test_snakemake_lint_is_clean(config):
    """Among others, the linter asks every rule for a conda environment or a container."""
    result = subprocess.run([str(BIN / "snakemake"), "--lint", "--configfile", config],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "in a good condition" in output, output[-4000:]


def test_rules_name_the_environment_and_tables_run_locally():
    """Read through Snakemake's own API (the private attributes of the pinned version)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(),
                                config_settings=ConfigSettings(),
                                snakefile=REPO / "Snakefile", workdir=REPO)._workflow
        rules = {rule.name: rule for rule in workflow.rules}
        stages = ("cut_vocabulary", "prepare", "sample", "mask", "finetune")  # mask_fixed, ...
        compute = {name for name in rules if name.startswith(stages)}
        assert {"cut_vocabulary", "prepare", "sample", "mask", "mask_fixed", "finetune"} <= compute
        assert set(workflow._localrules) == set(rules) - compute  # tables and figures
        for name, rule in rules.items():
            if name != "all":
                assert str(rule.conda_env) == "../envs/bayestune.yaml", name  # rules/ relative
