"""make wheel-list: the offline bundle's requirement list is the pinned closure without torch (no download here; the
download and the offline install were checked by hand, README "GPU nodes without internet")."""

import re
import subprocess

from conftest import REPO


def pins(*files):
    lines = [line.strip() for f in files for line in (REPO / f).read_text().splitlines()]
    return {m[1].lower(): m[2] for line in lines if (m := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line))}


def wheel_list(tmp_path, only=""):
    subprocess.run(["make", "-s", "wheel-list", f"WHEELHOUSE={tmp_path}", f"ONLY={only}"], cwd=REPO, check=True)
    return pins(tmp_path / "requirements.txt")


def test_wheel_list_is_every_pin_but_torch(tmp_path):
    expected = pins("requirements.txt", "constraints.txt")
    listed = wheel_list(tmp_path)
    assert "torch" not in listed and "torch" in expected  # the node keeps its CUDA build
    assert listed == {name: version for name, version in expected.items() if name != "torch"}
    assert {"trl", "transformers", "accelerate", "datasets", "peft", "dill", "multiprocess", "pyarrow"} <= set(listed)


def test_wheel_list_only_keeps_the_named_packages(tmp_path):
    assert wheel_list(tmp_path, only="trl Datasets") == {"trl": "1.16.0", "datasets": "5.2.0"}
