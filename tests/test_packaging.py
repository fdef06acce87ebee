"""The Dockerfile, exercised without Docker: its steps run here in a fresh virtual environment.

`test_image_steps_in_a_fresh_venv` builds the wheels as the build stage does (`pip wheel .` from
the files the Dockerfile copies), installs them with `--no-index` as the final stage does, and
runs the image's ENTRYPOINT + CMD (with `--simulate`) under the image's ENV, as a non-root user
when the test runs as root, then the HEALTHCHECK command, then stops it with the STOPSIGNAL.
It is slow (tens of seconds) and marked `packaging`: `-m "not packaging"` deselects it; CI runs it.
"""

from __future__ import annotations

import configparser
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fakes import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Image:
    """What the final stage of the Dockerfile says."""

    stages: list[str] = field(default_factory=list)  # FROM lines
    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    volumes: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    stopsignal: str = "SIGTERM"
    copies: list[list[str]] = field(default_factory=list)  # COPY args of the first stage
    labels: dict[str, str] = field(default_factory=dict)  # LABELs of the final stage
    runs: list[str] = field(default_factory=list)


def parse_dockerfile(path: Path) -> Image:
    lines: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append(buf + raw)
        buf = ""
    img = Image()
    args: dict[str, str] = {}  # ARGs before the first FROM: what FROM lines may use
    for line in lines:
        instr, _, rest = line.strip().partition(" ")
        instr, rest = instr.upper(), rest.strip()
        if instr == "ARG" and not img.stages:
            key, _, value = rest.partition("=")
            args[key] = value
        elif instr == "LABEL":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                img.labels[key] = value
        elif instr == "FROM":
            img.stages.append(re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), rest))
            img.env.clear()
            img.labels.clear()
        elif instr == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                img.env[key] = value
        elif instr == "USER":
            img.user = rest
        elif instr == "VOLUME":
            img.volumes.append(rest)
        elif instr == "ENTRYPOINT":
            img.entrypoint = json.loads(rest)
        elif instr == "CMD":
            img.cmd = json.loads(rest)
        elif instr == "STOPSIGNAL":
            img.stopsignal = rest
        elif instr == "HEALTHCHECK":
            opts, _, cmd = rest.partition(" CMD ")
            img.healthcheck = json.loads(cmd)
            img.healthcheck_options = dict(o.lstrip("-").split("=", 1) for o in opts.split())
        elif instr == "COPY" and len(img.stages) == 1:
            img.copies.append(shlex.split(rest))
        elif instr == "RUN":
            img.runs.append(rest)
    return img


@pytest.fixture(scope="module")
def image() -> Image:
    return parse_dockerfile(ROOT / "Dockerfile")


def test_dockerfile_conventions(image: Image) -> None:
    assert len(image.stages) == 2 and all("-slim" in s for s in image.stages)
    # the base pinned by digest (the same one in both stages)
    assert all(re.search(r"@sha256:[0-9a-f]{64}( |$)", s) for s in image.stages), image.stages
    for key in ("title", "description", "version", "licenses", "source", "base.name"):
        assert f"org.opencontainers.image.{key}" in image.labels, key
    # a compiler in the build stage only: dependencies without a wheel build there
    build_runs = (ROOT / "Dockerfile").read_text().split("\nFROM ")[1]
    assert "gcc" in build_runs and "gcc" not in " ".join(image.runs[-1:])
    assert image.user and image.user not in ("root", "0")
    assert image.volumes == ["/config"]
    assert image.env["IGDTRIGGER_STATE_DIR"] == "/config"
    assert image.env["IGDTRIGGER_CONFIG"] == "/config/config.toml"
    assert image.healthcheck == ["igdtrigger", "healthcheck"]
    assert image.entrypoint + image.cmd == ["igdtrigger", "serve"]
    assert any(r.startswith("pip wheel") for r in image.runs)
    assert any("--no-index" in r and "pip install" in r for r in image.runs)


def test_compose_variants_are_exclusive_and_can_read_their_config() -> None:
    import yaml

    text = (ROOT / "examples" / "docker-compose.yml").read_text()
    services = yaml.safe_load(text)["services"]
    assert set(services) == {"igdtrigger", "igdtrigger-detect"}
    std, det = services["igdtrigger"], services["igdtrigger-detect"]
    # every service in a profile of its own: `--profile detect` never starts both on 8731
    assert std["profiles"] == ["standard"] and det["profiles"] == ["detect"]
    for svc in (std, det):
        assert svc["network_mode"] == "host"
        assert "IGDTRIGGER_API__LISTEN" in svc["environment"]
    assert det["cap_drop"] == ["ALL"] and det["cap_add"] == ["NET_ADMIN"]
    assert det["user"] == "0:0"
    # root without CAP_DAC_OVERRIDE cannot enter the image's /config (uid 1000, 0700): the
    # detect variant keeps state elsewhere and reads a bind-mounted, read-only config file
    state = det["environment"]["IGDTRIGGER_STATE_DIR"]
    assert not state.startswith("/config") and det["working_dir"] == state
    mounts = {m if isinstance(m, str) else f"{m['source']}:{m['target']}"
              for m in det["volumes"]}
    assert not any(m.startswith("igdtrigger:") for m in mounts)  # not the other's volume
    cfg = det["environment"]["IGDTRIGGER_CONFIG"]
    bind = next(m for m in det["volumes"] if isinstance(m, dict) and m["target"] == cfg)
    assert bind["type"] == "bind" and bind["read_only"] is True
    assert bind["bind"]["create_host_path"] is False
    # the standard variant documents the same bind-mounted file
    assert "./config.toml:/etc/igdtrigger/config.toml:ro" in text


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((ROOT / "examples" / "igdtrigger.service").read_text())
    svc = unit["Service"]
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0
    assert svc["StateDirectory"] == "igdtrigger" and svc["ConfigurationDirectory"] == "igdtrigger"
    assert svc["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    for key in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert key in svc
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify",
                            str(ROOT / "examples" / "igdtrigger.service")],
                           capture_output=True, text=True, timeout=60)
        problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                    if ln.strip() and "is not executable" not in ln
                    and "No such file" not in ln]
        assert problems == [], problems



@pytest.fixture
def workdir() -> Iterator[Path]:
    """World-traversable (the entry command may run as an unprivileged user)."""
    d = Path(tempfile.mkdtemp(prefix="igdt-pkg-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{argv}: {r.stdout}\n{r.stderr}"
    return r  # type: ignore[no-any-return]


def venv_base() -> str:
    """The interpreter for the fresh venv: this one, or (as root, when this one lives where an
    unprivileged user cannot reach, e.g. pyenv under /root) the system's of the same version."""
    system = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.path.exists(system):
        return sys.executable
    r = subprocess.run([system, "-c", "import sys, venv, ensurepip; print(sys.version_info[:2])"],
                       capture_output=True, text=True, timeout=60)
    same = r.returncode == 0 and r.stdout.strip() == str(tuple(sys.version_info[:2]))
    return system if same else sys.executable


@pytest.mark.packaging
def test_image_steps_in_a_fresh_venv(image: Image, workdir: Path) -> None:
    timings: dict[str, float] = {}
    # build stage: COPY what the Dockerfile copies, then its `pip wheel`
    src = workdir / "src"
    src.mkdir()
    for args in image.copies:
        *sources, dest = args
        base = src / dest  # WORKDIR /src; Docker's COPY semantics below
        for s in sources:
            if (ROOT / s).is_dir():  # a directory's contents go to dest
                shutil.copytree(ROOT / s, base, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:  # a file goes into dest/ (or becomes dest)
                target = base / Path(s).name if dest.endswith("/") else base
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / s, target)
    assert (src / "igdtrigger" / "__init__.py").exists() and (src / "pyproject.toml").exists()
    wheels = workdir / "wheels"
    t0 = time.monotonic()
    run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), "."], cwd=src)
    timings["pip_wheel_s"] = time.monotonic() - t0
    assert list(wheels.glob("igdtrigger-*.whl"))
    # final stage: a fresh environment, installed from the wheels alone
    venv = workdir / "venv"
    t0 = time.monotonic()
    run([venv_base(), "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", f"--find-links={wheels}",
         "igdtrigger"])
    timings["install_s"] = time.monotonic() - t0
    installed = run([str(venv / "bin" / "python"), "-c",
                     "import igdtrigger, importlib.resources as r; print(igdtrigger.__file__);"
                     "print(len((r.files('igdtrigger.api') / 'dashboard' / 'index.html')"
                     ".read_bytes()))"], cwd=workdir,
                    env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).stdout.split()
    assert installed[0].startswith(str(venv)) and int(installed[1]) > 100  # dashboard shipped

    # /config volume, owned by the image's USER (here: nobody, when we are root)
    config_dir = workdir / "config"
    config_dir.mkdir(mode=0o700)
    user_kw: dict[str, object] = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        as_nobody = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        try:  # the base interpreter may live where nobody cannot reach (e.g. under /root)
            subprocess.run([str(venv / "bin" / "python"), "-c", ""], check=True, timeout=60,
                           cwd=workdir, **as_nobody)  # type: ignore[call-overload]
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"packaging: running the entry command as root: nobody cannot run the base "
                  f"interpreter ({exc})")
        else:
            os.chown(config_dir, nobody.pw_uid, nobody.pw_gid)
            user_kw = as_nobody
    port = free_port()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(config_dir), "LANG": "C.UTF-8"}
    for key, value in image.env.items():
        env[key] = value.replace("/config", str(config_dir))
    # stay on loopback and quiet: a test must not serve or advertise on the real LAN
    env["IGDTRIGGER_API__LISTEN"] = f"127.0.0.1:{port}"
    env["IGDTRIGGER_API__ZEROCONF"] = "off"
    argv = [*image.entrypoint, *image.cmd, "--simulate"]
    t0 = time.monotonic()
    log = (workdir / "serve.log").open("w")
    proc = subprocess.Popen(argv, env=env, cwd=config_dir, stdout=log,
                            stderr=subprocess.STDOUT, **user_kw)  # type: ignore[call-overload]
    try:
        deadline = t0 + float(image.healthcheck_options.get("start-period", "10s")[:-1]) + 20
        while True:
            hc = subprocess.run(image.healthcheck, env=env, cwd=config_dir, capture_output=True,
                                text=True, timeout=30, **user_kw)  # type: ignore[call-overload]
            if hc.returncode == 0:
                break
            assert hc.returncode == 1, hc.stdout + hc.stderr
            assert proc.poll() is None, (workdir / "serve.log").read_text()
            assert time.monotonic() < deadline, hc.stdout + (workdir / "serve.log").read_text()
            time.sleep(0.2)
        timings["healthy_after_s"] = time.monotonic() - t0
        assert f"127.0.0.1:{port}/healthz" in hc.stdout
        token = config_dir / "api-token"
        assert token.stat().st_mode & 0o777 == 0o600
        if user_kw:
            assert token.stat().st_uid == user_kw["user"]
        status = run([*image.entrypoint, "status", "--json", "--server",
                      f"http://127.0.0.1:{port}"], env=env, **user_kw)
        assert json.loads(status.stdout)["gateway"]["up"] is True
        t1 = time.monotonic()
        proc.send_signal(getattr(signal, image.stopsignal))
        assert proc.wait(15) == 0
        timings["stop_s"] = time.monotonic() - t1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    hc = subprocess.run(image.healthcheck, env=env, capture_output=True, text=True, timeout=30)
    assert hc.returncode == 1 and "unhealthy" in hc.stdout  # and now it says so
    print("packaging timings:", {k: round(v, 2) for k, v in timings.items()})
