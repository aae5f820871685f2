"""Real third-party peers for tests: OpenSSH's sshd and exim as an SMTP server, on loopback ports.

Each starts in the foreground from a config written into ``tmp_path`` (host
keys, spool and logs there too) and is stopped by the fixture that made it.
A missing binary is a skip that names the Debian package (listed in
requirements/apt-test.txt).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import wait_for

SSHD = "/usr/sbin/sshd"
EXIM = "/usr/sbin/exim4"
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass
class Sshd:
    port: int
    key: Path  # the client's private key, authorised for root

    def ssh(self, port: int, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``ssh root@127.0.0.1 -p PORT COMMAND`` with the test's key (port: sshd's or a relay's)."""
        return subprocess.run(["ssh", *SSH_OPTS, "-i", str(self.key), "-p", str(port), "root@127.0.0.1", *command],
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """OpenSSH's sshd on a loopback port, accepting one key generated for the test."""
    if not os.path.exists(SSHD) or shutil.which("ssh") is None:
        pytest.skip("needs openssh-server and openssh-client (requirements/apt-test.txt)")
    d = tmp_path / "sshd"
    d.mkdir()
    os.makedirs("/run/sshd", exist_ok=True)
    host_key, user_key = d / "host_ed25519", d / "user_ed25519"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (d / "authorized_keys").write_text((d / "user_ed25519.pub").read_text())
    os.chmod(d, 0o700)
    port = free_port()
    config = d / "sshd_config"
    config.write_text(f"ListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
                      "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                      "PermitRootLogin prohibit-password\nStrictModes no\nPidFile none\nSubsystem sftp internal-sftp\n")
    log = (d / "sshd.log").open("wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config), "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or _listening(port), timeout=20)
        assert proc.poll() is None, (d / "sshd.log").read_text()
        yield Sshd(port, user_key)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@dataclass
class Exim:
    port: int
    mainlog: Path  # exim logs "<= SENDER ... id=..." for every message it took

    def received(self) -> str:
        return self.mainlog.read_text(errors="replace") if self.mainlog.exists() else ""


@pytest.fixture
def exim(tmp_path: Path) -> Iterator[Exim]:
    """exim (exim4-daemon-light) as a server-first SMTP server on a loopback port; messages are logged, then dropped."""
    if not os.path.exists(EXIM):
        pytest.skip("needs exim4-daemon-light, a real SMTP server (requirements/apt-test.txt)")
    d = tmp_path / "exim"
    (d / "spool").mkdir(parents=True)
    port = free_port()
    config = d / "exim.conf"
    config.write_text(f"""primary_hostname = mx.test
spool_directory = {d / 'spool'}
log_file_path = {d}/%slog
exim_user = root
exim_group = root
never_users =
keep_environment =
local_interfaces = 127.0.0.1
tls_advertise_hosts =
acl_smtp_rcpt = accept
acl_smtp_data = accept
begin routers
everyone:
  driver = redirect
  data = :blackhole:
""")
    proc = subprocess.Popen([EXIM, "-C", str(config), "-bdf", "-oX", str(port), "-odi"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: proc.poll() is not None or _listening(port), timeout=20)
        assert proc.poll() is None, f"exim exited with {proc.returncode}"
        yield Exim(port, d / "mainlog")
    finally:
        proc.terminate()
        proc.wait(10)
