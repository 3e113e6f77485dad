"""The set-up a fresh machine gets: the lock, environment.yml and pyproject.toml agree, the
virtualenv holds exactly the locked versions, a built wheel carries the shipped weights, and
``make lab`` serves as root and as a normal user."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import sagkit as sk

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# the installer's own tools, torch (pinned by pyproject, installed first) and sagkit itself
NOT_LOCKED = {"pip", "uv", "torch", "sagkit"}


def locked() -> dict[str, str]:
    """requirements.lock as {canonical name: version}."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def project_requirements() -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def torch_pin() -> str:
    (torch,) = [r for r in project_requirements() if r.name == "torch"]
    return str(torch.specifier)


def test_lock_satisfies_every_project_requirement():
    pins = locked()
    for req in project_requirements():
        if req.name == "torch":
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock"
        assert req.specifier.contains(pins[name]), f"lock has {name}=={pins[name]}, wants {req}"


def test_lock_holds_no_torch_and_no_cuda_packages():
    """The lock is resolved against torch's CPU wheel; torch itself is pinned in pyproject."""
    cuda = [n for n in locked() if n.startswith(("nvidia-", "cuda-", "triton")) or n == "torch"]
    assert not cuda
    assert torch_pin() == "==2.13.0"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH\s*:= torch==2\.13\.0$", makefile, re.M)


def test_virtualenv_holds_exactly_the_locked_versions():
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    pins = locked()
    wrong = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v}
    assert not wrong, f"locked vs installed: {wrong}"
    extra = set(installed) - set(pins) - NOT_LOCKED
    assert not extra, f"installed but not locked: {sorted(extra)}"
    assert Requirement(f"torch{torch_pin()}").specifier.contains(installed["torch"])


def test_environment_yml_agrees_with_pyproject_and_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    (python,) = [d for d in conda if d.startswith("python")]
    version = python.split("=")[1]
    assert Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier.contains(
        version + ".0"
    )
    # the lock was resolved for this Python (its header names the command, the Makefile the flag)
    assert f"--python-version {version}" in (ROOT / "Makefile").read_text()
    assert f"torch{torch_pin()}" in pip
    assert "-r requirements.lock" in pip and "-e ." in pip


def test_version_and_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "sagkit", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"sagkit {sk.__version__}"
    assert PYPROJECT["project"]["license"] == "MIT" and (ROOT / "LICENSE").is_file()


@pytest.mark.slow
def test_wheel_carries_the_weights_and_loads_both_models(tmp_path):
    """Build the wheel, install it (without dependencies) into a folder of its own and load
    both shipped models from that copy, not from this checkout."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent))
    subprocess.run(
        [uv, "build", "--wheel", "--quiet", "--out-dir", str(tmp_path / "dist"), str(ROOT)],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("sagkit-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [uv, "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    script = (
        "import sagkit as sk, torch\n"
        "m = sk.digits.load_pretrained('digits', device='cpu')\n"
        "c = sk.digits.load_classifier('digits', device='cpu')\n"
        "x = sk.digits.sample_digits(m, [3], steps=2, generator=torch.Generator().manual_seed(0))\n"
        "print(sk.__file__, tuple(x.shape), tuple(c(x).shape))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    where, shapes = out.stdout.split(" ", 1)
    assert Path(where).is_relative_to(target)
    assert shapes.strip() == "(1, 1, 16, 16) (1, 10)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user(user: str) -> list[str]:
    if user == "root":
        if os.geteuid() != 0:
            pytest.skip("serving as root needs root")
        return []
    if os.geteuid() != 0:
        return []  # this process already is a normal user
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("no setpriv to drop root")
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    python = (ROOT / ".venv" / "bin" / "python").resolve()
    closed = [p for p in python.parents if not p.stat().st_mode & 0o001]
    if closed:
        # e.g. a Python installed under /root: a normal user would have built their own .venv
        pytest.skip(f"{closed[-1]} is closed to other users, so they cannot run {python}")
    return prefix


@pytest.mark.slow
@pytest.mark.parametrize("user", ["root", "normal user"])
def test_make_lab_serves(user):
    """``make lab``, the README's main command, answers on /api/status."""
    prefix = _as_user(user)
    home = Path(tempfile.mkdtemp(prefix="sagkit-lab-"))
    home.chmod(0o777)  # writable for the unprivileged user too
    port, token = _free_port(), "sagkit-make-lab-test"
    flags = f"--no-browser --ip=127.0.0.1 --port={port} --IdentityProvider.token={token}"
    env = dict(
        os.environ,
        HOME=str(home),
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
    )
    log = home / "lab.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*prefix, "make", "--no-print-directory", "-C", str(ROOT), "lab", f"LAB_FLAGS={flags}"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status = urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2
                )
                assert status.status == 200
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)
