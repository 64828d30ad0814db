"""A throw-away single-node Slurm cluster for the tests, from Debian's packages.

munge, MariaDB, slurmdbd (accounting, so that `sacct` works), slurmctld and slurmd run as
root with every file under one state folder and every port picked free at start, so two
test runs on one machine do not meet, and nothing under /etc is changed. The node offers
fake GPUs (GRES `gpu` whose device files are links to /dev/null), so jobs that ask for
`--gpus=1` are scheduled and accounted (`gres/gpu` in sacct's TRES) on a machine without one.

    python tests/slurm/cluster.py up STATE     # install if needed, start, print the env to use
    python tests/slurm/cluster.py down STATE   # stop what `up` started

Clients find the cluster through SLURM_CONF (see `Cluster.env`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# slurm-wlm pulls slurmctld, slurmd and the client commands; slurmdbd and a database are apart.
PACKAGES = ["slurm-wlm", "slurmdbd", "munge", "mariadb-server", "mariadb-client"]
DAEMONS = ["munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd"]
CLIENTS = ["sbatch", "sacct", "sacctmgr", "sinfo", "squeue", "scontrol", "srun", "mariadb"]
CLUSTER = "epimer"
PARTITION = "epimer"
ACCOUNT = "epimer"
NODE = "node1"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be brought up on this machine (not root, no apt-get): the caller skips."""


def _which(name: str) -> str | None:
    """Daemons live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def missing_commands() -> list[str]:
    """The daemons and client commands not installed here (empty when all are)."""
    return [c for c in DAEMONS + CLIENTS if _which(c) is None]


def can_install() -> bool:
    """Whether this process may install Debian packages: root with apt-get."""
    return os.geteuid() == 0 and _which("apt-get") is not None


def install(log: Path) -> float:
    """apt-get the packages that are missing; returns the seconds it took.

    Raises RuntimeError (with the tail of `log`) when apt fails: a machine where the
    install should work must not silently skip the Slurm tests.
    """
    start = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        ):
            res = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
            )
            if res.returncode != 0:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"`{' '.join(cmd)}` failed ({res.returncode}); see {log}:\n{tail}"
                )
    if missing := missing_commands():
        raise RuntimeError(f"after installing {PACKAGES}, still missing: {missing}")
    return time.monotonic() - start


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on now."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Cluster:
    """A running cluster: its state folder, partition, node size and the env clients need."""

    state: Path
    partition: str
    cpus: int
    mem_mb: int
    gpus: int

    @property
    def conf(self) -> Path:
        return self.state / "etc" / "slurm.conf"

    @property
    def bin(self) -> Path:
        return self.state / "bin"

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF, with the srun wrapper first on PATH and /usr/sbin last."""
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=search_path(self.bin))

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """A client command (sacct, sinfo, ...) against this cluster; stdout as text."""
        res = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env)
        if check and res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")
        return res


def search_path(bin_dir: Path) -> str:
    """PATH with `bin_dir` first (unless there already) and /usr/sbin last."""
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != str(bin_dir)]
    return os.pathsep.join([str(bin_dir), *parts, *([] if "/usr/sbin" in parts else ["/usr/sbin"])])


def write_srun_wrapper(bin_dir: Path, conf: Path) -> None:
    """An `srun` that sets SLURM_CONF first. snakemake-executor-plugin-slurm-jobstep starts
    each job's step with every SLURM_* variable but a few removed, SLURM_CONF among them: real
    clusters keep their config in /etc/slurm (or run configless), this one only has SLURM_CONF."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "srun"
    wrapper.write_text(f'#!/bin/sh\nSLURM_CONF="{conf}" exec "{_which("srun")}" "$@"\n')
    wrapper.chmod(0o755)


def node_size() -> tuple[int, int]:
    """(CPUs, MB of memory) that the node offers: this machine's cores, half its memory
    (the rest stays for the test process and the other daemons)."""
    with open("/proc/meminfo") as fh:
        total_kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    return os.cpu_count() or 1, total_kb // 1024 // 2


def write_configs(
    state: Path, ports: dict[str, int], *, cpus: int, mem_mb: int, gpus: int, db_password: str
) -> None:
    """slurm.conf, gres.conf and slurmdbd.conf under state/etc (slurmdbd and slurmd look for
    the other two next to SLURM_CONF)."""
    etc, run, log = state / "etc", state / "run", state / "log"
    munge_socket = run / "munge.socket"
    host = socket.gethostname().split(".")[0]
    (etc / "slurm.conf").write_text(
        f"""# Generated by tests/slurm/cluster.py: a single-node test cluster.
ClusterName={CLUSTER}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports["slurmctld"]}
SlurmdPort={ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={state / "ctld"}
SlurmdSpoolDir={state / "spool"}
SlurmctldPidFile={run / "slurmctld.pid"}
SlurmdPidFile={run / "slurmd.pid"}
SlurmctldLogFile={log / "slurmctld.log"}
SlurmdLogFile={log / "slurmd.log"}
PlugStackConfig={etc / "plugstack.conf"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
KillWait=5
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports["slurmdbd"]}
AccountingStoragePass={munge_socket}
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
JobCompType=jobcomp/none
NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} Gres=gpu:{gpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""
    )
    # gres/gpu needs a device file per GPU; links to /dev/null stand in for them.
    dev = state / "dev"
    dev.mkdir(exist_ok=True)
    for i in range(gpus):
        (dev / f"gpu{i}").symlink_to("/dev/null")
    files = f"{dev}/gpu[0-{gpus - 1}]" if gpus > 1 else f"{dev}/gpu0"
    (etc / "gres.conf").write_text(f"AutoDetect=off\nNodeName={NODE} Name=gpu File={files}\n")
    (etc / "plugstack.conf").write_text("")
    dbd = etc / "slurmdbd.conf"
    dbd.write_text(
        f"""AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost={host}
DbdAddr=127.0.0.1
DbdPort={ports["slurmdbd"]}
SlurmUser=root
PidFile={run / "slurmdbd.pid"}
LogFile={log / "slurmdbd.log"}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports["mariadb"]}
StorageUser=slurm
StoragePass={db_password}
StorageLoc=slurm_acct_db
"""
    )
    dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it holds the password)


def _spawn(state: Path, name: str, cmd: list[str], env: dict[str, str]) -> int:
    """Start one daemon in the foreground of its own session; its pid goes to state/pids."""
    log = open(state / "log" / f"{name}.out", "ab")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    with open(state / "pids", "a") as fh:
        fh.write(f"{name} {proc.pid}\n")
    return proc.pid


def _wait(what: str, ready, state: Path, timeout: float) -> None:
    """Poll `ready()` until it is true; on timeout raise with the logs' tails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.25)
    tails = []
    for f in sorted((state / "log").glob("*")):
        tails.append(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}")
    raise RuntimeError(
        f"{what} not ready after {timeout:.0f} s (state in {state}):\n" + "\n".join(tails)
    )


def start(state: Path, *, gpus: int = 2, timeout: float = 90) -> Cluster:
    """Bring the cluster up under `state` (a fresh folder) and wait until its node is idle.

    Raises SlurmUnavailable when this machine cannot run it (not root, commands missing),
    RuntimeError when a daemon does not come up.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster's slurmd must run as root")
    if missing := missing_commands():
        raise SlurmUnavailable(f"Slurm commands not installed: {', '.join(missing)}")
    try:
        return _start(state, gpus, timeout)
    except BaseException:
        stop(state)  # a half-started cluster leaves no daemon behind
        raise


def _start(state: Path, gpus: int, timeout: float) -> Cluster:
    cpus, mem_mb = node_size()
    cluster = Cluster(state=state, partition=PARTITION, cpus=cpus, mem_mb=mem_mb, gpus=gpus)
    for sub in ("etc", "run", "log", "ctld", "spool", "db", "munge"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)
    ports = dict(zip(("slurmctld", "slurmd", "slurmdbd", "mariadb"), free_ports(4)))
    password = secrets.token_hex(12)
    write_configs(state, ports, cpus=cpus, mem_mb=mem_mb, gpus=gpus, db_password=password)
    write_srun_wrapper(cluster.bin, cluster.conf)
    env = cluster.env
    run, db = state / "run", state / "db"

    # munge: a fresh key, our own socket.
    key = state / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    (state / "munge").chmod(0o700)
    _spawn(
        state,
        "munged",
        [
            _which("munged"),
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={run / 'munge.socket'}",
            f"--pid-file={run / 'munged.pid'}",
            f"--seed-file={state / 'munge' / 'seed'}",
            f"--log-file={state / 'log' / 'munged.log'}",
        ],
        env,
    )
    _wait("munged", (run / "munge.socket").exists, state, timeout)

    # MariaDB for slurmdbd: a private data folder, TCP on 127.0.0.1 only.
    mysql_socket = run / "mysqld.sock"
    subprocess.run(
        [
            _which("mariadb-install-db"),
            "--no-defaults",
            f"--datadir={db}",
            "--user=root",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    _spawn(
        state,
        "mariadbd",
        [
            _which("mariadbd"),
            "--no-defaults",
            f"--datadir={db}",
            "--user=root",
            f"--socket={mysql_socket}",
            f"--port={ports['mariadb']}",
            "--bind-address=127.0.0.1",
            f"--pid-file={run / 'mariadbd.pid'}",
            f"--log-error={state / 'log' / 'mariadbd.log'}",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=64M",
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-lock-wait-timeout=900",
        ],
        env,
    )
    mysql = [_which("mariadb"), "--no-defaults", f"--socket={mysql_socket}", "-u", "root"]
    _wait(
        "MariaDB",
        lambda: subprocess.run([*mysql, "-e", "SELECT 1"], capture_output=True).returncode == 0,
        state,
        timeout,
    )
    grants = "".join(
        f"CREATE USER 'slurm'@'{h}' IDENTIFIED BY '{password}'; "
        f"GRANT ALL ON slurm_acct_db.* TO 'slurm'@'{h}'; "
        for h in ("localhost", "127.0.0.1")
    )
    subprocess.run([*mysql, "-e", grants + "FLUSH PRIVILEGES;"], check=True, capture_output=True)

    # Accounting daemon, then the cluster, an account and root's association in it.
    _spawn(state, "slurmdbd", [_which("slurmdbd"), "-D"], env)
    _wait(
        "slurmdbd",
        lambda: cluster.run("sacctmgr", "-n", "list", "cluster", check=False).returncode == 0,
        state,
        timeout,
    )
    cluster.run("sacctmgr", "-i", "add", "cluster", CLUSTER)
    cluster.run(
        "sacctmgr",
        "-i",
        "add",
        "account",
        ACCOUNT,
        f"cluster={CLUSTER}",
        "description=tests",
        "organization=tests",
    )
    cluster.run(
        "sacctmgr",
        "-i",
        "add",
        "user",
        "root",
        f"account={ACCOUNT}",
        f"cluster={CLUSTER}",
        f"defaultaccount={ACCOUNT}",
    )

    _spawn(state, "slurmctld", [_which("slurmctld"), "-D", "-i"], env)
    _spawn(state, "slurmd", [_which("slurmd"), "-D", "-N", NODE], env)

    def node_idle() -> bool:
        res = cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False)
        return res.returncode == 0 and res.stdout.strip() == "idle"

    _wait("the Slurm node", node_idle, state, timeout)
    return cluster


def stop(state: Path, timeout: float = 30) -> None:
    """Stop the daemons that `start` recorded in state/pids, last started first."""
    pids_file = state / "pids"
    if not pids_file.exists():
        return
    entries = [line.split() for line in pids_file.read_text().splitlines() if line.strip()]
    for name, pid in reversed(entries):
        pid = int(pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                # our own child: reap it; a daemon started by another process: poll it
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    pids_file.unlink()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: cluster.py up|down STATE", file=sys.stderr)
        return 2
    state = Path(argv[1]).resolve()
    if argv[0] == "down":
        stop(state)
        return 0
    if missing_commands():
        if not can_install():
            print(
                "error: Slurm is not installed and cannot be (needs root and apt-get)",
                file=sys.stderr,
            )
            return 2
        print(
            f"installed {PACKAGES} in {install(state / 'log' / 'apt.log'):.0f} s", file=sys.stderr
        )
    cluster = start(state)
    print(f"export SLURM_CONF={cluster.conf} PATH={cluster.env['PATH']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
