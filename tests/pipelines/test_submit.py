"""`vqtok submit` from a wheel install (its site-packages full of other packages): the job gets
vqtok's two packages and nothing else, runs that code, and finishes a real tokenize; and a
submission to a cluster without token auth from a client with a token file."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tok_data as td
from test_ray_utils import client_env
from test_tokenize_ray import check_rows, read_rows

REPO = Path(__file__).resolve().parents[2]
BIG = 8 << 20      # the dummy neighbour package's payload, incompressible


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tok_dir):
    return td.shard_set(tmp_path_factory.mktemp("shards"), tok_dir, 2, 60)


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """A site-packages dir holding vqtok installed from a wheel built here (offline) and a big
    dummy package next to it. The installed `python -m pipelines` prints where it runs from."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"                   # a copy: building writes build/ and *.egg-info
    src.mkdir()
    for name in ("pipelines", "tokenizer"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp / "dist").glob("vqtok-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    main = site / "pipelines" / "__main__.py"
    main.write_text("import sys\nprint('vqtok code from', __file__, file=sys.stderr, flush=True)\n" + main.read_text())
    big = site / "bigdummy"
    big.mkdir()
    (big / "__init__.py").write_text("")
    (big / "payload.dat").write_bytes(os.urandom(BIG))
    return site


def job_runtime_env(head, job_id: str) -> dict:
    """The runtime env the cluster recorded for the job (the job API, with the head's token)."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{head['dashboard']}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {head['token']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["runtime_env"]


def unpacked(head, uri: str) -> dict[str, int]:
    """Relative path -> size of the files the head unpacked from the package `uri`
    (gcs://_ray_pkg_<hash>.zip)."""
    name = uri.rsplit("/", 1)[-1].removesuffix(".zip")
    [root] = Path(head["temp_dir"]).glob(f"session_[0-9]*/runtime_resources/*/{name}")   # not session_latest, a link
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def submit(head, args, env, cwd):
    return subprocess.run([sys.executable, "-m", "pipelines", "submit", "--address", head["dashboard"], "--wait",
                           "--", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_submit_from_a_wheel_install_ships_only_vqtok(tmp_path, tok_dir, shards, wheel_site, ray_head):
    out = str(tmp_path / "out")
    # the code comes from the wheel install only; the token from a file, found out as needed
    env = client_env(tmp_path / "home", ray_head["token"], PYTHONPATH=str(wheel_site))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = submit(ray_head, ["tokenize", "--tokenizer", tok_dir, "--input", shards["pattern"], "--output", out,
                             "--keep-fields", "cls", "--no-progress"], env, cwd)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "SUCCEEDED" in proc.stderr and ray_head["token"] not in proc.stdout + proc.stderr
    check_rows(read_rows(out), shards)
    # the job ran the shipped copy of the wheel's code (the marker), unpacked from a py_modules package
    ran_from = [ln for ln in proc.stdout.splitlines() if ln.startswith("vqtok code from ")]
    assert ran_from and "/runtime_resources/py_modules_files/_ray_pkg_" in ran_from[0], proc.stdout[-3000:]
    job_id = proc.stdout.splitlines()[0]
    runtime_env = job_runtime_env(ray_head, job_id)
    assert "working_dir" not in runtime_env and len(runtime_env["py_modules"]) == 2, runtime_env
    files = [unpacked(ray_head, uri) for uri in runtime_env["py_modules"]]
    assert sorted({path.split("/")[0] for path in f} for f in files) == [{"pipelines"}, {"tokenizer"}]
    assert sum(sum(f.values()) for f in files) < 2 << 20     # vqtok's code only: no neighbour, data, weights
    assert all(path.endswith(".py") for f in files for path in f), files


def test_submit_to_a_cluster_without_token_auth_from_a_client_with_a_token_file(tmp_path, tok_dir, shards,
                                                                               ray_head_no_auth):
    out = str(tmp_path / "out")
    env = client_env(tmp_path / "home", "f" * 32)    # a stale token from an earlier local Ray
    proc = submit(ray_head_no_auth, ["tokenize", "--tokenizer", tok_dir, "--input", shards["pattern"],
                                     "--output", out, "--keep-fields", "cls", "--no-progress"], env, REPO)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "SUCCEEDED" in proc.stderr and "f" * 32 not in proc.stdout + proc.stderr
    check_rows(read_rows(out), shards)
