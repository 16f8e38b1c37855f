"""The built wheel installs only `facegen`, and works beside a user's own `models/` and `engine/`."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked_copy(target: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith("tests/"):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


@pytest.mark.slow
def test_wheel_installs_one_top_level_package_and_ignores_user_packages(tmp_path):
    source = tracked_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".",
                    "-w", str(tmp_path / "dist")], cwd=source, check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("facegen-*.whl"))
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"facegen"}

    # A fresh venv holding only facegen; its dependencies come from this interpreter's site-packages
    # through PYTHONPATH, which (unlike the venv's own site) does not run the editable install's hook.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}

    # The user's project has packages named like our source folders.
    user = tmp_path / "user-project"
    for name in ("models", "engine"):
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text(f"WHO = 'user {name}'\n")
    probe = ("import models, engine, facegen.engine, facegen.models.errors;"
             "from facegen.engine.storage import Storage;"
             "assert models.WHO == 'user models' and engine.WHO == 'user engine', (models.WHO, engine.WHO);"
             "assert 'site-packages' in facegen.engine.__path__[0], facegen.engine.__path__;"
             "from facegen.models.demo import demo_model_paths;"
             "shipped = demo_model_paths();"
             "assert {'embedder', 'facts'} <= set(shipped), shipped;"
             "assert all('site-packages' in str(p) and p.stat().st_size for p in shipped.values()), shipped;"
             "print('ok')")
    run = subprocess.run([str(python), "-c", probe], cwd=user, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"

    out = user / "G.safetensors"
    cli = subprocess.run([str(env_dir / "bin" / "facegen"), "models", "init", "arcbiface", "--out", str(out),
                          "--set", "resolution=16", "--set", "channel_max=16"],
                         cwd=user, env=env, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert out.stat().st_size > 0
