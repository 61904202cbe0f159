"""Run a real anvil node (Foundry's local Ethereum devnet) for the web3 tests.

Sync on purpose: usable from a sync pytest session fixture, and from trio tests
via ``await trio.to_thread.run_sync(node.stop)`` / ``node.start``.

    node = Anvil()            # picks a free 127.0.0.1 port
    node.start()              # returns once eth_chainId answers
    node.url                  # http://127.0.0.1:<port>
    node.stop()               # "RPC outage": port now refuses connections
    node.start()              # same port again; with state_path=..., same chain

The binary comes from the tools folder (``$QDWORKER_WEB3_TOOLS``, default
``<root>/.tools/web3``); if it is missing, ``examples/web3/tools.sh`` installs it.

State across restarts: with ``state_path`` set, anvil is started with
``--state <file>`` (= ``--load-state`` + ``--dump-state``): it writes the chain
(accounts, code, storage, blocks) to the file on graceful shutdown (SIGTERM /
SIGINT) and loads it on the next start, so block numbers, contracts and
balances survive. ``stop()`` sends SIGTERM and waits, so the dump happens;
only a SIGKILL fallback would lose it. Without ``state_path`` every start is
a fresh chain at block 0.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS_SH = ROOT / "examples" / "web3" / "tools.sh"
ARTIFACTS = ROOT / "examples" / "web3" / "artifacts.json"

# anvil's well-known default dev accounts (mnemonic "test test ... junk"), unlocked.
DEFAULT_ACCOUNTS = (
    "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
    "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
)
DEFAULT_CHAIN_ID = 31337


def tools_dir() -> Path:
    return Path(os.environ.get("QDWORKER_WEB3_TOOLS") or ROOT / ".tools" / "web3")


def anvil_binary(install: bool = True) -> Path:
    """Path of the anvil binary; runs tools.sh (npm install) if it is missing."""
    env_bin = os.environ.get("ANVIL_BIN")
    if env_bin:
        return Path(env_bin)
    candidates = sorted(tools_dir().glob("node_modules/@foundry-rs/anvil-*/bin/anvil"))
    if candidates:
        return candidates[0]
    if not install:
        raise FileNotFoundError(f"anvil not installed under {tools_dir()}")
    out = subprocess.run(
        ["bash", str(TOOLS_SH), str(tools_dir())],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        timeout=600,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rpc(url: str, method: str, params: list | None = None, timeout: float = 2.0):
    """Minimal sync JSON-RPC call (stdlib only)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []})
    req = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        reply = json.load(resp)
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


class AnvilError(RuntimeError):
    pass


class Anvil:
    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        chain_id: int = DEFAULT_CHAIN_ID,
        state_path: str | os.PathLike | None = None,
        extra_args: tuple[str, ...] | list[str] = (),
        binary: str | os.PathLike | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.chain_id = chain_id
        self.state_path = Path(state_path) if state_path else None
        self.extra_args = list(extra_args)
        self.binary = Path(binary) if binary else anvil_binary()
        self._log_dir = Path(tempfile.mkdtemp(prefix="anvil-log-"))
        self.log_path = self._log_dir / "anvil.log"
        self.proc: subprocess.Popen | None = None
        self.last_start_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        cmd = [
            str(self.binary),
            "--host", self.host,
            "--port", str(self.port),
            "--chain-id", str(self.chain_id),
        ]  # fmt: skip
        if self.state_path is not None:
            cmd += ["--state", str(self.state_path)]
        return cmd + self.extra_args

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self, timeout: float = 30.0) -> float:
        """Start anvil and block until eth_chainId answers; returns seconds taken."""
        if self.running:
            raise AnvilError("anvil already running")
        t0 = time.monotonic()
        deadline = t0 + timeout
        bind_retry = True
        while True:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            try:
                self._wait_ready(deadline)
                break
            except AnvilError:
                # A restart right after stop() can race the old socket; retry once.
                if bind_retry and self.proc.poll() is not None and time.monotonic() < deadline:
                    bind_retry = False
                    continue
                self.stop()
                raise
        self.last_start_seconds = time.monotonic() - t0
        return self.last_start_seconds

    def _wait_ready(self, deadline: float) -> None:
        delay = 0.01
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AnvilError(
                    f"anvil exited with {self.proc.returncode} during startup:\n{self.log_tail()}"
                )
            try:
                got = int(rpc(self.url, "eth_chainId", timeout=1.0), 16)
            except (OSError, urllib.error.URLError, ValueError):
                got = None
            if got is not None:
                if got != self.chain_id:
                    raise AnvilError(f"unexpected chain id {got} on {self.url}")
                return
            if time.monotonic() >= deadline:
                raise AnvilError(f"anvil not answering on {self.url}:\n{self.log_tail()}")
            time.sleep(delay)  # poll back-off, bounded by the deadline
            delay = min(delay * 2, 0.2)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (lets --state dump), wait, then SIGKILL if needed. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)

    def restart(self, timeout: float = 30.0) -> float:
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._log_dir, ignore_errors=True)

    def __enter__(self) -> Anvil:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_artifacts() -> dict:
    """{name: {abi, bytecode, ...}} from the committed examples/web3/artifacts.json."""
    return json.loads(ARTIFACTS.read_text())["contracts"]
