"""A real single-host SLURM cluster for tests: munged, slurmctld and two slurmd "nodes", no systemd.

Needs the Debian packages slurmctld, slurmd, slurm-client and munge (.ci/run installs them) and root.
Everything lives in one temporary directory; the daemons are stopped by PID.  Clients find the cluster
through ``SLURM_CONF`` (``cluster.env``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.distributed import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")


def missing_requirements() -> str | None:
    """Why a cluster cannot start here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"SLURM/munge not installed (missing: {', '.join(absent)}); apt-get install slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "the local SLURM test cluster runs its daemons as root"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin") / name)


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2):
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.pids: list[Path] = []

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "log", "munge", "spool"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o755)  # munged refuses a socket directory that is not 755
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=lucidtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            # cred_expire (default 120 s) is also how long slurmctld holds a requeued job before it may start
            # again (sooner, slurmd refuses the launch: "Job credential revoked"). slurmd checks a launch
            # credential moments after slurmctld makes it, so 10 s is ample for a local step (Slurm's minimum: 5).
            f"AuthInfo=socket={r / 'munge' / 'munge.socket'},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # No event wakes the scheduler when a requeued job's hold (above) ends: it waited for the next periodic
            # pass (sched_interval, 60 s by default) or a node ping (every SlurmdTimeout / 3) that makes the
            # backfill pass run, i.e. 20-40 s after the requeue; with passes every second the job starts after
            # cred_expire + 1 s. A submitted job waited sched_min_interval (2 s by default; in microseconds).
            "SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=200000",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=600",
            "KillWait=30",
            "SlurmdTimeout=60",
            "MpiDefault=none",
        ]
        for i, node in enumerate(self.nodes):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
                         f"CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=FORCE:4")
        self.conf.write_text("\n".join(lines) + "\n")
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_config()
        r = self.root
        subprocess.run([_exe("munged"), "--force", f"--socket={r / 'munge' / 'munge.socket'}",
                        f"--key-file={r / 'munge' / 'munge.key'}", f"--pid-file={r / 'munged.pid'}",
                        f"--log-file={r / 'log' / 'munged.log'}", f"--seed-file={r / 'munge' / 'seed'}"],
                       check=True, env=self.env)
        self.pids.append(r / "munged.pid")
        subprocess.run([_exe("slurmctld"), "-f", str(self.conf)], check=True, env=self.env)
        self.pids.append(r / "slurmctld.pid")
        for node in self.nodes:
            subprocess.run([_exe("slurmd"), "-N", node, "-f", str(self.conf)], check=True, env=self.env)
            self.pids.append(r / f"slurmd-{node}.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], capture_output=True, text=True, env=self.env)
            if out.returncode == 0 and out.stdout.split()[:2] == ["idle", str(len(self.nodes))]:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM did not come up: {out.stdout} {out.stderr}; logs in {r / 'log'}")

    def stop(self) -> None:
        """SIGTERM to every daemon at once (each takes about 2 s to exit), SIGKILL to any left after 5 s."""
        pids = []
        for pid_file in reversed(self.pids):
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
        deadline = time.monotonic() + 5
        while pids:
            for pid in list(pids):
                try:
                    os.kill(pid, 0 if time.monotonic() < deadline else signal.SIGKILL)
                except ProcessLookupError:
                    pids.remove(pid)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        self.pids.clear()

    def job_state(self, job_id: str) -> str:
        out = subprocess.run(["squeue", "--states=all", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                             text=True, env=self.env)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
             timeout: float = 900) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state!r} after {timeout}s")
