//! A TCP proxy that adds a fixed one-way delay in each direction, for emulating a remote link
//! in benchmarks (the kernel's `netem` qdisc is not available on the machines we measure on).
//!
//! ```text
//! delayproxy proxy --delay-us 1000 --map 127.0.0.1:111=198.19.255.1:111 --map ...
//! delayproxy rpc-ping 127.0.0.1:111 [--count N]   # round trips of a portmapper NULL call
//! ```
//!
//! Each direction of each connection has a reader thread, which stamps every chunk it reads
//! with the time it arrived, and a writer thread, which sleeps until that time plus the delay
//! and then sends the chunk on. Splitting the two keeps the pipe full: the reader goes on
//! reading while earlier chunks wait, so the delay adds latency without capping throughput
//! at one chunk per delay. The sleeping is done with `std::thread::sleep` (high-resolution
//! timers); async runtimes round timers to a millisecond, which doubles a 1 ms delay.
//!
//! A bounded queue between reader and writer gives back-pressure: once it holds
//! `QUEUE_CHUNKS` chunks the reader stops reading and TCP flow control slows the sender down,
//! as a real link's buffers would. An end of stream is delayed like data and forwarded as a
//! half-close, so request/response protocols see the same ordering as on a real link.
//!
//! The proxy prints one line per listener when it is ready (`listening ADDR -> UPSTREAM`), then
//! runs until killed.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

/// Largest chunk read at once from a socket.
const CHUNK: usize = 64 * 1024;
/// Chunks waiting in one direction of one connection: 16 MiB at most, far above the
/// bandwidth-delay product of a 1 Gbit/s link with a few milliseconds of delay.
const QUEUE_CHUNKS: usize = 256;

#[derive(Parser)]
#[command(
    name = "delayproxy",
    about = "TCP proxy adding a fixed delay each way, for benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Forward every `--map LISTEN=UPSTREAM` pair, delaying each direction by `--delay-us`.
    Proxy {
        /// One-way delay in microseconds (0: plain pass-through, to measure the proxy itself).
        #[arg(long, default_value_t = 1000)]
        delay_us: u64,
        /// `LISTEN_ADDR:PORT=UPSTREAM_ADDR:PORT`; repeat for every port a client uses.
        #[arg(long = "map", required = true, value_parser = parse_map)]
        maps: Vec<(SocketAddr, SocketAddr)>,
    },
    /// Time round trips of an ONC RPC NULL call to a portmapper (program 100000, version 2)
    /// over one TCP connection; prints `{"count":N,"median_us":M,"min_us":m,"p90_us":p}`.
    RpcPing {
        addr: SocketAddr,
        #[arg(long, default_value_t = 500)]
        count: u32,
    },
}

fn parse_map(text: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (listen, upstream) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected LISTEN_ADDR:PORT=UPSTREAM_ADDR:PORT"))?;
    let listen = listen
        .parse()
        .map_err(|e| format!("`{listen}`: {e} (expected ADDR:PORT)"))?;
    let upstream = upstream
        .parse()
        .map_err(|e| format!("`{upstream}`: {e} (expected ADDR:PORT)"))?;
    Ok((listen, upstream))
}

/// What travels from a direction's reader to its writer.
enum Piece {
    /// Bytes read at `arrived`.
    Data { bytes: Vec<u8>, arrived: Instant },
    /// The sender half-closed its side at `arrived`.
    End { arrived: Instant },
    /// Reading failed: tear the connection down (without waiting for the delay).
    Failed,
}

/// Reads from `from` until end of stream or error, queueing what it read with its arrival time.
fn read_side(mut from: TcpStream, queue: SyncSender<Piece>) {
    loop {
        let mut bytes = vec![0u8; CHUNK];
        match from.read(&mut bytes) {
            Ok(0) => {
                let _ = queue.send(Piece::End {
                    arrived: Instant::now(),
                });
                return;
            }
            Ok(n) => {
                let arrived = Instant::now();
                bytes.truncate(n);
                if queue.send(Piece::Data { bytes, arrived }).is_err() {
                    return; // the writer gave up: the connection is gone
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                let _ = queue.send(Piece::Failed);
                return;
            }
        }
    }
}

/// Sleeps until `deadline` (no-op if it has passed).
fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        thread::sleep(deadline - now);
    }
}

/// Writes each queued piece to `to` once its delay has passed.
fn write_side(mut to: TcpStream, queue: Receiver<Piece>, delay: Duration) {
    for piece in queue {
        match piece {
            Piece::Data { bytes, arrived } => {
                sleep_until(arrived + delay);
                if to.write_all(&bytes).is_err() {
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
            Piece::End { arrived } => {
                sleep_until(arrived + delay);
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Piece::Failed => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// Starts the reader and writer of one direction, `from` -> `to`.
fn forward(from: &TcpStream, to: &TcpStream, delay: Duration) -> std::io::Result<()> {
    let (sender, receiver) = sync_channel(QUEUE_CHUNKS);
    let reader = from.try_clone()?;
    let writer = to.try_clone()?;
    thread::Builder::new()
        .name("delay-read".into())
        .stack_size(64 * 1024)
        .spawn(move || read_side(reader, sender))?;
    thread::Builder::new()
        .name("delay-write".into())
        .stack_size(64 * 1024)
        .spawn(move || write_side(writer, receiver, delay))?;
    Ok(())
}

/// Connects a newly accepted client to `upstream` and starts both directions.
fn serve(client: TcpStream, upstream: SocketAddr, delay: Duration) {
    let server = match TcpStream::connect(upstream) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("delayproxy: cannot connect to {upstream}: {e}");
            return; // dropping the client closes it: the client sees a reset, as it would
        }
    };
    // Small RPCs must not wait for Nagle's algorithm: the only delay is ours.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    if let Err(e) = forward(&client, &server, delay).and_then(|()| forward(&server, &client, delay))
    {
        eprintln!("delayproxy: cannot start forwarding threads: {e}");
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    }
}

fn proxy(delay: Duration, maps: Vec<(SocketAddr, SocketAddr)>) -> ExitCode {
    let mut listeners = Vec::new();
    for (listen, upstream) in maps {
        match TcpListener::bind(listen) {
            Ok(listener) => listeners.push((listener, upstream)),
            Err(e) => {
                eprintln!("delayproxy: cannot listen on {listen}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let mut accepting = Vec::new();
    for (listener, upstream) in listeners {
        if let Ok(addr) = listener.local_addr() {
            println!("listening {addr} -> {upstream}");
        }
        accepting.push(thread::spawn(move || {
            for client in listener.incoming() {
                match client {
                    Ok(client) => serve(client, upstream, delay),
                    Err(e) => eprintln!("delayproxy: accept: {e}"),
                }
            }
        }));
    }
    for thread in accepting {
        let _ = thread.join();
    }
    ExitCode::SUCCESS
}

/// An ONC RPC call of procedure 0 (NULL) of the portmapper, version 2, with AUTH_NONE, framed
/// with the record mark used over TCP (last fragment bit set, length 40).
fn null_call(xid: u32) -> Vec<u8> {
    let words: [u32; 11] = [
        0x8000_0000 | 40, // record mark
        xid,
        0,       // CALL
        2,       // RPC version
        100_000, // portmapper
        2,       // its version
        0,       // NULL
        0,       // credentials: AUTH_NONE
        0,       // of length 0
        0,       // verifier: AUTH_NONE
        0,       // of length 0
    ];
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

/// Reads one whole RPC record (possibly several fragments) and returns its xid.
fn read_reply(stream: &mut TcpStream) -> std::io::Result<u32> {
    let mut body = Vec::new();
    loop {
        let mut mark = [0u8; 4];
        stream.read_exact(&mut mark)?;
        let mark = u32::from_be_bytes(mark);
        let mut fragment = vec![0u8; (mark & 0x7fff_ffff) as usize];
        stream.read_exact(&mut fragment)?;
        body.extend_from_slice(&fragment);
        if mark & 0x8000_0000 != 0 {
            break;
        }
    }
    let xid = body
        .get(..4)
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, "short RPC reply"))?;
    Ok(u32::from_be_bytes([xid[0], xid[1], xid[2], xid[3]]))
}

fn rpc_ping(addr: SocketAddr, count: u32) -> ExitCode {
    let mut stream = match TcpStream::connect(addr) {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!("delayproxy: cannot connect to {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    let _ = stream.set_nodelay(true);
    let mut micros = Vec::with_capacity(count as usize);
    for xid in 1..=count.max(1) {
        let started = Instant::now();
        let answered = stream
            .write_all(&null_call(xid))
            .and_then(|()| read_reply(&mut stream));
        match answered {
            Ok(got) if got == xid => micros.push(started.elapsed().as_secs_f64() * 1e6),
            Ok(got) => {
                eprintln!("delayproxy: reply for xid {got}, expected {xid}");
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("delayproxy: NULL call to {addr}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
    println!(
        "{{\"count\":{},\"median_us\":{:.1},\"min_us\":{:.1},\"p90_us\":{:.1}}}",
        micros.len(),
        at(0.5),
        micros[0],
        at(0.9)
    );
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Proxy { delay_us, maps } => proxy(Duration::from_micros(delay_us), maps),
        Command::RpcPing { addr, count } => rpc_ping(addr, count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_parse_and_reject_garbage() {
        let (listen, upstream) = parse_map("127.0.0.1:111=198.19.0.1:111").unwrap();
        assert_eq!(listen.port(), 111);
        assert_eq!(upstream.to_string(), "198.19.0.1:111");
        assert!(parse_map("127.0.0.1:111").is_err());
        assert!(parse_map("localhost:1=127.0.0.1:2").is_err());
    }

    #[test]
    fn a_null_call_is_a_single_40_byte_record() {
        let call = null_call(7);
        assert_eq!(call.len(), 44);
        assert_eq!(&call[..4], &(0x8000_0000u32 | 40).to_be_bytes());
        assert_eq!(&call[4..8], &7u32.to_be_bytes());
    }

    #[test]
    fn the_delay_is_added_once_each_way() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        thread::spawn(move || {
            let (mut stream, _) = echo.accept().unwrap();
            let mut byte = [0u8; 1];
            while stream.read_exact(&mut byte).is_ok() {
                stream.write_all(&byte).unwrap();
            }
        });
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        let delay = Duration::from_millis(50);
        thread::spawn(move || {
            let (client, _) = front.accept().unwrap();
            serve(client, echo_addr, delay);
        });
        let mut client = TcpStream::connect(front_addr).unwrap();
        client.set_nodelay(true).unwrap();
        let mut byte = [0u8; 1];
        // The first round trip also pays for the upstream connect; time the second.
        client.write_all(b"a").unwrap();
        client.read_exact(&mut byte).unwrap();
        let started = Instant::now();
        client.write_all(b"b").unwrap();
        client.read_exact(&mut byte).unwrap();
        let round_trip = started.elapsed();
        assert_eq!(&byte, b"b");
        assert!(round_trip >= delay * 2, "{round_trip:?}");
        // Loose enough for a loaded machine, tight enough to catch a delay paid twice.
        assert!(round_trip < delay * 3, "{round_trip:?}");
    }
}
