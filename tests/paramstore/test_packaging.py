"""What a trainer installs: the `paramstore` client alone, without the server.

The import checks run in subprocesses, so what a fresh interpreter imports is what is
checked (this test process has the server loaded already).
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Not `rich`: the server's operator CLI uses it, but httpx imports it too when it is installed (its CLI).
SERVER_ONLY = ("api", "store", "fastapi", "starlette", "uvicorn", "pysyncobj", "cryptography", "prometheus_client")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def test_importing_the_client_loads_neither_the_server_nor_torch(tmp_path: Path) -> None:
    code = "import sys, paramstore\nprint(sorted({m.split('.')[0] for m in sys.modules}))"
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded = set(eval(proc.stdout))
    assert "paramstore" in loaded and "httpx" in loaded
    assert not loaded & {"torch", *SERVER_ONLY}, loaded & {"torch", *SERVER_ONLY}


def test_client_names_are_exported() -> None:
    import paramstore

    assert paramstore.ParamStoreClient is paramstore.Client
    assert issubclass(paramstore.NotFoundError, paramstore.ParamStoreError)
    for name in paramstore.__all__:
        assert hasattr(paramstore, name), name
    with pytest.raises(ValueError, match="at least one replica URL"):
        paramstore.Client(" , ")


def test_torch_helpers_without_torch_name_the_extra(tmp_path: Path) -> None:
    code = "import sys; sys.modules['torch'] = None  # as if torch were not installed\nimport paramstore.torch"
    proc = run_python(code, tmp_path)
    assert proc.returncode != 0
    assert "pip install 'paramstore[torch]'" in proc.stderr, proc.stderr


def test_server_cli_without_the_server_extra_says_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "for m in ('fastapi', 'pysyncobj'): sys.modules[m] = None  # not installed\n"
        "from api.cli import main\n"
        "sys.exit(main(['serve']))"
    )
    proc = run_python(code, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "missing: fastapi, pysyncobj" in proc.stderr
    assert "pip install 'paramstore[server]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_old_import_path_still_works_and_warns() -> None:
    import paramstore

    sys.modules.pop("api.client", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from api.client import ParamStoreClient, UnavailableError, torch_utils
    assert ParamStoreClient is paramstore.Client and UnavailableError is paramstore.UnavailableError
    assert any(
        issubclass(w.category, DeprecationWarning) and "from paramstore import Client" in str(w.message) for w in caught
    )
    assert torch_utils.__name__ == "paramstore.torch"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip install paramstore` would get, built from a copy of what
    the build reads (setuptools writes build/ and *.egg-info next to the sources)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    for d in ("paramstore", "store", "api"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = (tmp / "dist").glob("paramstore-*.whl")
    return built


def test_wheel_requires_only_the_client_dependencies(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    requires = meta.get_all("Requires-Dist") or []
    base = {r.split(";")[0].split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r}
    assert base == {"numpy", "httpx", "safetensors"}, requires
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"server", "torch", "dev"} <= extras

    def in_extra(extra: str) -> set[str]:
        return {
            r.split(";")[0].split(">")[0].split("=")[0].split("[")[0].strip()
            for r in requires
            if f'extra == "{extra}"' in r
        }

    assert {"fastapi", "uvicorn", "pysyncobj", "cryptography", "prometheus-client"} <= in_extra("server")
    assert "torch" in in_extra("torch")
    assert any(r.startswith("paramstore[") and "server" in r and 'extra == "dev"' in r for r in requires)


def test_wheel_ships_the_client_package_typed(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for f in ("__init__.py", "_client.py", "_errors.py", "_wire.py", "torch.py", "py.typed"):
        assert f"paramstore/{f}" in names, f
    assert "api/cli.py" in names and "store/state.py" in names  # the server, for the [server] extra
