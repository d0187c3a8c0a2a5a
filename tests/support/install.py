"""Installing fastlb the way a stock Debian 12 host does: Debian's /usr/bin/python3, a venv, a wheel
compiled once per session, scripts/install staged under a DESTDIR."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PY = Path("/usr/bin/python3")
# PATH of a stock Debian host: no pyenv, no venv; `python3` is Debian's
DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def have_debian_python() -> bool:
    if not DEBIAN_PY.exists():
        return False
    return subprocess.run([DEBIAN_PY, "-c", "import ensurepip, venv"], capture_output=True).returncode == 0


def debian_env(**extra: str) -> dict[str, str]:
    """The environment with PATH reduced to a stock host's and no pyenv/venv variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYENV", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=DEBIAN_PATH, **extra)
    return env


def build_wheel(workdir: Path) -> Path:
    """Compile fastlb into a wheel with Debian's python3 (in a throwaway venv, as PEP 668 wants)."""
    subprocess.run([DEBIAN_PY, "-m", "venv", workdir / "venv"], check=True, env=debian_env(), timeout=120)
    r = subprocess.run(
        [workdir / "venv/bin/python", "-m", "pip", "wheel", "-q", "--no-deps", "-w", workdir / "dist", REPO],
        capture_output=True,
        text=True,
        env=debian_env(),
        timeout=900,
    )
    if r.returncode != 0:
        raise RuntimeError(f"building the wheel failed:\n{r.stdout}{r.stderr}")
    (wheel,) = (workdir / "dist").glob("fastlb-*.whl")
    return wheel


def run_install(root: Path, wheel: Path) -> subprocess.CompletedProcess:
    """scripts/install with DESTDIR=root (nothing outside root is touched)."""
    return subprocess.run(
        [REPO / "scripts/install"],
        capture_output=True,
        text=True,
        env=debian_env(DESTDIR=str(root), FASTLB_WHEEL=str(wheel)),
        timeout=300,
        cwd=root.parent,
    )


def add_system_units(root: Path) -> None:
    """Copy the host's packaged units into root, so `systemd-analyze --root=root` resolves the
    dependencies (sysinit.target, network-online.target, ...) as on the host."""
    dst = root / SYSTEM_UNITS.relative_to("/")
    if not dst.exists():
        shutil.copytree(SYSTEM_UNITS, dst, symlinks=True)


# PATH of a root shell on a stock Debian host (`su -`, cron, a unit's ExecStart): not even /usr/local/bin
DEBIAN_ROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def script_env(**extra: str) -> dict[str, str]:
    """debian_env() with DEBIAN_ROOT_PATH and none of the variables that pick a fastlb (FASTLB_VENV,
    FASTLB_BIN, ...): what a script sees on a fresh host, plus `extra`."""
    env = {k: v for k, v in debian_env().items() if not k.startswith("FASTLB_")}
    env.update(PATH=DEBIAN_ROOT_PATH, FASTLB_INSTALLED="/nonexistent/usr/local/bin/fastlb")
    env.update(extra)
    return env


def make_venv(venv: Path, wheel: Path) -> None:
    """README command 1's venv (scripts/venv with Debian's python3), from the session's wheel."""
    r = subprocess.run(
        [REPO / "scripts/venv", venv],
        capture_output=True,
        text=True,
        env=debian_env(FASTLB_WHEEL=str(wheel)),
        timeout=300,
        cwd=REPO,
    )
    if r.returncode != 0:
        raise RuntimeError(f"scripts/venv failed:\n{r.stdout}{r.stderr}")


def linked_checkout(where: Path) -> Path:
    """A checkout of its own at `where` (scripts/ and bench/ linked to this one's), so a test can
    give it a .venv, or none, without touching the real checkout's."""
    where.mkdir(parents=True)
    for name in ("scripts", "bench", "Makefile"):
        (where / name).symlink_to(REPO / name)
    return where.resolve()
