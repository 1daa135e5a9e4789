//! `reservoir status` and `reservoir warm`: clients of a mount's control socket.

use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};

use reservoir::control::{Client, MountStatus, Request, Response};
use reservoir::fs::warm::Progress;
use reservoir::units::human_bytes;

/// How often progress lines are printed when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub fn status(mountpoint: &Path, json: bool, socket: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(mountpoint, socket)?;
    client.send(&Request::Status)?;
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
        format!("TTL {}, {} names known", v.metadata_ttl, v.nodes_known),
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
            "{} for readers, {} by preloads, {} source errors",
            human_bytes(v.bytes_fetched),
            human_bytes(v.bytes_preloaded),
            v.source_errors
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
    let mut client = Client::connect(mountpoint, socket)?;
    client.send(&Request::Warm { paths, parallel })?;

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
        print!("{}", render_account(mountpoint, &done));
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

fn render_account(mountpoint: &Path, p: &Progress) -> String {
    let elapsed = Duration::from_millis(p.elapsed_ms);
    let mut out = format!(
        "warmed {} in {:.1}s\n",
        mountpoint.display(),
        elapsed.as_secs_f64()
    );
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
