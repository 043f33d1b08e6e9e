"""Simulated hosts for multi-host tests: one network namespace per host, joined by veth.

Two hosts are a veth pair; three or more are veths into a bridge that lives in a namespace of its
own. Every host's interface is called `dg0` and has 10.77.0.(i+1)/24: the /24 exists only inside
these namespaces, so nothing can leave the machine. The filesystem, /dev/shm and the pid space stay
shared (one filesystem is what multi-node checkpoints need anyway).

mpirun runs inside host 0 (as one launches from the first node of a cluster) and starts the other
hosts' hydra proxies through a generated rsh-style script, `SCRIPT HOST COMMAND`, that runs
COMMAND inside HOST's namespace. The hostfile names hosts by IP, so nothing needs /etc/hosts.
MPI_COMM_TYPE_SHARED follows hydra's hosts, so the ranks of different hosts are different nodes.

UCX would still use shared memory and CMA between namespaces of one kernel (measured: a 2-rank
8 MB allreduce put 16 kB on the veth); UCX_TLS=tcp,self forces its traffic onto the veths. UCX
also leaves out interfaces that have no carrier yet when MPI starts (and then fails with
"incompatible loopback flags"), so creating the hosts waits until every link is up.

A job that does not end can be read before it is killed: Hosts.evidence gives the launcher log
(which remote proxies started and ended), each namespace's TCP sockets and every process in the
hosts with its kernel wait and, through gdb, its threads' stacks (marking those in MPI_Init).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

IFACE = "dg0"
SUBNET = "10.77.0"
MPIRUN = Path(sys.executable).parent / "mpirun"
MPI_ENV = {"UCX_TLS": "tcp,self"}   # no shared memory or CMA across "hosts"
_serial = itertools.count()         # several sets of hosts may exist at once


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:             # it ended meanwhile
        pass


def _drain(fd: int, into: bytearray) -> None:
    """Append what a non-blocking pipe holds now (until it is empty or closed by every writer)."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        into += chunk


def _exited(pid: int) -> bool:
    """Gone, or a zombie its stopped parent has not reaped: either way its stderr is closed."""
    st = _read(f"/proc/{pid}/stat")
    return not st or st[st.rindex(")") + 2] in "ZX"


def unavailable() -> str | None:
    """Why namespaces cannot be made here (a skip reason), or None when they can."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"dgprobe{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Hosts:
    """N simulated hosts: namespaces `names[i]` with address `ips[i]` on interface IFACE."""

    names: list[str]
    ips: list[str]
    workdir: Path
    switch: str | None = None        # the bridge's namespace (3 or more hosts)
    launcher: Path = field(init=False)

    def __post_init__(self):
        self.launcher = self.workdir / "netns_rsh.sh"
        cases = "\n".join(f"  {ip}) ns={name} ;;" for ip, name in zip(self.ips, self.names, strict=True))
        # hydra passes the proxy's command as one shell string, as ssh would
        # each start and end goes to launcher.log, so that a job whose start hung can say how far
        # its remote proxies got
        log = self.workdir / "launcher.log"
        self.launcher.write_text(f'#!/bin/sh\nhost=$1; shift\ncase $host in\n{cases}\n'
                                 f'  *) echo "netns_rsh: unknown host $host" >&2; exit 1 ;;\nesac\n'
                                 f'echo "$(date +%T.%N) $$ start $host" >> {log}\n'
                                 f'ip netns exec "$ns" sh -c "$*"\nrc=$?\n'
                                 f'echo "$(date +%T.%N) $$ exit $host rc=$rc" >> {log}\nexit $rc\n')
        self.launcher.chmod(0o755)

    def hostfile(self, ranks_per_host: int, hosts: int | None = None) -> Path:
        path = self.workdir / f"hostfile_{hosts or len(self.ips)}x{ranks_per_host}"
        path.write_text("".join(f"{ip}:{ranks_per_host}\n" for ip in self.ips[:hosts]))
        return path

    def mpirun(self, ranks_per_host: int, *command: str, hosts: int | None = None) -> list[str]:
        """The command line that runs `command` on ranks_per_host ranks of each of the first
        `hosts` hosts (all by default), launched from host 0."""
        n = ranks_per_host * (hosts or len(self.ips))
        return ["ip", "netns", "exec", self.names[0], str(MPIRUN), "-launcher", "rsh",
                "-launcher-exec", str(self.launcher), "-f", str(self.hostfile(ranks_per_host, hosts)),
                "-iface", IFACE, "-n", str(n), *command]

    def set_link(self, host: int, up: bool) -> None:
        """Plug or unplug host's cable (a veth pair: the peer loses carrier too)."""
        _ip("-n", self.names[host], "link", "set", IFACE, "up" if up else "down")
        if up:
            self.wait_until_up(host)

    def wait_until_up(self, host: int, timeout: float = 10.0) -> None:
        """Wait for carrier: UCX leaves out interfaces that are not running when MPI starts (and
        then finds no transport to the other hosts: "incompatible loopback flags")."""
        deadline = time.monotonic() + timeout
        while json.loads(_ip("-n", self.names[host], "-j", "link", "show", IFACE).stdout)[0].get(
                "operstate") != "UP":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.names[host]}: {IFACE} has no carrier after {timeout} s")
            time.sleep(0.02)

    def shape(self, rate: str, latency: str = "50ms") -> None:
        """Limit every host's outgoing traffic to `rate` (tc token bucket), e.g. "1gbit"."""
        for name in self.names:
            subprocess.run(["tc", "-n", name, "qdisc", "replace", "dev", IFACE, "root", "tbf", "rate", rate,
                            "burst", "1mb", "latency", latency], check=True, capture_output=True)

    def launcher_log(self) -> str:
        """What the rsh launcher started and how each start ended (empty before any job)."""
        log = self.workdir / "launcher.log"
        return log.read_text() if log.exists() else ""

    def dump_python_stacks(self, wait_s: float = 5.0) -> str:
        """The Python stacks of every Python process in the hosts (for a test that found a job hung),
        read straight from each process's stderr pipe. With PYTHONFAULTHANDLER set, SIGABRT makes
        a process print its threads' stacks to stderr and die. Left to the launcher, that output
        races the launcher itself: the first rank to die makes mpirun clean up the job, and a far
        rank killed in that cleanup, or whose proxy goes before forwarding its output, loses its
        stack (seen once in CI). So the launcher's processes are stopped first (SIGSTOP: nobody
        else reads the pipes or reacts to a death), the ranks are aborted, and their pipes read
        here until each rank has exited or `wait_s` passed; then the launcher resumes."""
        procs = self.processes()
        python = [(name, pid) for name, pid in procs if "python" in _read(f"/proc/{pid}/comm")]
        launcher = [pid for name, pid in procs if (name, pid) not in python]
        for pid in launcher:
            _signal(pid, signal.SIGSTOP)
        try:
            pipes = {}
            for name, pid in python:
                try:
                    fd = os.open(f"/proc/{pid}/fd/2", os.O_RDONLY | os.O_NONBLOCK)
                except OSError:
                    continue
                if stat.S_ISFIFO(os.fstat(fd).st_mode):
                    pipes[(name, pid)] = (fd, bytearray())
                else:
                    os.close(fd)
            for _, pid in python:
                _signal(pid, signal.SIGABRT)
            deadline = time.monotonic() + wait_s
            while True:
                for fd, text in pipes.values():
                    _drain(fd, text)
                if all(_exited(pid) for _, pid in python) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            for pid in launcher:
                _signal(pid, signal.SIGCONT)
        out = []
        for (name, pid), (fd, text) in pipes.items():
            os.close(fd)
            out.append(f"{name} pid {pid} stderr after SIGABRT:\n{text.decode(errors='replace').rstrip()}")
        return "\n\n".join(out)

    def processes(self) -> list[tuple[str, int]]:
        """(namespace, pid) of every process in the hosts and the switch: only our jobs run there."""
        return [(name, int(pid)) for name in self.names + ([self.switch] if self.switch else [])
                for pid in _ip("netns", "pids", name, check=False).stdout.split()]

    def kill_all(self) -> None:
        """SIGKILL every process in the hosts (what a job left behind, or a whole job that hung)."""
        for name, pid in self.processes():
            _kill_in(name, pid)

    def evidence(self, native: bool = False) -> str:
        """What a job that does not end shows, gathered while it still runs: the launcher log (which
        remote proxies started, and which ended with what), each namespace's TCP sockets with their
        processes (a connect that never completes stays SYN-SENT; a peer that never answers leaves
        bytes queued), and every process in the hosts with its state and the kernel function it
        sleeps in; with native=True also gdb's backtrace of each thread (where in MPI_Init or
        hydra's proxy it waits), when gdb is installed."""
        parts = [f"launcher log:\n{self.launcher_log() or '(empty: no remote proxy was started)'}"]
        for name in self.names:
            ss = subprocess.run(["ss", "-N", name, "-tanp"], capture_output=True, text=True)
            parts.append(f"TCP sockets in {name}:\n{ss.stdout}{ss.stderr}")
        gdb = shutil.which("gdb") if native else None
        for name, pid in self.processes():
            proc = Path(f"/proc/{pid}")
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                wchan = (proc / "wchan").read_text()
                threads = len(os.listdir(proc / "task"))
            except OSError:
                continue                                    # it ended meanwhile
            bt = ""
            if gdb and any(word in cmd for word in ("python", "hydra", "mpiexec", "mpirun")):
                try:
                    bt = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-ex",
                                         "thread apply all bt 30"], capture_output=True, text=True,
                                        timeout=60).stdout
                except subprocess.TimeoutExpired:
                    bt = "(gdb did not finish in 60 s)\n"
                bt = "".join(line + "\n" for line in bt.splitlines() if line.startswith(("#", "Thread", "(")))
            where = " (in MPI_Init)" if "PMPI_Init" in bt else ""
            parts.append(f"{name} pid {pid}{where} state {state} wchan {wchan or '-'} threads {threads}: "
                         f"{cmd}\n{bt}")
        return "\n".join(parts)

    def tx_bytes(self, host: int) -> int:
        """Bytes host has sent on its interface (what crossed the simulated network)."""
        out = _ip("-n", self.names[host], "-s", "-j", "link", "show", IFACE).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def create(n: int, prefix: str | None = None) -> Hosts:
    """Make n hosts (n >= 2). On any failure, what was made is removed again."""
    if n < 2:
        raise ValueError("simulated hosts: need at least 2")
    prefix = prefix or f"dg{os.getpid()}n{next(_serial)}"
    if any(line.split()[0].startswith(f"{prefix}-") for line in _ip("netns", "list").stdout.splitlines()):
        raise RuntimeError(f"simulated hosts: namespaces {prefix}-* exist already")   # not ours to remove
    hosts = Hosts([f"{prefix}-h{i}" for i in range(n)], [f"{SUBNET}.{i + 1}" for i in range(n)],
                  Path(tempfile.mkdtemp(prefix=f"{prefix}-")), f"{prefix}-sw" if n > 2 else None)
    try:
        _wire(hosts)
    except BaseException:
        destroy(hosts)
        raise
    return hosts


def _wire(hosts: Hosts) -> None:
    for name in hosts.names + ([hosts.switch] if hosts.switch else []):
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
    if hosts.switch is None:        # two hosts: one cable between them
        _ip("link", "add", IFACE, "netns", hosts.names[0], "type", "veth", "peer", "name", IFACE,
            "netns", hosts.names[1])
    else:                           # a switch: a bridge with one port per host
        sw = hosts.switch
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for i, name in enumerate(hosts.names):
            port = f"port{i}"
            _ip("link", "add", IFACE, "netns", name, "type", "veth", "peer", "name", port, "netns", sw)
            _ip("-n", sw, "link", "set", port, "master", "br0")
            _ip("-n", sw, "link", "set", port, "up")
    for name, ip in zip(hosts.names, hosts.ips, strict=True):
        _ip("-n", name, "addr", "add", f"{ip}/24", "dev", IFACE)
        _ip("-n", name, "link", "set", IFACE, "up")
    for i in range(len(hosts.names)):
        hosts.wait_until_up(i)


def rewire(hosts: Hosts) -> None:
    """Remove the hosts' namespaces and make them again, same names and addresses (a job whose
    start hung in them can leave them so that every later start hangs too)."""
    _unwire(hosts)
    _wire(hosts)


def destroy(hosts: Hosts) -> None:
    """Kill whatever still runs in the hosts (only our jobs run there), remove the namespaces
    (their veths and the bridge go with them) and the work folder."""
    _unwire(hosts)
    shutil.rmtree(hosts.workdir, ignore_errors=True)


def _unwire(hosts: Hosts) -> None:
    hosts.kill_all()
    for name in hosts.names + ([hosts.switch] if hosts.switch else []):
        _ip("netns", "del", name, check=False)


def _kill_in(name: str, pid: int) -> None:
    """SIGKILL pid if it still runs in namespace `name`. Through a pidfd, and only after checking
    the namespace of the process the pidfd holds: pids are reused quickly on a busy machine (here
    they wrap in under half an hour), and one listed by `ip netns pids` may be another's by now."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return                                              # it ended
    try:
        if os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{name}").st_ino:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)
