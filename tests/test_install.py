"""A plain `pip install` leaves img2dataset's `dataclasses` backport (PyPI 0.6) in site-packages:
Prefect's temporary server must start anyway.

The environment: a venv over this one's site-packages (a link per entry) with the real
`dataclasses` 0.6 installed next to prefect, as `pip install clipscrub` leaves it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def backport_venv(tmp_path_factory) -> Path:
    """The python of a venv whose site-packages holds this one's packages and `dataclasses` 0.6."""
    import prefect

    ours = Path(prefect.__file__).resolve().parent.parent
    venv = tmp_path_factory.mktemp("backport") / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = site_packages(python)
    for entry in ours.iterdir():
        if entry.name != "__pycache__" and not entry.name.startswith("dataclasses"):
            (site / entry.name).symlink_to(entry)
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                          "--target", str(site), "dataclasses==0.6"], capture_output=True, text=True, timeout=300, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot fetch dataclasses==0.6 from PyPI: {res.stderr.strip().splitlines()[-1:]}")
    assert (site / "dataclasses.py").is_file() and (site / "prefect").is_dir()
    return python


def run_in(python: Path, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # no __pycache__ written through the links into this venv
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([str(python), "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_the_backport_shadows_the_stdlib_under_prefects_app_dir(backport_venv):
    """The mechanism: Prefect runs its server as `python -m uvicorn --app-dir <site-packages>`, and
    uvicorn puts that folder ahead of the standard library: pydantic gets the 3.6 backport."""
    site = site_packages(backport_venv)
    res = subprocess.run(
        [str(backport_venv), "-m", "uvicorn", "--app-dir", str(site), "--factory", "prefect.server.api.server:create_app",
         "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=REPO, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), capture_output=True, text=True, timeout=120,
        check=False)
    assert res.returncode != 0
    # pydantic-settings' @dataclass(slots=True) met the backport's dataclass()
    assert "dataclass() got an unexpected keyword argument 'slots'" in res.stderr


def test_the_temporary_server_starts_with_the_backport_installed(backport_venv):
    res = run_in(backport_venv, """
import dataclasses, httpx, prefect
from pathlib import Path
from clipscrub.flows.clean import private_prefect
assert (Path(prefect.__file__).parent.parent / 'dataclasses.py').is_file()
with private_prefect() as url:
    print('health', httpx.get(url + '/health').json())
""")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "health True" in res.stdout


def test_the_package_declares_ranges_and_our_machines_pin_exact_builds():
    """pyproject.toml must not force a user's torch: it declares ranges; the exact builds our
    machines serve from local files are in scripts/constraints.txt, which setup.sh installs with."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    deps = {r.name: r for r in map(Requirement, tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])}
    pinned = {}
    for line in (REPO / "scripts" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pinned[req.name] = req
    assert set(pinned) == {"torch", "torchvision"}
    for name, req in pinned.items():
        assert [s.operator for s in req.specifier] == ["=="], req
        assert all(s.operator != "==" for s in deps[name].specifier), deps[name]
        version = next(iter(req.specifier)).version
        assert deps[name].specifier.contains(version), (deps[name], version)  # the pin is within the range
    assert "-c scripts/constraints.txt" in (REPO / "scripts" / "setup.sh").read_text()
