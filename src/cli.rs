//! `reservoir status` and `reservoir warm`: clients of a mount's control socket, or of the
//! node daemon's (every volume; `--volume ID` for one).

use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};

use reservoir::cache::Damage;
use reservoir::control::{ControlClient, ControlRequest, DaemonStatus, MountStatus, Response};
use reservoir::fs::warm::Progress;
use reservoir::units::human_bytes;

/// How often progress lines are printed when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub fn status(mountpoint: &Path, json: bool, socket: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut client = ControlClient::connect(mountpoint, socket)?;
    client.send(&ControlRequest::Status)?;
    let status = match client.receive()? {
        Response::Status(status) => status,
        other => bail!("unexpected answer from the mount: {other:?}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_status(&status));
    }
    Ok(ExitCode::SUCCESS)
}

/// `reservoir status --socket PATH`: a daemon's volumes (or the one mount behind the socket).
pub fn status_socket(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = ControlClient::connect_to(socket)?;
    client.send(&ControlRequest::Status)?;
    match client.receive()? {
        Response::DaemonStatus(status) if json => {
            println!("{}", serde_json::to_string_pretty(&status)?)
        }
        Response::DaemonStatus(status) => print!("{}", render_daemon_status(&status)),
        Response::Status(status) if json => {
            println!("{}", serde_json::to_string_pretty(&status)?)
        }
        Response::Status(status) => print!("{}", render_status(&status)),
        other => bail!("unexpected answer from {}: {other:?}", socket.display()),
    }
    Ok(ExitCode::SUCCESS)
}

/// What the cache found and repaired, in a line: the counts that are not zero.
fn describe_damage(d: &Damage) -> String {
    let found: Vec<String> = [
        (d.journal_bytes_dropped, "journal bytes cut off"),
        (d.unknown_files_removed, "unknown files removed"),
        (d.missing_files, "files missing"),
        (d.resized_files, "files of the wrong length"),
        (d.blocks_dropped, "blocks dropped"),
        (d.set_aside, "directory of another format set aside"),
        (d.evicted_for_space, "files given back for free space"),
        (d.store_failures, "blocks the disk refused"),
    ]
    .iter()
    .filter(|(count, _)| *count > 0)
    .map(|(count, what)| format!("{count} {what}"))
    .collect();
    if found.is_empty() {
        "none found".into()
    } else {
        format!("{} (dropped parts are fetched again)", found.join(", "))
    }
}

fn render_daemon_status(s: &DaemonStatus) -> String {
    let c = &s.cache;
    let mut out = format!(
        "daemon         pid {}, socket {}\n",
        s.pid,
        s.socket.display()
    );
    out.push_str(&format!(
        "cache          {}: {} used of {} ({}), {} files ({} complete)\n",
        c.dir.display(),
        human_bytes(c.used),
        human_bytes(c.capacity),
        percent(c.used, c.capacity),
        c.files,
        c.complete_files
    ));
    out.push_str(&format!(
        "cache activity {} admitted, {} not admitted, {} evicted ({}), {} checksum failures\n",
        c.admitted,
        c.rejected,
        c.evicted_files,
        human_bytes(c.evicted_bytes),
        c.verify_failures
    ));
    out.push_str(&format!("cache damage   {}\n", describe_damage(&c.damage)));
    if s.volumes.is_empty() {
        out.push_str("volumes        none\n");
    } else {
        let mut rows = vec![
            [
                "VOLUME", "TARGET", "SOURCE", "STATE", "CACHED", "QUOTA", "FILES", "HIT", "PRELOAD",
            ]
            .map(String::from),
        ];
        for v in &s.volumes {
            let owner = v.volume.cache.as_ref().and_then(|c| c.owner.as_ref());
            rows.push([
                v.volume_id.clone(),
                v.target_path.display().to_string(),
                v.volume.source.clone(),
                format!(
                    "{}{}",
                    if v.volume.online { "online" } else { "OFFLINE" },
                    if v.read_write { ",rw" } else { "" }
                ),
                owner.map_or("-".into(), |o| human_bytes(o.used)),
                v.cache_size.map_or("node".into(), human_bytes),
                owner.map_or("-".into(), |o| o.files.to_string()),
                v.volume
                    .hit_ratio
                    .map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
                match &v.volume.preload {
                    None => "-".into(),
                    Some(p) if p.done => format!("done {}/{}", p.files_done(), p.files_total),
                    Some(p) => format!(
                        "{}/{}{}",
                        p.files_done(),
                        p.files_total,
                        if p.scanning { "+" } else { "" }
                    ),
                },
            ]);
        }
        out.push_str(&table(&rows));
        for v in s.volumes.iter().filter(|v| v.origin.is_some()) {
            let origin = v.origin.as_deref().unwrap_or_default();
            out.push_str(&format!("{}: {origin}\n", v.volume_id));
        }
    }
    for p in &s.pending {
        out.push_str(&format!(
            "{} {} at {}\n",
            p.state,
            p.volume_id,
            p.target_path.display()
        ));
    }
    let orphans: Vec<_> = s.owners.iter().filter(|o| o.name.is_none()).collect();
    if !orphans.is_empty() {
        out.push_str(&format!(
            "not mounted    {} in {} files of volumes no longer mounted (kept for the next reader)\n",
            human_bytes(orphans.iter().map(|o| o.used).sum()),
            orphans.iter().map(|o| o.files).sum::<u64>()
        ));
    }
    out
}

/// Left-aligned columns separated by two spaces.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

fn render_status(s: &MountStatus) -> String {
    let v = &s.volume;
    let mut out = String::new();
    let mut line = |label: &str, value: String| out.push_str(&format!("{label:<15}{value}\n"));
    line(
        "mount point",
        format!("{} (pid {})", s.mountpoint.display(), s.pid),
    );
    line(
        "source",
        format!(
            "{} ({})",
            v.source,
            if v.online {
                "online"
            } else {
                "OFFLINE: serving what is cached"
            }
        ),
    );
    line(
        "metadata",
        format!(
            "TTL {}, {} names known ({} held by the kernel)",
            v.metadata_ttl, v.nodes_known, v.nodes_referenced
        ),
    );
    match &v.cache {
        Some(c) => {
            line(
                "cache",
                format!(
                    "{}: {} used of {} ({}), {} files ({} complete)",
                    c.dir.display(),
                    human_bytes(c.used),
                    human_bytes(c.capacity),
                    percent(c.used, c.capacity),
                    c.files,
                    c.complete_files
                ),
            );
            line(
                "cache activity",
                format!(
                    "{} admitted, {} not admitted, {} evicted ({}), {} checksum failures",
                    c.admitted,
                    c.rejected,
                    c.evicted_files,
                    human_bytes(c.evicted_bytes),
                    c.verify_failures
                ),
            );
            line("cache damage", describe_damage(&c.damage));
        }
        None => line("cache", "none (--no-cache)".into()),
    }
    line(
        "hit ratio",
        v.hit_ratio
            .map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
    );
    line(
        "served",
        format!(
            "{} from cache by the daemon, {} passthrough opens (up to {}), {} from the source",
            human_bytes(v.bytes_from_cache),
            v.passthrough_opens,
            human_bytes(v.passthrough_bytes),
            human_bytes(v.bytes_from_source)
        ),
    );
    line(
        "fetched",
        format!(
            "{} for readers, {} by preloads, {} source errors, {} background commits",
            human_bytes(v.bytes_fetched),
            human_bytes(v.bytes_preloaded),
            v.source_errors,
            v.background_commits
        ),
    );
    let preload = match &v.preload {
        None => "none".to_string(),
        Some(p) if p.done => format!("finished: {}", summary(p)),
        Some(p) => format!("running: {}", summary(p)),
    };
    line("preload", preload);
    out
}

fn summary(p: &Progress) -> String {
    format!(
        "{}/{} files{}, {} loaded, {} already cached, {} failed",
        p.files_done(),
        p.files_total,
        if p.scanning { " (still scanning)" } else { "" },
        human_bytes(p.bytes_loaded),
        human_bytes(p.bytes_cached),
        p.files_failed
    )
}

/// Turns paths given on the command line into paths relative to the mount's root.
fn relative_paths(mountpoint: &Path, paths: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let root = lexical_absolute(mountpoint)?;
    paths
        .iter()
        .map(|path| {
            let absolute = lexical_absolute(path)?;
            let inside = absolute.strip_prefix(&root).with_context(|| {
                format!(
                    "{} is not inside the mount {}",
                    path.display(),
                    mountpoint.display()
                )
            })?;
            inside
                .to_str()
                .map(str::to_string)
                .with_context(|| format!("{} is not valid UTF-8", path.display()))
        })
        .collect()
}

fn lexical_absolute(path: &Path) -> anyhow::Result<PathBuf> {
    let absolute = std::path::absolute(path).with_context(|| format!("{}", path.display()))?;
    let mut out = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

pub fn warm(
    mountpoint: &Path,
    paths: &[PathBuf],
    parallel: usize,
    json: bool,
    socket: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let paths = relative_paths(mountpoint, paths)?;
    let mut client = ControlClient::connect(mountpoint, socket)?;
    client.send(&ControlRequest::Warm {
        paths,
        parallel,
        volume_id: None,
        detach: false,
    })?;
    follow_warm(client, &mountpoint.display().to_string(), json)
}

/// `reservoir warm --volume ID [PATHS]`: paths inside a volume of the daemon at `socket`.
pub fn warm_volume(
    socket: &Path,
    volume: &str,
    paths: &[PathBuf],
    parallel: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let paths = paths
        .iter()
        .map(|p| {
            p.to_str()
                .map(str::to_string)
                .with_context(|| format!("{} is not valid UTF-8", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut client = ControlClient::connect_to(socket)?;
    client.send(&ControlRequest::Warm {
        paths,
        parallel,
        volume_id: Some(volume.to_string()),
        detach: false,
    })?;
    follow_warm(client, &format!("volume {volume}"), json)
}

/// Shows a preload's progress until it is done, then its account.
fn follow_warm(mut client: ControlClient, what: &str, json: bool) -> anyhow::Result<ExitCode> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let started = Instant::now();
    let mut last_line = Instant::now();
    let done = loop {
        match client.receive()? {
            Response::Progress(p) => match &bar {
                Some(bar) => {
                    bar.set_length(p.bytes_total.max(1));
                    bar.set_position(p.bytes_loaded + p.bytes_cached);
                    bar.set_message(format!(
                        "{}/{} files{}",
                        p.files_done(),
                        p.files_total,
                        if p.scanning { "+" } else { "" }
                    ));
                }
                None if last_line.elapsed() >= PLAIN_PROGRESS_EVERY => {
                    last_line = Instant::now();
                    eprintln!("warm: {}", progress_line(&p, started.elapsed()));
                }
                None => {}
            },
            Response::Done(p) => break p,
            other => bail!("unexpected answer from the mount: {other:?}"),
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        print!("{}", render_account(what, &done));
    }
    Ok(if done.files_failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn rate(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return "-".into();
    }
    format!("{}/s", human_bytes((bytes as f64 / secs) as u64))
}

fn progress_line(p: &Progress, elapsed: Duration) -> String {
    let done_bytes = p.bytes_loaded + p.bytes_cached;
    let eta = if p.scanning || p.bytes_loaded == 0 {
        "-".to_string()
    } else {
        let per_byte = elapsed.as_secs_f64() / p.bytes_loaded as f64;
        format!(
            "{:.0}s",
            per_byte * p.bytes_total.saturating_sub(done_bytes) as f64
        )
    };
    format!(
        "{}/{} files, {}/{}, {}, ETA {eta}",
        p.files_done(),
        p.files_total,
        human_bytes(done_bytes),
        human_bytes(p.bytes_total),
        rate(p.bytes_loaded, elapsed)
    )
}

fn render_account(what: &str, p: &Progress) -> String {
    let elapsed = Duration::from_millis(p.elapsed_ms);
    let mut out = format!("warmed {what} in {:.1}s\n", elapsed.as_secs_f64());
    out.push_str(&format!(
        "  loaded:          {} files, {} ({})\n",
        p.files_loaded,
        human_bytes(p.bytes_loaded),
        rate(p.bytes_loaded, elapsed)
    ));
    out.push_str(&format!(
        "  already cached:  {} files, {}\n",
        p.files_cached,
        human_bytes(p.bytes_cached)
    ));
    out.push_str(&format!("  failed:          {} files\n", p.files_failed));
    for (path, reason) in &p.failures {
        out.push_str(&format!("    {path}: {reason}\n"));
    }
    if p.files_failed as usize > p.failures.len() {
        out.push_str(&format!(
            "    ... and {} more\n",
            p.files_failed as usize - p.failures.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_relative_to_the_mount() {
        let paths = [
            PathBuf::from("/mnt/data/a/b"),
            PathBuf::from("/mnt/data/./c/../d"),
            PathBuf::from("/mnt/data"),
        ];
        assert_eq!(
            relative_paths(Path::new("/mnt/data"), &paths).unwrap(),
            ["a/b", "d", ""]
        );
        assert!(relative_paths(Path::new("/mnt/data"), &[PathBuf::from("/mnt/other")]).is_err());
    }
}
