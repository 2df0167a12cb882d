"""Hosts on one machine, for tests and rehearsal: each a Linux network namespace with its own address and its
own /tmp, joined to the others by a veth pair on a bridge, with real TCP between them.

    with Hosts(3) as hosts:
        hosts.start_ray_head(hosts[0], num_cpus=0)
        hosts.start_ray_node(hosts[1], num_cpus=1)
        hosts[0].run([...])                      # any command, on host 0
        hosts[1].cut_link()                      # host 1 unreachable (its processes keep running)
        hosts[1].kill()                          # every process on host 1 gone

Safety. Addresses come from the loopback block (127.77.0.0/24 by default; `route_localnet` lets them leave
the namespace's loopback), the namespaces have no default route and the bridge sits in a namespace of its
own, so traffic only ever reaches these hosts; nothing is added to the machine's own network. Every
namespace, veth, mount and process made here is removed on exit, also when the block raised: processes by
the ids `ip netns pids` lists, mounts with the mount namespaces of those processes. Needs root (CI runs as
root); `HostsUnavailable` says why where namespaces cannot be made, and tests skip with that reason.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "127.77.0"
RAY_PORT = 6379
DASHBOARD_PORT = 8265


class HostsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no `ip`, a kernel or container that forbids them)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Host:
    """One host: a network namespace, its address, and a private /tmp (a directory bind-mounted over /tmp
    in the mount namespace of every process started here)."""

    index: int
    namespace: str
    address: str
    link: str  # its veth's end on the bridge (cutting it cuts the host off)
    switch: str  # the namespace of the bridge, where `link` lies
    tmp: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` as run on this host: inside its network namespace, with its own /tmp, host name and
        /etc/hosts (where, as on Ubuntu's default, its name resolves to 127.0.1.1, not to its address)."""
        q = shlex.quote
        inner = (
            f"mount --bind {q(str(self.etc_hosts))} /etc/hosts && mount --bind {q(str(self.tmp))} /tmp && "
            f"hostname {q(self.namespace)} && exec {shlex.join(argv)}"
        )
        return ["ip", "netns", "exec", self.namespace, "unshare", "--mount", "--uts", "--propagation", "private"] + [
            "sh",
            "-c",
            inner,
        ]

    @property
    def etc_hosts(self) -> Path:
        return self.tmp.parent / f"h{self.index}-hosts"

    def run(
        self, argv: list[str], env: dict[str, str] | None = None, log: Path | None = None, **kw
    ) -> subprocess.Popen:
        """Start `argv` on this host (output to `log` if given); it is ended with the host."""
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                self.command(argv),
                env={**os.environ, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
            )
        finally:
            if log is not None:
                out.close()
        self.procs.append(proc)
        return proc

    def call(
        self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 300, **kw
    ) -> subprocess.CompletedProcess:
        """Run `argv` on this host to its end; its output captured."""
        return subprocess.run(
            self.command(argv), env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout, **kw
        )

    def pids(self) -> list[int]:
        """Every process in this host's network namespace: what `kill` ends."""
        out = _ip("netns", "pids", self.namespace, check=False).stdout
        return [int(p) for p in out.split()]

    def kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """End every process on this host (a host that dies); started ones are reaped. Returns the ids of any
        that survived (none, normally)."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(0.1)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs = [p for p in self.procs if p.poll() is None]
        return self.pids()

    def cut_link(self) -> None:
        """The host's network goes away (a switch port, a cable); its processes keep running."""
        self._link("down")

    def _link(self, state: str) -> None:
        _ip("-n", self.switch, "link", "set", self.link, state)


class Hosts:
    """N hosts on a bridge (a context manager): see the module's docstring."""

    def __init__(self, n: int, subnet: str = SUBNET, tag: str | None = None):
        if not 1 <= n <= 200:
            raise ValueError(f"1 to 200 hosts; got {n}")
        self.n, self.subnet = n, subnet
        self.tag = tag or uuid.uuid4().hex[:6]
        self.switch = f"inft-{self.tag}-sw"
        self.root = self.shared = Path()  # made by __enter__
        self.hosts: list[Host] = []
        self.node_env: dict[str, str] = {}  # every Ray node's environment (start_ray_cluster)
        self.s3_env: dict[str, str] = {}  # the AWS_* environment of the S3 server (start_s3)
        self._made: list[str] = []  # the namespaces this harness made: the only ones it removes
        self._survivors: list[int] = []

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self):
        return iter(self.hosts)

    # -- building and tearing down -------------------------------------------------------------------------------

    def __enter__(self) -> Hosts:
        check_available()
        # Outside /tmp, which each host replaces with its own: `shared` is seen at the same path by every host
        # (like a shared mount for model weights); each host's /tmp lies beside it.
        self.root = Path(tempfile.mkdtemp(prefix=f"inft-hosts-{self.tag}-", dir="/var/tmp"))
        self.shared = self.root / "shared"
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        self.shared.mkdir()
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.n):
            ns, link, address = f"inft-{self.tag}-h{i}", f"v{self.tag}{i}", f"{self.subnet}.{i + 1}"
            tmp = self.root / f"h{i}-tmp"
            tmp.mkdir()
            tmp.chmod(0o1777)  # as /tmp (mkdir's mode is cut by the umask)
            _ip("netns", "add", ns)  # fails if the name is taken: another's namespace is never ours to remove
            self._made.append(ns)
            host = Host(i, ns, address, link, self.switch, tmp)
            self.hosts.append(host)
            # Made in the switch's namespace, one end then moved: nothing appears in the machine's own.
            _ip("-n", self.switch, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", link, "master", "br0")
            _ip("-n", self.switch, "link", "set", link, "up")
            sysctl = ["ip", "netns", "exec", ns, "sysctl", "-qw"]
            subprocess.run(
                [*sysctl, "net.ipv4.conf.all.route_localnet=1", "net.ipv4.conf.default.route_localnet=1"], check=True
            )
            subprocess.run([*sysctl, "net.ipv4.conf.eth0.route_localnet=1"], check=True)
            _ip("-n", ns, "link", "set", "lo", "up")
            # Loopback keeps 127.0.0.1 alone: with its usual /8 every 127.x address would stay on this host.
            _ip("-n", ns, "addr", "del", "127.0.0.1/8", "dev", "lo")
            _ip("-n", ns, "addr", "add", "127.0.0.1/32", "dev", "lo")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            host.etc_hosts.write_text(f"127.0.0.1 localhost\n127.0.1.1 {ns}\n")

    def close(self) -> None:
        """End every process on every host, then remove the namespaces (and with them the veths) and files."""
        for host in self.hosts:
            self._survivors += host.kill()
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made = []
        if self.root != Path():
            shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What of this harness is still on the machine (namespaces, processes that outlived `kill`, files):
        empty after `close`."""
        names = _ip("netns", "list", check=False).stdout
        left = [line.split()[0] for line in names.splitlines() if line.startswith(f"inft-{self.tag}-")]
        alive = [f"pid {pid}" for pid in self._survivors if Path(f"/proc/{pid}").exists()]
        return left + alive + ([str(self.root)] if self.root != Path() and self.root.exists() else [])

    # -- Ray ------------------------------------------------------------------------------------------------------

    @property
    def head_address(self) -> str:
        return f"{self.hosts[0].address}:{RAY_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.hosts[0].address}:{DASHBOARD_PORT}"

    @property
    def ray_bin(self) -> Path:
        return Path(sys.executable).parent / "ray"

    def ray_env(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        return {
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def start_ray_head(self, host: Host, num_cpus: int = 0, object_store_mb: int = 100, **extra_env) -> None:
        """A Ray head on `host` (GCS, dashboard and Ray Jobs on its address), in the foreground of its process."""
        self._ray(
            host,
            [
                "--head",
                f"--port={RAY_PORT}",
                "--dashboard-host=0.0.0.0",
                f"--dashboard-port={DASHBOARD_PORT}",
                "--include-dashboard=true",
            ],
            num_cpus,
            object_store_mb,
            extra_env,
        )
        self.wait_for_port(host, DASHBOARD_PORT)

    def start_ray_node(self, host: Host, num_cpus: int = 1, object_store_mb: int = 100, **extra_env) -> None:
        """A Ray node on `host` joining the head (started once the head answers: a node may give up otherwise)."""
        self._ray(host, [f"--address={self.head_address}"], num_cpus, object_store_mb, extra_env)

    def _ray(self, host: Host, args: list[str], num_cpus: int, object_store_mb: int, extra_env: dict) -> None:
        host.run(
            [
                str(self.ray_bin),
                "start",
                *args,
                f"--node-ip-address={host.address}",
                f"--num-cpus={num_cpus}",
                f"--object-store-memory={object_store_mb * 2**20}",
                "--temp-dir=/tmp/ray",
                "--disable-usage-stats",
                "--block",
            ],
            env={**self.ray_env(), **extra_env},
            log=self.root / f"h{host.index}-ray.log",
        )

    def start_s3(self, host: Host, port: int = 5555, bucket: str = "bkt") -> dict[str, str]:
        """An S3 server (moto's) on `host` with one bucket; returns the AWS_* environment that points at it."""
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_ENDPOINT_URL": f"http://{host.address}:{port}",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }
        host.run([sys.executable, "-m", "moto.server", "-H", host.address, "-p", str(port)])
        self.wait_for_port(host, port)
        create = f"import boto3; boto3.client('s3').create_bucket(Bucket={bucket!r})"
        made = host.call([sys.executable, "-c", create], env=env)
        if made.returncode:
            raise RuntimeError(f"could not create the bucket: {made.stderr[-2000:]}")
        self.s3_env = env
        return env

    def start_ray_cluster(self, node_env: dict[str, str] | None = None) -> None:
        """A Ray head on host 0 with no CPUs (the job's driver and Ray Train's controller go there, no worker)
        and a 1-CPU node on every other host; returns once all have joined. `node_env`: every node's
        environment (credentials, Ray settings such as RAY_health_check_period_ms)."""
        self.node_env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **(node_env or {})}
        self.start_ray_head(self.hosts[0], num_cpus=0, **self.node_env)
        for host in self.hosts[1:]:
            self.start_ray_node(host, num_cpus=1, **self.node_env)
        self.wait_for_nodes(len(self.hosts))

    def wait_for_port(self, host: Host, port: int, timeout: float = 90) -> None:
        probe = f"import socket; socket.create_connection(({host.address!r}, {port}), timeout=1)"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if host.call([sys.executable, "-c", probe], timeout=30).returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"nothing answers on {host.address}:{port} after {timeout:.0f} s; see {self.root}")

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Until the cluster has `count` live nodes (asked from host 0)."""
        script = (  # the address named: `auto` would also find other Ray clusters on this machine by their processes
            f"import ray; ray.init(address={self.head_address!r}, logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            out = self.hosts[0].call([sys.executable, "-c", script], env=self.ray_env(), timeout=60)
            seen = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else None
            if seen and int(seen[0]) >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"{count} Ray nodes not up after {timeout:.0f} s (last seen {seen}); see {self.root}")


def check_available() -> None:
    """Raise HostsUnavailable saying why network namespaces cannot be made here."""
    if sys.platform != "linux":
        raise HostsUnavailable("network namespaces are Linux's")
    if os.geteuid() != 0:
        raise HostsUnavailable("making network namespaces needs root (CI runs as root)")
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            raise HostsUnavailable(f"`{tool}` is not installed (iproute2, util-linux)")
    probe = f"inft-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    _ip("netns", "del", probe, check=False)
    if made.returncode != 0:
        raise HostsUnavailable(f"`ip netns add` failed: {made.stderr.strip()}")
