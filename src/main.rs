//! The `reservoir` command.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use reservoir::cache::CacheConfig;
use reservoir::mount::{self, MountOptions};
use reservoir::source::{SourceOptions, SourceSpec};
use reservoir::units::{Size, Ttl, parse_duration};

#[derive(Parser)]
#[command(
    name = "reservoir",
    version,
    about = "A remote dataset (NFS or a directory) served through a persistent local cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount SOURCE at MOUNTPOINT through a cache, in the foreground until SIGINT/SIGTERM.
    Mount(MountArgs),
    /// Load trees of a mount into its cache (all of it by default).
    Warm(WarmArgs),
    /// Show a mount's source, cache use, hit ratio and any preload in progress.
    Status(StatusArgs),
    /// The node's cache daemon: one cache, one FUSE session per volume, a control socket.
    Daemon(DaemonArgs),
    /// Holds the daemon's FUSE descriptors so that volumes survive a daemon restart.
    Keeper(KeeperArgs),
    /// CSI Identity and Controller services on a unix socket (the cluster's provisioner).
    Controller(ControllerArgs),
    /// CSI Identity and Node services on a unix socket (one per node, beside its cache daemon).
    Node(NodeArgs),
    /// All three CSI services on one socket: single-host use and conformance runs.
    Csi(CsiArgs),
}

#[derive(Args)]
struct MountArgs {
    /// nfs://HOST[:PORT]/PATH[?nfsport=N&mountport=N], local:///PATH or a directory.
    #[arg(value_parser = parse_source)]
    source: SourceSpec,
    mountpoint: PathBuf,
    /// Cache directory, owned by this process alone (a host path on an SSD; not overlayfs).
    #[arg(long, default_value = "/var/cache/reservoir")]
    cache_dir: PathBuf,
    /// Most the cache directory may occupy, index and metadata included.
    #[arg(long, default_value = "50Gi")]
    cache_size: Size,
    /// Fraction of --cache-size at which eviction starts.
    #[arg(long, default_value_t = 0.95)]
    high_watermark: f64,
    /// Fraction of --cache-size at which eviction stops.
    #[arg(long, default_value_t = 0.85)]
    low_watermark: f64,
    /// Unit of fetching, caching and checksumming.
    #[arg(long, default_value = "1Mi")]
    block_size: Size,
    /// How long attributes and listings are trusted; `forever` for immutable datasets.
    #[arg(long, default_value = "60s")]
    metadata_ttl: Ttl,
    /// Names (files, directories) kept in memory beyond those the kernel holds; forgotten ones
    /// past this are asked of the source again when used.
    #[arg(long, default_value_t = reservoir::fs::DEFAULT_IDLE_NODES)]
    metadata_nodes: usize,
    /// Longest wait for any single call to the source.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    source_timeout: std::time::Duration,
    /// Connections to an NFS server (each carries one call at a time).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Threads serving FUSE requests (default: twice the CPUs, 4 to 16).
    #[arg(long)]
    threads: Option<usize>,
    /// Serve the source without a cache (the "direct" baseline).
    #[arg(long)]
    no_cache: bool,
    /// Serve cached files from the daemon instead of handing them to the kernel.
    #[arg(long)]
    no_passthrough: bool,
    /// Allow writes: they go through to the source (close-to-open consistency).
    #[arg(long)]
    read_write: bool,
    /// Control socket path (default: derived from the mount point, under /run/reservoir).
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

#[derive(Args)]
struct WarmArgs {
    /// The mount (without --volume).
    #[arg(required_unless_present = "volume")]
    mountpoint: Option<PathBuf>,
    /// Files or directories inside the mount (absolute, or relative to the current directory);
    /// with --volume, paths inside the volume (relative to its root).
    paths: Vec<PathBuf>,
    /// Warm a volume of the daemon at --socket; every positional argument is a path inside it.
    #[arg(long)]
    volume: Option<String>,
    /// The daemon's control socket (with --volume; else like --control-socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Files loaded at once.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Print the final account as JSON.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

#[derive(Args)]
struct StatusArgs {
    /// A mount point; without it, every volume of the daemon at --socket.
    mountpoint: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// A control socket: a daemon's (default /run/reservoir/daemon.sock) or a mount's.
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(Args)]
struct DaemonArgs {
    /// The node's cache directory, owned by this daemon alone (a host path on an SSD).
    #[arg(long, default_value = "/var/cache/reservoir")]
    cache_dir: PathBuf,
    /// Most the cache directory may occupy, all volumes together (each volume's cacheSize is
    /// a quota inside it).
    #[arg(long, default_value = "50Gi")]
    cache_size: Size,
    /// The control socket (mode 0600).
    #[arg(long, default_value = reservoir::daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Fraction of --cache-size at which node-wide eviction starts.
    #[arg(long, default_value_t = 0.95)]
    high_watermark: f64,
    /// Fraction of --cache-size at which node-wide eviction stops.
    #[arg(long, default_value_t = 0.85)]
    low_watermark: f64,
    /// Unit of fetching, caching and checksumming.
    #[arg(long, default_value = "1Mi")]
    block_size: Size,
    /// Threads serving FUSE requests, per volume (default: twice the CPUs, 4 to 16).
    #[arg(long)]
    threads: Option<usize>,
    /// Longest wait for any single call to a source.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    source_timeout: std::time::Duration,
    /// Connections to each NFS server (each carries one call at a time).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Where each volume's connection is described for a restarted daemon (a tmpfs that lives
    /// as long as the node's mounts, such as /run). Default: `sessions` beside --socket.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The descriptor keeper's socket. Default: `keeper.sock` beside --socket.
    #[arg(long)]
    keeper_socket: Option<PathBuf>,
    /// Start a keeper when none answers on --keeper-socket (in Kubernetes the keeper is its
    /// own DaemonSet: false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    spawn_keeper: bool,
    /// No keeper: every volume ends with this daemon (and SIGTERM unmounts them).
    #[arg(long, conflicts_with_all = ["keeper_socket"])]
    no_keeper: bool,
    /// Serve Prometheus metrics on /metrics and readiness on /ready at this address
    /// (e.g. 0.0.0.0:9810). Off by default.
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
}

#[derive(Args)]
struct KeeperArgs {
    /// Where to listen (mode 0600; only root or this user may connect).
    #[arg(long, default_value = reservoir::keeper::DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(Args)]
struct ControllerArgs {
    /// Where to serve: unix:///PATH, unix:/PATH or a socket path.
    #[arg(long, env = "CSI_ENDPOINT", default_value = reservoir::csi::server::DEFAULT_ENDPOINT)]
    endpoint: String,
    /// Directory for the controller's volume records (one controller per directory).
    #[arg(long, default_value = "/var/lib/reservoir/controller")]
    state_dir: PathBuf,
    /// CSI driver name: the `provisioner` of StorageClasses and `driver` of PersistentVolumes.
    #[arg(long, default_value = reservoir::csi::DEFAULT_DRIVER_NAME)]
    driver_name: String,
    /// Longest wait for an NFS server while CreateVolume checks a source.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    source_check_timeout: std::time::Duration,
}

#[derive(Args)]
struct NodeArgs {
    /// Where to serve: unix:///PATH, unix:/PATH or a socket path.
    #[arg(long, env = "CSI_ENDPOINT", default_value = reservoir::csi::server::DEFAULT_ENDPOINT)]
    endpoint: String,
    /// This node's name (in Kubernetes: spec.nodeName); also its topology segment.
    #[arg(long, env = "NODE_ID")]
    node_id: String,
    /// CSI driver name: the `provisioner` of StorageClasses and `driver` of PersistentVolumes.
    #[arg(long, default_value = reservoir::csi::DEFAULT_DRIVER_NAME)]
    driver_name: String,
    /// The node cache daemon's control socket.
    #[arg(long, default_value = reservoir::daemon::DEFAULT_SOCKET)]
    daemon_socket: PathBuf,
    /// Start a detached cache daemon when none answers on --daemon-socket. Turn it off where
    /// the daemon runs in its own container (the Kubernetes DaemonSet).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    spawn_daemon: bool,
    /// For a daemon this command starts: its cache directory (a host path on an SSD).
    #[arg(long, default_value = "/var/cache/reservoir")]
    cache_dir: PathBuf,
    /// For a daemon this command starts: the node-wide cache size.
    #[arg(long, default_value = "50Gi")]
    cache_size: Size,
    /// For a daemon this command starts: where its log goes (appended).
    #[arg(long, default_value = "/var/log/reservoir/daemon.log")]
    daemon_log: PathBuf,
    /// Sources inline (ephemeral) volumes may name: comma-separated prefixes such as
    /// nfs://filer/datasets,/mnt/shared. Empty: no inline volumes.
    #[arg(long, default_value = "")]
    allowed_sources: String,
    /// Register the driver with kubelet by serving its plugin registration service on a socket
    /// in this directory (/var/lib/kubelet/plugins_registry): no registrar sidecar needed.
    #[arg(long)]
    kubelet_registration_dir: Option<PathBuf>,
    /// The CSI socket's path as kubelet sees it on the node, when it differs from --endpoint's.
    #[arg(long, requires = "kubelet_registration_dir")]
    kubelet_registration_path: Option<PathBuf>,
    /// Serve /healthz (liveness: this process answers) and /ready (the node can serve volumes)
    /// over HTTP at this address (e.g. 0.0.0.0:9809). Off by default.
    #[arg(long)]
    health_address: Option<std::net::SocketAddr>,
    /// Kubelet's root directory, where it mounts pods' volumes (source pods' claims).
    #[arg(long, default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// Where source pods' records and mounts live; the daemon must see this path (it is under
    /// kubelet's directory, which both containers share). Default: KUBELET_DIR/plugins/DRIVER/sources.
    #[arg(long)]
    source_pods_dir: Option<PathBuf>,
    /// The image of source pods (which mount claims kubelet must mount, and only wait): a pause
    /// image, usually already on every node as the sandbox image.
    #[arg(long, default_value = reservoir::csi::source_pods::DEFAULT_IMAGE)]
    source_pod_image: String,
    /// Label this Node with the share of each volume it has cached
    /// (cache.reservoir.csi.dev/VOLUME=PERCENT), so that pods can prefer it. Needs the
    /// Kubernetes API and patch on nodes.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    locality_labels: bool,
}

#[derive(Args)]
struct CsiArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Directory for the controller's volume records (one controller per directory).
    #[arg(long, default_value = "/var/lib/reservoir/controller")]
    state_dir: PathBuf,
    /// Longest wait for an NFS server while CreateVolume checks a source.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    source_check_timeout: std::time::Duration,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line that says what is wrong, instead of clap's usage block.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("reservoir: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let default_level = match cli.command {
        Command::Mount(_)
        | Command::Controller(_)
        | Command::Daemon(_)
        | Command::Keeper(_)
        | Command::Node(_)
        | Command::Csi(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Mount(args) => mount_command(args),
        Command::Warm(args) => warm_command(args),
        Command::Status(args) => match &args.mountpoint {
            Some(mountpoint) => cli::status(
                mountpoint,
                args.json,
                args.socket.as_deref().or(args.control_socket.as_deref()),
            ),
            None => cli::status_socket(
                args.socket
                    .as_deref()
                    .or(args.control_socket.as_deref())
                    .unwrap_or(std::path::Path::new(reservoir::daemon::DEFAULT_SOCKET)),
                args.json,
            ),
        },
        Command::Daemon(args) => daemon_command(args),
        Command::Keeper(args) => keeper_command(args),
        Command::Controller(args) => {
            reservoir::csi::server::run_controller(reservoir::csi::server::ControllerConfig {
                endpoint: args.endpoint,
                state_dir: args.state_dir,
                driver_name: args.driver_name,
                options: reservoir::csi::controller::ControllerOptions {
                    source_check_timeout: args.source_check_timeout,
                },
            })
            .map(|()| ExitCode::SUCCESS)
        }
        Command::Node(args) => node_command(args, None),
        Command::Csi(args) => node_command(
            args.node,
            Some((
                args.state_dir,
                reservoir::csi::controller::ControllerOptions {
                    source_check_timeout: args.source_check_timeout,
                },
            )),
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("reservoir: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Source strings as in volume parameters, plus (on the command line only) a directory
/// relative to the current one.
fn parse_source(text: &str) -> Result<SourceSpec, String> {
    if !text.contains("://") && !text.starts_with('/') && !text.is_empty() {
        let absolute = std::path::absolute(text).map_err(|e| format!("{text}: {e}"))?;
        return absolute
            .to_str()
            .ok_or_else(|| format!("{text}: not valid UTF-8"))?
            .parse()
            .map_err(|e: reservoir::source::SpecError| e.to_string());
    }
    text.parse()
        .map_err(|e: reservoir::source::SpecError| e.to_string())
}

/// glibc gives each thread that allocates its own arena (up to 8 per CPU) and keeps freed
/// memory in them; for a daemon with many short-lived I/O threads that is tens of MiB of
/// resident memory for nothing (measured: 120 MiB -> 83 MiB for 100k cached files).
const MALLOC_ARENAS: i32 = 4;

fn mount_command(args: MountArgs) -> anyhow::Result<ExitCode> {
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread
    // exists, and a failure (0) leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
    let block_size = u32::try_from(args.block_size.0)
        .map_err(|_| anyhow::anyhow!("--block-size {} is too large", args.block_size))?;
    let cache = (!args.no_cache).then(|| CacheConfig {
        dir: std::path::absolute(&args.cache_dir).unwrap_or(args.cache_dir),
        capacity: args.cache_size.0,
        high_watermark: args.high_watermark,
        low_watermark: args.low_watermark,
        block_size,
    });
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let options = MountOptions {
        source: args.source,
        mountpoint: args.mountpoint,
        cache,
        metadata_ttl: args.metadata_ttl,
        metadata_nodes: args.metadata_nodes,
        source_options: SourceOptions {
            timeout: args.source_timeout,
            connections: args.connections.clamp(1, 256),
        },
        threads: args
            .threads
            .unwrap_or((cpus * 2).clamp(4, 16))
            .clamp(1, 256),
        passthrough: !args.no_passthrough,
        read_write: args.read_write,
        control_socket: args.control_socket,
    };
    mount::run(options)?;
    Ok(ExitCode::SUCCESS)
}

fn warm_command(args: WarmArgs) -> anyhow::Result<ExitCode> {
    match (args.volume, args.mountpoint) {
        (Some(volume), first) => {
            let socket = args
                .socket
                .or(args.control_socket)
                .unwrap_or_else(|| PathBuf::from(reservoir::daemon::DEFAULT_SOCKET));
            let paths: Vec<PathBuf> = first.into_iter().chain(args.paths).collect();
            cli::warm_volume(&socket, &volume, &paths, args.parallel, args.json)
        }
        (None, Some(mountpoint)) => cli::warm(
            &mountpoint,
            &args.paths,
            args.parallel,
            args.json,
            args.socket.as_deref().or(args.control_socket.as_deref()),
        ),
        (None, None) => anyhow::bail!("give a MOUNTPOINT, or --volume ID for a daemon's volume"),
    }
}

fn daemon_command(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    // SAFETY: as in mount_command: allocator tuning, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
    let block_size = u32::try_from(args.block_size.0)
        .map_err(|_| anyhow::anyhow!("--block-size {} is too large", args.block_size))?;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let socket = std::path::absolute(&args.socket).unwrap_or(args.socket);
    let beside_socket = |name: &str| socket.with_file_name(name);
    let state_dir = args.state_dir.unwrap_or_else(|| beside_socket("sessions"));
    let keeper = (!args.no_keeper).then(|| reservoir::daemon::KeeperOptions {
        socket: args
            .keeper_socket
            .clone()
            .unwrap_or_else(|| beside_socket("keeper.sock")),
        spawn: args.spawn_keeper,
    });
    if let Some(address) = args.metrics_address {
        reservoir::metrics::start_daemon_endpoint(address, socket.clone())?;
    }
    reservoir::daemon::run(reservoir::daemon::DaemonConfig {
        cache: CacheConfig {
            dir: std::path::absolute(&args.cache_dir).unwrap_or(args.cache_dir),
            capacity: args.cache_size.0,
            high_watermark: args.high_watermark,
            low_watermark: args.low_watermark,
            block_size,
        },
        socket,
        source_options: SourceOptions {
            timeout: args.source_timeout,
            connections: args.connections.clamp(1, 256),
        },
        threads: args
            .threads
            .unwrap_or((cpus * 2).clamp(4, 16))
            .clamp(1, 256),
        passthrough: true,
        state_dir: std::path::absolute(&state_dir).unwrap_or(state_dir),
        keeper,
    })?;
    Ok(ExitCode::SUCCESS)
}

fn keeper_command(args: KeeperArgs) -> anyhow::Result<ExitCode> {
    let socket = std::path::absolute(&args.socket).unwrap_or(args.socket);
    reservoir::keeper::run(&socket)?;
    Ok(ExitCode::SUCCESS)
}

fn node_command(
    args: NodeArgs,
    controller: Option<(PathBuf, reservoir::csi::controller::ControllerOptions)>,
) -> anyhow::Result<ExitCode> {
    use reservoir::csi::node::{AllowedSources, NodeOptions};
    use reservoir::csi::source_pods::SourcePodOptions;
    let allowed_sources =
        AllowedSources::parse(&args.allowed_sources).map_err(anyhow::Error::msg)?;
    let daemon_socket = std::path::absolute(&args.daemon_socket).unwrap_or(args.daemon_socket);
    let spawn = args.spawn_daemon.then(|| {
        let cache_dir = std::path::absolute(&args.cache_dir).unwrap_or(args.cache_dir);
        reservoir::daemon::SpawnOptions {
            program: None,
            args: vec![
                "daemon".into(),
                "--cache-dir".into(),
                cache_dir.into_os_string(),
                "--cache-size".into(),
                args.cache_size.to_string().into(),
                "--socket".into(),
                daemon_socket.clone().into_os_string(),
            ],
            log: std::path::absolute(&args.daemon_log).unwrap_or(args.daemon_log),
            wait: std::time::Duration::from_secs(30),
        }
    });
    let source_pods_dir = args.source_pods_dir.unwrap_or_else(|| {
        args.kubelet_dir
            .join("plugins")
            .join(&args.driver_name)
            .join("sources")
    });
    reservoir::csi::server::run_node(reservoir::csi::server::NodeConfig {
        endpoint: args.endpoint,
        driver_name: args.driver_name.clone(),
        node: NodeOptions {
            source_pods: SourcePodOptions {
                node: args.node_id.clone(),
                image: args.source_pod_image,
                dir: source_pods_dir,
                kubelet_dir: args.kubelet_dir,
            },
            node_id: args.node_id,
            daemon_socket,
            spawn,
            allowed_sources,
            locality_labels: args.locality_labels,
            driver_name: args.driver_name,
        },
        controller,
        registration: args.kubelet_registration_dir.map(|dir| {
            reservoir::csi::server::KubeletRegistration {
                dir,
                kubelet_endpoint: args.kubelet_registration_path,
            }
        }),
        health_address: args.health_address,
    })?;
    Ok(ExitCode::SUCCESS)
}
