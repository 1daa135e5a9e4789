"""The generated part of docs/benchmarks.md, and its charts, from one run of bench/run.py.

Kept apart from the harness so that a report can be re-rendered from the raw results
(`python3 bench/report.py WORKDIR/results-quick.json`) without measuring again.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
ORDER = ["local", "bindfs", "direct", "reservoir", "juicefs", "rclone", "nfs-cat"]
CACHING_PEERS = ["juicefs", "rclone"]

# Targets from issue 5, reported (met or missed, by how much), never asserted.
T_WARM_SPEEDUP = 5.0  # warm epoch at least this many times faster than direct remote reads
T_LOCAL_KEPT = 2.0  # warm epoch within this factor of local disk, page cache kept
T_LOCAL_DROPPED = 1.3  # ... and with it dropped
T_COLD_LARGE = 0.85  # cold large-file read: fraction of the link rate
T_PRELOAD = 0.85  # preload of the large files: fraction of the link rate
T_META = 2.0  # warm metadata walk within this factor of local disk
T_HIT = 0.45  # hit ratio when the dataset is twice the cache
EPOCH_KEYS = ["cold", "kept2", "kept3", "dropped2", "dropped3"]


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def num(value: float, digits: int = 0) -> str:
    return "—" if value != value else f"{value:,.{digits}f}"  # NaN: not measured


def ratio(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def run_text(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def proactive_reclaim() -> str:
    """Whether the kernel drops idle page cache on its own, without memory pressure. A DAMON
    `pageout` scheme, as these VMs run, drops file pages left unread for about a minute, so a
    "page cache kept" epoch that follows a longer cold epoch starts partly cold."""
    found = []
    kdamonds = Path("/sys/kernel/mm/damon/admin/kdamonds")
    for scheme in sorted(kdamonds.glob("[0-9]*/contexts/[0-9]*/schemes/[0-9]*")):
        context = scheme.parent.parent
        try:
            running = (context.parent.parent / "state").read_text().strip() == "on"
            if not running or (scheme / "action").read_text().strip() != "pageout":
                continue
            intervals = int((scheme / "access_pattern/age/min").read_text())
            idle_s = intervals * int((context / "monitoring_attrs/intervals/aggr_us").read_text()) / 1e6
            quota = int((scheme / "quotas/bytes").read_text())
            interval_ms = int((scheme / "quotas/reset_interval_ms").read_text())
        except (OSError, ValueError):
            continue
        limit = f", at most {human_bytes(quota)} per {interval_ms} ms" if quota else ""
        found.append(f"DAMON pages out memory idle for {idle_s:.0f} s or more{limit}")
    module = Path("/sys/module/damon_reclaim/parameters")  # DAMON_RECLAIM: not in the tree above
    try:
        if (module / "enabled").read_text().strip() == "Y":
            idle_s = int((module / "min_age").read_text()) / 1e6
            found.append(f"DAMON_RECLAIM pages out memory idle for {idle_s:.0f} s or more")
    except (OSError, ValueError):
        pass
    if not found:
        return "none found (no DAMON pageout scheme running)"
    return "; ".join(found) + (": warm epochs with the page cache kept after a cold epoch "
                               "longer than that start partly cold")  # fmt: skip


def machine(workdir: Path) -> list[tuple[str, str]]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")  # fmt: skip
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)  # fmt: skip
    uname = os.uname()
    source = run_text(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(workdir)])
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} cores (shared with other work during the run: "
                f"load average {os.getloadavg()[0]:.1f} at the end)"),
        ("RAM", human_bytes(mem)),
        ("Proactive reclaim", proactive_reclaim()),
        ("Kernel", f"{uname.sysname} {uname.release}"),
        ("Disk", f"{workdir} on {source or '?'} (dataset, export, every cache and JuiceFS's copy)"),
        ("Date", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]


class Targets:
    """Every target of issue 5, with whether it was met and by how much."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def check(self, name: str, goal: str, measured: str, met: bool, by: str) -> None:
        self.rows.append((name, goal, measured, "met" if met else f"**missed** ({by})"))


RCLONE_NOTE = ("† rclone has no NFS client: it caches a `reservoir mount --no-cache` view of the "
               "same export, so its reads cross the same link through our NFS client.")


def shown(name: str) -> str:
    """A system's name in tables; rclone's carries a mark for the note under each table."""
    return "rclone†" if name == "rclone" else name


def readers(threads: str) -> str:
    return f"{threads} reader{'' if threads == '1' else 's'}"


def warm_seconds(runs: dict, mode: str) -> float:
    """The warm epoch of a mode: the median of epochs 2..E."""
    return statistics.median(v["seconds"] for k, v in runs.items() if k.startswith(mode))


def measured_by_commit(steps: list[dict]) -> list[tuple[str, str]]:
    """Which steps ran with which reservoir build and when: a resumed run may span days."""
    groups: dict[str, list[dict]] = {}
    for step in steps:
        groups.setdefault(step["commit"], []).append(step)
    return [(commit, ", ".join(s["step"] for s in runs) + f" (finished {runs[0]['finished']} to {runs[-1]['finished']})")
            for commit, runs in groups.items()]  # fmt: skip


def render(results: dict, systems: list[dict], commands: list[str], info: list[tuple[str, str]],
           chart_names: dict[str, str], link_rate_mib: float, args: dict) -> str:  # fmt: skip
    scale = results["scale"]
    ds = results["dataset"]
    t = Targets()
    out: list[str] = []
    add = out.append
    add(f"## Results at {scale} scale (generated by `bench/run.py`)")
    add("")
    add(f"Everything between the `bench-{scale}` markers is rewritten by each run (it took "
        f"{results['wall_seconds'] / 60:.0f} minutes); explanations live in the hand-written "
        "sections outside them. Times are single runs on a shared two-core machine: read "
        "ratios, and treat differences under about 20% as noise.")  # fmt: skip
    add("")
    pending = results.get("pending") or []
    if pending:
        add(f"**Partial run.** Not measured yet: {', '.join(pending)}. The same command with "
            "`--resume` measures them and rewrites this section (`make bench` resumes by itself).")  # fmt: skip
        add("")
    add("### Machine and link")
    add("")
    for key, value in info:
        add(f"- **{key}**: {value}")
    for commit, steps in measured_by_commit(results.get("steps", [])):
        add(f"- **Measured with {commit}**: {steps}")
    add(f"- **Link**: a veth pair between two network namespaces, both ends shaped with `tc tbf "
        f"rate {args['rate']} burst 256kb latency 20ms`, and {args['delay_ms']:g} ms of delay each "
        "way added by `examples/delayproxy.rs` (one reader and one sleeping writer thread per "
        "direction) on every port a client uses: portmapper 111, MOUNT 20048, NFS 2049. "
        f"Configured rate: {link_rate_mib:.1f} MiB/s.")  # fmt: skip
    add("")
    add("The proxy's own cost, measured once (RPC NULL round trips to the portmapper over one "
        "connection, median of 300; `nfs-cat` of the first large file, server's page cache warm):")  # fmt: skip
    add("")
    add("| path | RPC round trip | nfs-cat |")
    add("|---|---|---|")
    for label, v in results["link"].items():
        add(f"| {label} | {v['rtt_us']:.0f} µs (p90 {v['rtt_p90_us']:.0f}) | {v['nfs_cat_mib_s']:.0f} MiB/s |")
    link = list(results["link"].values())
    add("")
    add(f"The proxy itself (no delay) adds {link[1]['rtt_us'] - link[0]['rtt_us']:.0f} µs per round "
        f"trip and changes the bare link's large-file rate by "
        f"{(link[1]['nfs_cat_mib_s'] / link[0]['nfs_cat_mib_s'] - 1) * 100:+.0f}%; with the delay "
        f"a round trip takes {link[2]['rtt_us'] - link[0]['rtt_us']:.0f} µs more than on the bare "
        f"link (configured: {2000 * args['delay_ms']:.0f} µs).")  # fmt: skip
    add("")
    add("### Systems, versions and settings")
    add("")
    add("| system | version | settings |")
    add("|---|---|---|")
    for s in systems:
        add(f"| **{s['name']}** | {s['version']} | {s['settings']} |")
    add(f"| **nfs-cat** | {results['versions'].get('libnfs-utils (nfs-cat)', '?')} | Debian's "
        "libnfs client, an independent NFS reader for the large files (no cache) |")  # fmt: skip
    add("")
    add(f"Server: {results['versions'].get('nfs-ganesha', '?')} (VFS backend), NFSv3, in its own "
        "namespace with its own rpcbind; the export is read-write, reservoir mounts it read-only.")  # fmt: skip
    if results.get("juicefs_import_seconds") is not None:
        total = ds["small_bytes"] + sum(ds["large_sizes"])
        sec = results["juicefs_import_seconds"]
        add("")
        add(f"JuiceFS import (copying the dataset into it through the link, not counted in any "
            f"workload): {sec:.1f} s for {human_bytes(total)} ({total / MiB / sec:.0f} MiB/s).")  # fmt: skip
    add("")
    add("### Dataset")
    add("")
    add(f"- `small/`: {ds['small_files']:,} files of 4-128 KiB (uniform, seeded), "
        f"{human_bytes(ds['small_bytes'])} in all, in `gNN/dNN/` directories.")  # fmt: skip
    add(f"- `large/`: {len(ds['large_sizes'])} files: "
        + ", ".join(human_bytes(s) for s in ds["large_sizes"]) + ".")
    add("")
    add("### Commands")
    add("")
    add("```sh")
    out.extend(commands)
    add("```")
    add("")

    # 1. Epochs.
    epochs = results["epochs"]
    names = [n for n in ORDER if n in epochs]
    add("### 1. Training epochs (shuffled reads of every small file)")
    add("")
    add("Epoch 1 is cold: an empty cache and the page cache dropped. Epochs 2-3 follow once with "
        "the page cache kept and once with it dropped before each epoch (the caches stay). "
        "Each epoch walks the tree and reads every file in a seeded shuffled order, N readers "
        "sharing the list. *× direct*: how many times faster than direct remote reads "
        "(direct's seconds ÷ this system's); *÷ local*: seconds ÷ local disk's seconds. Warm = "
        "median of epochs 2-3.")  # fmt: skip
    add("")
    add(f"![epoch times per system]({chart_names['epochs']})")
    add("")
    for threads in next(iter(epochs.values())):
        add(f"**{threads} reader{'s' if threads != '1' else ''}** — seconds per epoch (files/s of the warm epochs)")
        add("")
        add("| system | epoch 1 (cold) | 2, kept | 3, kept | 2, dropped | 3, dropped | warm kept: × direct / ÷ local | warm dropped: × direct / ÷ local | link bytes, cold epoch |")
        add("|---|---|---|---|---|---|---|---|---|")
        direct = epochs.get("direct", {}).get(threads)
        local = epochs["local"][threads]
        for name in names:
            runs = epochs[name][threads]
            cells = [f"{runs[k]['seconds']:.2f}" for k in EPOCH_KEYS]
            ratios = []
            for mode in ("kept", "dropped"):
                sec = warm_seconds(runs, mode)
                vs_direct = warm_seconds(direct, mode) / sec if direct else float("nan")
                vs_local = sec / warm_seconds(local, mode)
                ratios.append(f"{ratio(vs_direct)}× / {ratio(vs_local)} ({num(ds['small_files'] / sec)} files/s)")
            add(f"| {shown(name)} | " + " | ".join(cells) + " | " + " | ".join(ratios)
                + f" | {human_bytes(runs['cold']['link_bytes'])} |")
        add("")
        if "rclone" in epochs:
            add(RCLONE_NOTE)
            add("")
        # Targets on the warm epochs.
        if direct and "reservoir" in epochs:
            ours = epochs["reservoir"][threads]
            for mode, limit in (("kept", T_LOCAL_KEPT), ("dropped", T_LOCAL_DROPPED)):
                sec = warm_seconds(ours, mode)
                speedup = warm_seconds(direct, mode) / sec
                t.check(f"1. warm epoch vs direct, {readers(threads)}, page cache {mode}", f"≥ {T_WARM_SPEEDUP:g}× faster",
                        f"{ratio(speedup)}×", speedup >= T_WARM_SPEEDUP, f"{(1 - speedup / T_WARM_SPEEDUP) * 100:.0f}% short")  # fmt: skip
                vs_local = sec / warm_seconds(local, mode)
                t.check(f"1. warm epoch vs local, {readers(threads)}, page cache {mode}", f"≤ {limit}× local",
                        f"{ratio(vs_local)}×", vs_local <= limit, f"{(vs_local / limit - 1) * 100:.0f}% over")  # fmt: skip
                for peer in CACHING_PEERS:
                    if peer in epochs:
                        theirs = warm_seconds(epochs[peer][threads], mode)
                        t.check(f"1. faster than {peer}, warm epoch, {readers(threads)}, page cache {mode}",
                                "faster", f"{ratio(theirs / sec)}× faster", sec < theirs,
                                f"{ratio(sec / theirs)}× slower")  # fmt: skip

    # 2. Large files.
    large = results["large"]
    add("### 2. Large files")
    add("")
    add(f"Sequential 1 MiB reads of `large/shard0.bin`: cold (empty cache, page cache dropped), "
        "warm with the page cache kept, warm with it dropped. Random 1 MiB reads (4 threads, "
        "seeded aligned offsets) of `large/shard1.bin`: cold, then the same offsets again with "
        f"the page cache dropped. MiB/s; *÷ link*: cold rate ÷ the configured {link_rate_mib:.0f} MiB/s.")  # fmt: skip
    add("")
    add(f"![throughput per system]({chart_names['throughput']})")
    add("")
    add("| system | seq cold | ÷ link | seq warm, kept | seq warm, dropped | ÷ local (dropped) | random cold | random warm | link bytes, seq cold |")
    add("|---|---|---|---|---|---|---|---|---|")

    def rate(v: dict | None) -> float:
        return v["bytes"] / MiB / v["seconds"] if v else float("nan")

    for name in [n for n in ORDER if n in large]:
        v = large[name]
        local_d = rate(large["local"]["seq_dropped"])
        add(f"| {shown(name)} | {num(rate(v['seq_cold']))} | {num(rate(v['seq_cold']) / link_rate_mib, 2)} "
            f"| {num(rate(v.get('seq_kept')))} | {num(rate(v.get('seq_dropped')))} "
            f"| {num(rate(v.get('seq_dropped')) / local_d, 2)} | {num(rate(v.get('rand_cold')))} "
            f"| {num(rate(v.get('rand_dropped')))} "
            f"| {human_bytes(v['seq_cold'].get('link_bytes', 0)) if 'link_bytes' in v['seq_cold'] else '—'} |")  # fmt: skip
    add("")
    if "rclone" in large:
        add(RCLONE_NOTE)
        add("")
    if "reservoir" in large:
        ours = large["reservoir"]
        cold = rate(ours["seq_cold"]) / link_rate_mib
        t.check("2. cold large-file read", f"≥ {T_COLD_LARGE:g} of the link rate", f"{cold:.2f}", cold >= T_COLD_LARGE,
                f"{(T_COLD_LARGE - cold) * 100:.0f} points short")  # fmt: skip
        for peer in CACHING_PEERS:
            if peer in large:
                for key, label in (("seq_kept", "sequential, page cache kept"),
                                   ("seq_dropped", "sequential, page cache dropped"),
                                   ("rand_dropped", "random 1 MiB")):  # fmt: skip
                    a, b = rate(ours[key]), rate(large[peer][key])
                    t.check(f"2. faster than {peer}, warm large file, {label}", "faster",
                            f"{ratio(a / b)}× the rate", a > b, f"{ratio(b / a)}× slower")  # fmt: skip

    # 3. Metadata.
    meta = results["meta"]
    add("### 3. Metadata: `readtree stat` (readdir + lstat, 1 thread) and `ls -lR` of `small/`")
    add("")
    add("Cold: a fresh mount with the page cache (dentries, inodes) dropped; warm: the same "
        "walk again. Seconds; *÷ local*: warm seconds ÷ local disk's warm seconds.")  # fmt: skip
    add("")
    add("| system | stat cold | stat warm | ÷ local | ls -lR cold | ls -lR warm | ÷ local |")
    add("|---|---|---|---|---|---|---|")
    for name in [n for n in ORDER if n in meta]:
        v, loc = meta[name], meta["local"]
        add(f"| {shown(name)} | {v['stat_cold']:.2f} | {v['stat_warm']:.3f} | {v['stat_warm'] / loc['stat_warm']:.2f} "
            f"| {v['ls_cold']:.2f} | {v['ls_warm']:.3f} | {v['ls_warm'] / loc['ls_warm']:.2f} |")  # fmt: skip
    add("")
    if "reservoir" in meta:
        v, loc = meta["reservoir"], meta["local"]
        for key, label in (("stat_warm", "stat walk"), ("ls_warm", "ls -lR")):
            r = v[key] / loc[key]
            t.check(f"3. warm {label} vs local", f"≤ {T_META:g}× local", f"{ratio(r)}×", r <= T_META,
                    f"{(r / T_META - 1) * 100:.0f}% over")  # fmt: skip
            for peer in CACHING_PEERS:
                if peer in meta:
                    a, b = v[key], meta[peer][key]
                    t.check(f"3. faster than {peer}, warm {label}", "faster", f"{ratio(b / a)}× faster",
                            a < b, f"{ratio(a / b)}× slower")  # fmt: skip

    # 4. Preload.
    if "preload" in results:
        p = results["preload"]
        add("### 4. Preload: `reservoir warm` on an empty cache")
        add("")
        add("| part | seconds | files/s | MiB/s | ÷ link | bytes over the link |")
        add("|---|---|---|---|---|---|")
        for part, files, size in (("small", ds["small_files"], ds["small_bytes"]),
                                  ("large", len(ds["large_sizes"]), sum(ds["large_sizes"]))):  # fmt: skip
            v = p[part]
            mib_s = size / MiB / v["seconds"]
            add(f"| `{part}/` ({files:,} files, {human_bytes(size)}) | {v['seconds']:.1f} | {num(files / v['seconds'])} "
                f"| {mib_s:.0f} | {mib_s / link_rate_mib:.2f} | {human_bytes(v['link_bytes'])} |")  # fmt: skip
            if part == "large":
                f = mib_s / link_rate_mib
                t.check("4. preload of the large files", f"≥ {T_PRELOAD:g} of the link rate", f"{f:.2f}", f >= T_PRELOAD,
                        f"{(T_PRELOAD - f) * 100:.0f} points short")  # fmt: skip
        after = p["epoch_after"]
        add("")
        add(f"Verified end: an 8-reader epoch right after the preload (page cache dropped) took "
            f"{after['seconds']:.2f} s and moved {human_bytes(after['link_bytes'])} over the link "
            f"(the dataset is {human_bytes(ds['small_bytes'])}).")  # fmt: skip
        add("")

    # 5. Half cache.
    half = results["half_cache"]
    if half:
        add("### 5. Dataset twice the cache")
        add("")
        add("The small-file set through a cache of half its size; 8 readers, shuffled, page cache "
            "dropped before each epoch. *Hit ratio* = 1 − bytes received over the link (veth "
            "counter, RPC headers included) ÷ bytes the epoch read, the same way for every system.")  # fmt: skip
        add("")
        add("| system | cache | epoch 1: s / hit | epoch 2: s / hit | epoch 3: s / hit |")
        add("|---|---|---|---|---|")
        for name in [n for n in ORDER if n in half]:
            v = half[name]
            cells = [f"{r['seconds']:.2f} / {1 - r['link_bytes'] / r['bytes']:.2f}" for r in v["runs"]]
            add(f"| {shown(name)} | {human_bytes(v['cache_bytes'])} | " + " | ".join(cells) + " |")
        add("")
        if "rclone" in half:
            add(RCLONE_NOTE)
            add("")
        if "reservoir" in half:
            runs = half["reservoir"]["runs"][1:]
            hit = statistics.median(1 - r["link_bytes"] / r["bytes"] for r in runs)
            t.check("5. hit ratio, dataset twice the cache (epochs 2-3)", f"≥ {T_HIT:g}", f"{hit:.2f}",
                    hit >= T_HIT, f"{(T_HIT - hit) * 100:.0f} points short")  # fmt: skip
            for peer in CACHING_PEERS:
                if peer in half:
                    a = statistics.median(r["seconds"] for r in runs)
                    b = statistics.median(r["seconds"] for r in half[peer]["runs"][1:])
                    t.check(f"5. faster than {peer}, epochs 2-3 with half the cache", "faster",
                            f"{ratio(b / a)}× faster", a < b, f"{ratio(a / b)}× slower")  # fmt: skip

    # 6. Resources.
    usage = results["usage"]
    add("### 6. Resources of each daemon during workloads 1-2")
    add("")
    add("CPU seconds (user + system) summed over every mount made for workloads 1 and 2; peak "
        "RSS (VmHWM) of the largest of those mounts. Both cover every process of a system: "
        "JuiceFS's foreground mount is a supervisor and a worker, and rclone's numbers include "
        "the `reservoir mount --no-cache` view it reads. Read from `/proc/PID/stat` and "
        "`/proc/PID/status` of the process tree just before each unmount.")  # fmt: skip
    add("")
    add("| system | processes | CPU seconds | peak RSS |")
    add("|---|---|---|---|")
    for name in [n for n in ORDER if n in usage]:
        v = usage[name]
        if not v["procs"]:
            continue
        add(f"| {shown(name)} | {', '.join(v['procs'])} | {v['cpu']:.1f} | {human_bytes(v['peak'])} |")
    add("")

    # Targets.
    add("### Targets of issue 5")
    add("")
    add("| target | goal | measured (reservoir) | result |")
    add("|---|---|---|---|")
    for row in t.rows:
        add("| " + " | ".join(row) + " |")
    missed = sum(1 for row in t.rows if "missed" in row[3])
    add("")
    add(f"{len(t.rows) - missed} of {len(t.rows)} met. Why each missed one is missed: see "
        "*Explanations of missed targets* below the generated results.")  # fmt: skip
    return "\n".join(out)


def charts(results: dict, directory: Path, scale: str) -> dict[str, str]:
    """Two PNG charts; returns their paths relative to the document."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    names = {}
    epochs = results["epochs"]
    systems = [n for n in ORDER if n in epochs]
    readers = list(next(iter(epochs.values())))
    fig, axes = plt.subplots(1, len(readers), figsize=(5 * len(readers), 4.2), sharey=True)
    if len(readers) == 1:
        axes = [axes]
    labels = ["1 cold", "2 kept", "3 kept", "2 dropped", "3 dropped"]
    width = 0.8 / len(EPOCH_KEYS)
    for ax, threads in zip(axes, readers):
        for i, (key, label) in enumerate(zip(EPOCH_KEYS, labels)):
            xs = [j + (i - 2) * width for j in range(len(systems))]
            ax.bar(xs, [epochs[s][threads][key]["seconds"] for s in systems], width, label=label)
        ax.set_xticks(range(len(systems)), systems, rotation=30)
        ax.set_yscale("log")
        ax.set_title(f"{threads} reader{'s' if threads != '1' else ''}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("seconds per epoch (log scale, lower is better)")
    axes[-1].legend(title="epoch, page cache", fontsize=8)
    fig.suptitle(f"Epoch times per system ({results['dataset']['small_files']:,} small files, {scale} scale)")
    fig.tight_layout()
    path = directory / f"bench-{scale}-epochs.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    names["epochs"] = path

    large = results["large"]
    systems = [n for n in ORDER if n in large]
    keys = [("seq_cold", "sequential cold"), ("seq_kept", "sequential warm, kept"),
            ("seq_dropped", "sequential warm, dropped"), ("rand_cold", "random 1 MiB cold"),
            ("rand_dropped", "random 1 MiB warm")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        xs, ys = [], []
        for j, s in enumerate(systems):
            v = large[s].get(key)
            if v:
                xs.append(j + (i - 2) * width)
                ys.append(v["bytes"] / MiB / v["seconds"])
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(systems)), systems)
    ax.set_yscale("log")
    ax.set_ylabel("MiB/s (log scale, higher is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Large-file throughput per system ({scale} scale)")
    fig.tight_layout()
    path = directory / f"bench-{scale}-throughput.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    names["throughput"] = path
    return names


INTRO = """# Benchmarks

Reproduce with `make bench-quick` (as root; about 15 minutes at reduced scale) or `make bench`
(100,000 small files and three files of 1-2 GiB; hours, mostly spent on the uncached systems).
Both run `bench/run.py`, which builds an emulated remote link (nfs-ganesha in one network
namespace, the clients in another, a veth pair shaped to 1 Gbit/s with `tbf`, and 1 ms each
way from our delay proxy), runs reservoir and its peers over it on the same data, rewrites its
generated section below and draws the charts it embeds. Link parameters are flags
(`--rate`, `--delay-ms`); `--keep` keeps the dataset for the next run.
"""

EXPLANATIONS_HEADING = "## Explanations of missed targets"


def write_doc(path: Path, scale: str, body: str) -> None:
    """Replaces this scale's generated block, keeping every other section of the file."""
    begin, end = f"<!-- bench-{scale}:begin -->", f"<!-- bench-{scale}:end -->"
    block = f"{begin}\n{body}\n{end}"
    if path.exists():
        text = path.read_text()
        if begin in text and end in text and text.index(begin) < text.index(end):
            head, rest = text.split(begin, 1)
            text = head + block + rest.split(end, 1)[1]
        elif EXPLANATIONS_HEADING in text:  # a new scale's block goes before the explanations
            head, rest = text.split(EXPLANATIONS_HEADING, 1)
            text = head + block + "\n\n" + EXPLANATIONS_HEADING + rest
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = INTRO + "\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write(bench, out: Path) -> None:
    """Renders a finished run of bench/run.py into `out` and its charts."""
    results = bench.results
    results["versions"] = bench.versions
    systems = [{"name": s.name, "version": s.version, "settings": s.settings} for s in bench.systems]
    commands = commands_of(bench)
    extra = {"systems": systems, "commands": commands, "machine": machine(bench.workdir),
             "link_rate_mib": bench.link_mib_s,
             "args": {"rate": bench.args.rate, "delay_ms": bench.args.delay_ms}}  # fmt: skip
    raw = bench.workdir / f"results-{results['scale']}.json"
    raw.write_text(json.dumps({**results, "report": extra}, indent=1))
    render_file(raw, out)


def render_file(raw: Path, out: Path) -> None:
    data = json.loads(raw.read_text())
    extra = data["report"]
    images = charts(data, out.parent / "img", data["scale"])
    rel = {k: os.path.relpath(v, out.parent) for k, v in images.items()}
    body = render(data, extra["systems"], extra["commands"], [tuple(x) for x in extra["machine"]],
                  rel, extra["link_rate_mib"], extra["args"])  # fmt: skip
    write_doc(out, data["scale"], body)


def commands_of(bench) -> list[str]:
    w = str(bench.workdir)

    def short(argv: list[str]) -> str:
        text = re.sub(r"/run/netns/rsvb-cli-\d+", f"/run/netns/{bench.link.cli}", " ".join(argv))
        for long, abbrev in ((str(bench.link.cli), "$CLI"), (w, "$W"), (str(bench.workdir / "mnt"), "$W/mnt"),
                             (os.environ.get("CARGO_TARGET_DIR", "target"), "$T")):  # fmt: skip
            text = text.replace(long, abbrev)
        return text

    lines = [
        f"W={w}; T=${{CARGO_TARGET_DIR:-target}}; CLI=/run/netns/<client namespace>",
        f"python3 bench/run.py --scale {bench.scale.name} --rate {bench.args.rate} --delay-ms {bench.args.delay_ms:g}",
        "# the link (see bench/run.py: Link.up)",
        "ip netns add rsvb-srv-PID; ip netns add rsvb-cli-PID; ip link add ... type veth peer ...",
        f"tc -n NS qdisc add dev VETH root tbf rate {bench.args.rate} burst 256kb latency 20ms   # both ends",
        "ip netns exec rsvb-srv-PID unshare -m sh -c 'mount -t tmpfs none /run; rpcbind -f & ganesha.nfsd -F ...'",
        f"nsenter --net=$CLI -- $T/release/examples/delayproxy proxy --delay-us {int(bench.args.delay_ms * 1000)} "
        "--map 127.0.0.1:111=198.19.255.1:111 --map 127.0.0.1:20048=198.19.255.1:20048 --map 127.0.0.1:2049=198.19.255.1:2049",
        "# the systems (each mount made fresh, with an empty cache, for every measurement series)",
    ]
    kept = bench.results.get("argv", {})
    for s in bench.systems:
        for argv in s.argv or kept.get(s.name, []):
            lines.append(short(argv))
    lines += [
        "nsenter --net=$CLI -- nfs-cat nfs://127.0.0.1$W/export/data/large/shard0.bin > /dev/null",
        "# the loads; ROOT is $W/export/data (local) or the system's mount point",
        "sync; echo 3 > /proc/sys/vm/drop_caches                      # before every cold or 'dropped' run",
        "$T/release/examples/readtree read ROOT/small --threads N --shuffle SEED     # 1 and 5",
        "$T/release/examples/readtree read-file ROOT/large/shard0.bin                # 2",
        f"$T/release/examples/readtree read-random ROOT/large/shard1.bin --count {bench.scale.random_reads} --threads 4   # 2",
        "$T/release/examples/readtree stat ROOT/small; ls -lR ROOT/small > /dev/null  # 3",
        "RESERVOIR_RUN_DIR=$W/run $T/release/reservoir warm --json $W/mnt/reservoir $W/mnt/reservoir/small   # 4 (then large)",
        "ip -n rsvb-cli-PID -j -s link show dev VETH    # rx bytes before and after: bytes over the link",
    ]
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python3 bench/report.py WORKDIR/results-SCALE.json", file=sys.stderr)
        sys.exit(2)
    render_file(Path(sys.argv[1]), Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md")
