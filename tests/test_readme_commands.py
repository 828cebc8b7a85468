"""The README's two commands, as ``.ci/run`` reads them, run on machines with and without ``sudo``.

The programs they call (apt-get, pip, python, effdl, sudo) are replaced by stubs that log their
arguments, so the test checks the shell logic of the commands exactly as written, not the installs.
"""

import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASH = "/bin/bash"


def readme_command(which: str) -> str:
    return subprocess.run([BASH, str(ROOT / ".ci" / "readme-command"), which], check=True, capture_output=True,
                          text=True).stdout


def run_with_stubs(command: str, tmp_path: Path, programs: list[str]) -> list[str]:
    """Run ``command`` with only stub ``programs`` on PATH; returns the logged calls, one line each."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in programs:
        stub = bin_dir / name
        if name == "sudo":  # sudo logs itself, then runs the command it was given
            stub.write_text(f'#!{BASH}\necho "sudo $*" >> {log}\n"$@"\n')
        else:
            stub.write_text(f'#!{BASH}\necho "{name} $*" >> {log}\n')
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    subprocess.run([BASH, "-euo", "pipefail", "-c", command], check=True, env=env, cwd=tmp_path, timeout=30)
    return log.read_text().splitlines()


STUBS = ["apt-get", "pip", "python", "effdl"]


def test_test_command_runs_as_root_without_sudo(tmp_path):
    calls = run_with_stubs(readme_command("tests"), tmp_path, STUBS)
    assert calls[:2] == ["apt-get update", "apt-get install -y dataset-fashion-mnist g++"]
    assert calls[-1] == "python -m pytest -q"


def test_test_command_uses_sudo_where_it_exists(tmp_path):
    calls = run_with_stubs(readme_command("tests"), tmp_path, [*STUBS, "sudo"])
    assert calls[:2] == ["sudo apt-get update", "apt-get update"]
    assert "sudo apt-get install -y dataset-fashion-mnist g++" in calls
    assert not any(c.startswith("sudo pip") for c in calls)  # pip installs into the user's environment
    assert calls[-1] == "python -m pytest -q"


def test_demo_command_needs_nothing_but_pip(tmp_path):
    calls = run_with_stubs(readme_command("demo"), tmp_path, ["pip", "effdl"])
    assert calls[-1] == "effdl demo"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme-command tests" in ci
    assert "pytest" not in ci  # the only test command CI runs is the README's


def test_missing_command_is_a_clear_error():
    done = subprocess.run([BASH, str(ROOT / ".ci" / "readme-command"), "lint"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
