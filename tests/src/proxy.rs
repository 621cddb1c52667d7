//! A small TCP proxy on loopback that adds latency to, black-holes or cuts the traffic of one
//! server — the fault tool for slow, silent and unreachable nodes (no toxiproxy or netem here).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Delay value that means "never forward anything".
const BLACK_HOLE: u64 = u64::MAX;

/// Delay value that means "drop every connection and what it carries".
const CUT: u64 = u64::MAX - 1;

/// A proxy in front of `127.0.0.1:<target>`; stops when dropped.
#[derive(Debug)]
pub struct LatencyProxy {
    port: u16,
    delay_ms: Arc<AtomicU64>,
    /// Connections numbered below this hold what they carry (see [`LatencyProxy::stall_existing`]).
    stall_below: Arc<AtomicU64>,
    /// How many connections were accepted so far.
    accepted: Arc<AtomicU64>,
    /// Requests (whole commands towards the server) forwarded so far, and the first one a
    /// stall holds.
    chunks: Arc<[AtomicU64; 2]>,
    /// Bytes that, in a command towards the server, drop that command and its connection, once (see
    /// [`LatencyProxy::drop_next`]).
    drop_on: Arc<Mutex<Option<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl LatencyProxy {
    /// Starts a proxy to `127.0.0.1:target` that forwards at once.
    ///
    /// # Errors
    /// When no loopback port can be bound.
    pub async fn start(target: u16) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let stall_below = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let chunks = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let drop_on = Arc::new(Mutex::new(None));
        let (delay, stall, count, counted, dropping) = (
            Arc::clone(&delay_ms),
            Arc::clone(&stall_below),
            Arc::clone(&accepted),
            Arc::clone(&chunks),
            Arc::clone(&drop_on),
        );
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if delay.load(Ordering::SeqCst) == CUT {
                    continue;
                }
                let number = count.fetch_add(1, Ordering::SeqCst);
                let (delay, stall, counted, dropping) = (
                    Arc::clone(&delay),
                    Arc::clone(&stall),
                    Arc::clone(&counted),
                    Arc::clone(&dropping),
                );
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let to_server = Link {
                        delay: Arc::clone(&delay),
                        stall: Arc::clone(&stall),
                        number,
                        chunks: Some(counted),
                        drop_on: Some(dropping),
                    };
                    let to_client = Link {
                        delay,
                        stall,
                        number,
                        chunks: None,
                        drop_on: None,
                    };
                    tokio::join!(
                        pump(client_read, server_write, to_server),
                        pump(server_read, client_write, to_client),
                    );
                });
            }
        });
        Ok(Self {
            port,
            delay_ms,
            stall_below,
            accepted,
            chunks,
            drop_on,
            task,
        })
    }

    /// The port to connect to instead of the server's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<proxy port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Delays every chunk by `delay` in each direction.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis())
            .unwrap_or(u64::MAX)
            .min(CUT - 1);
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Accepts connections and bytes but forwards nothing until the delay is set again.
    pub fn black_hole(&self) {
        self.delay_ms.store(BLACK_HOLE, Ordering::SeqCst);
    }

    /// Holds what the connections open now carry towards the server, once `pass` more
    /// requests (whole commands, however the proxy reads them) have gone through, until [`LatencyProxy::release_stall`]; connections
    /// opened later pass at once. (A request on one connection of a pool stays in flight while
    /// the pool's other connections work.)
    pub fn stall_existing(&self, pass: u64) {
        let [forwarded, first_held] = &*self.chunks;
        first_held.store(forwarded.load(Ordering::SeqCst) + pass, Ordering::SeqCst);
        self.stall_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Lets the stalled connections deliver what they held, in order.
    pub fn release_stall(&self) {
        self.stall_below.store(0, Ordering::SeqCst);
    }

    /// Drops the next command towards the server that contains `marker`, with its connection (the
    /// server never sees it, the client sees the connection close): one request that fails on
    /// its way, e.g. exactly one compare-and-delete of one key. Once; replaces an earlier marker.
    pub fn drop_next(&self, marker: Vec<u8>) {
        *self.drop_on.lock().unwrap_or_else(PoisonError::into_inner) = Some(marker);
    }

    /// Whether the marker of [`LatencyProxy::drop_next`] is still waiting for its command.
    pub fn armed(&self) -> bool {
        self.drop_on
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Whether the marker of [`LatencyProxy::drop_next`] met its command within `limit` (a
    /// request the client sent may still wait to be read by a busy proxy); clears it if not.
    pub async fn dropped_within(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.armed() {
            if tokio::time::Instant::now() >= deadline {
                return !self.disarm();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Whether the marker of [`LatencyProxy::drop_next`] is still waiting for its command;
    /// clears it.
    pub fn disarm(&self) -> bool {
        self.drop_on
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .is_some()
    }

    /// Closes every connection at its next byte and refuses new ones, discarding what they
    /// carry (a node unreachable without losing its data), until the delay is set again.
    pub fn cut(&self) {
        self.delay_ms.store(CUT, Ordering::SeqCst);
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one direction of a connection obeys.
struct Link {
    delay: Arc<AtomicU64>,
    stall: Arc<AtomicU64>,
    number: u64,
    /// Towards the server: the proxy's count of forwarded commands and the first one a stall
    /// holds.
    chunks: Option<Arc<[AtomicU64; 2]>>,
    /// Towards the server: the marker of [`LatencyProxy::drop_next`].
    drop_on: Option<Arc<Mutex<Option<Vec<u8>>>>>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Link,
) {
    let Link {
        delay,
        stall,
        number,
        chunks,
        drop_on,
    } = link;
    let towards_server = chunks.is_some();
    let mut buffer = vec![0u8; 16 * 1024];
    // Towards the server: the bytes of a command not yet read in full.
    let mut partial = Vec::new();
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        // Towards the server, what was read is cut into whole commands, each one request: two
        // commands the proxy reads at once (it was slow to read the first) count twice, as
        // they would on a server.
        let units = if towards_server {
            partial.extend_from_slice(&buffer[..read]);
            split_commands(&mut partial)
        } else {
            vec![buffer[..read].to_vec()]
        };
        // The commands that pass, written together once the delay is over.
        let mut batch = Vec::new();
        for unit in units {
            let hit = drop_on.as_ref().is_some_and(|drop_on| {
                let mut marker = drop_on.lock().unwrap_or_else(PoisonError::into_inner);
                let hit = marker.as_deref().is_some_and(|marker| {
                    !marker.is_empty() && unit.windows(marker.len()).any(|w| w == marker)
                });
                if hit {
                    *marker = None;
                }
                hit
            });
            if hit {
                // What came before it still goes through; it and its connection do not.
                let _ = flush(&mut to, &batch, &delay).await;
                return;
            }
            if let Some(chunks) = &chunks {
                let [forwarded, first_held] = &**chunks;
                let request = forwarded.fetch_add(1, Ordering::SeqCst);
                let held = || {
                    number < stall.load(Ordering::SeqCst)
                        && request >= first_held.load(Ordering::SeqCst)
                };
                if held() {
                    // The requests before it go through; it waits.
                    if !flush(&mut to, &batch, &delay).await {
                        return;
                    }
                    batch.clear();
                    while held() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            batch.extend_from_slice(&unit);
        }
        if !flush(&mut to, &batch, &delay).await {
            return;
        }
    }
}

/// Writes `batch` once the delay is over; `false` when the connection is cut (or gone): what
/// it carries is lost with it.
async fn flush(to: &mut tokio::net::tcp::OwnedWriteHalf, batch: &[u8], delay: &AtomicU64) -> bool {
    if batch.is_empty() {
        return true;
    }
    loop {
        match delay.load(Ordering::SeqCst) {
            0 => break,
            CUT => return false,
            BLACK_HOLE => tokio::time::sleep(Duration::from_millis(10)).await,
            ms => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                // Cut while this chunk was held back: it is lost with the connection.
                if delay.load(Ordering::SeqCst) == CUT {
                    return false;
                }
                break;
            }
        }
    }
    to.write_all(batch).await.is_ok()
}

/// Takes the whole commands (RESP arrays of bulk strings, as clients send them) from the front
/// of `bytes`, leaving a command not yet read in full. Bytes that are not such a command are
/// taken as they are, as one unit (the proxy never holds back what it cannot read).
fn split_commands(bytes: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut units = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        match command_len(&bytes[start..]) {
            Some(Ok(len)) => {
                units.push(bytes[start..start + len].to_vec());
                start += len;
            }
            // Not read in full yet.
            None => break,
            Some(Err(())) => {
                units.push(bytes[start..].to_vec());
                start = bytes.len();
            }
        }
    }
    bytes.drain(..start);
    units
}

/// The longest bulk string a server takes (Redis's `proto-max-bulk-len` at most): a longer
/// one is answered with a protocol error at once, not waited for.
const MAX_BULK: usize = 512 * 1024 * 1024;

/// The length of the command at the front of `bytes`: `None` while incomplete, `Err` when it
/// is not an array of bulk strings (or one no server takes).
fn command_len(bytes: &[u8]) -> Option<Result<usize, ()>> {
    /// The number after `prefix` on the line starting at `at`, and where the next line starts.
    fn header(bytes: &[u8], at: usize, prefix: u8) -> Option<Result<(usize, usize), ()>> {
        let line = bytes.get(at..)?;
        if *line.first()? != prefix {
            return Some(Err(()));
        }
        let end = line.windows(2).position(|pair| pair == b"\r\n")?;
        let number = (line.first() == Some(&prefix))
            .then(|| {
                std::str::from_utf8(&line[1..end])
                    .ok()?
                    .parse::<usize>()
                    .ok()
            })
            .flatten();
        Some(number.map(|number| (number, at + end + 2)).ok_or(()))
    }
    let (count, mut at) = match header(bytes, 0, b'*')? {
        Ok(found) => found,
        Err(()) => return Some(Err(())),
    };
    for _ in 0..count {
        let (len, data) = match header(bytes, at, b'$')? {
            Ok(found) => found,
            Err(()) => return Some(Err(())),
        };
        if len > MAX_BULK {
            return Some(Err(()));
        }
        at = data + len + 2;
        if bytes.len() < at {
            return None;
        }
    }
    Some(Ok(at))
}

#[cfg(test)]
mod tests {
    use super::split_commands;

    #[test]
    fn commands_read_together_are_told_apart_and_a_partial_one_waits() {
        let mut bytes =
            b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*2\r\n$3\r\nGE".to_vec();
        let units = split_commands(&mut bytes);
        assert_eq!(
            units,
            vec![
                b"*1\r\n$4\r\nPING\r\n".to_vec(),
                b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec()
            ]
        );
        assert_eq!(bytes, b"*2\r\n$3\r\nGE");
        bytes.extend_from_slice(b"T\r\n$1\r\nk\r\n");
        assert_eq!(split_commands(&mut bytes).len(), 1);
        assert!(bytes.is_empty());
    }

    /// A command as clients send it: an array of bulk strings (any bytes, `\r\n` and
    /// `*`/`$` inside included).
    fn encode(command: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = format!("*{}\r\n", command.len()).into_bytes();
        for arg in command {
            bytes.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            bytes.extend_from_slice(arg);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes
    }

    /// Feeds `reads` one after the other as the proxy does: the units it forwards, and what
    /// it still holds.
    fn feed(reads: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut partial = Vec::new();
        let mut units = Vec::new();
        for read in reads {
            partial.extend_from_slice(read);
            units.extend(split_commands(&mut partial));
        }
        (units, partial)
    }

    #[test]
    fn a_pipeline_split_at_every_byte_boundary_comes_out_whole_and_in_order() {
        let commands = vec![
            encode(&[b"PING".to_vec()]),
            encode(&[
                b"SET".to_vec(),
                b"k\r\n*1\r\n$4".to_vec(),
                vec![0, 255, b'\r'],
            ]),
            encode(&[]),
            encode(&[b"GET".to_vec(), Vec::new()]),
        ];
        let bytes = commands.concat();
        for cut in 0..=bytes.len() {
            for second in cut..=bytes.len() {
                let (units, left) = feed(&[&bytes[..cut], &bytes[cut..second], &bytes[second..]]);
                assert_eq!(units, commands, "cut at {cut} and {second}");
                assert!(left.is_empty());
            }
        }
    }

    proptest::proptest! {
        /// Commands of any bytes (values past the proxy's 16 KiB reads among them), read in
        /// pieces of any sizes: the proxy forwards each command whole, in order, as sent,
        /// and holds nothing back once all is read.
        #[test]
        fn commands_read_in_any_pieces_come_out_whole_and_in_order(
            commands in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::prop_oneof![
                        proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
                        proptest::collection::vec(
                            proptest::sample::select(b"*$\r\n0123456789".to_vec()),
                            0..40,
                        ),
                        proptest::collection::vec(proptest::prelude::any::<u8>(), 16_000..40_000),
                    ],
                    0..4,
                ),
                1..6,
            ),
            cuts in proptest::collection::vec(0usize..100_000, 0..12),
        ) {
            let encoded: Vec<Vec<u8>> = commands.iter().map(|command| encode(command)).collect();
            let bytes = encoded.concat();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|cut| cut % (bytes.len() + 1)).collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let reads: Vec<&[u8]> = cuts.windows(2).map(|pair| &bytes[pair[0]..pair[1]]).collect();
            let (units, left) = feed(&reads);
            proptest::prop_assert!(left.is_empty());
            proptest::prop_assert_eq!(units, encoded);
        }

        /// Any bytes at all, read in any pieces: what the proxy forwards and what it holds add
        /// up to what was read, in order (nothing lost, doubled or reordered).
        #[test]
        fn any_bytes_pass_unchanged(
            bytes in proptest::collection::vec(
                proptest::sample::select(b"*$\r\n012-x".to_vec()),
                0..200,
            ),
            cuts in proptest::collection::vec(0usize..200, 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|cut| cut % (bytes.len() + 1)).collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let reads: Vec<&[u8]> = cuts.windows(2).map(|pair| &bytes[pair[0]..pair[1]]).collect();
            let (units, left) = feed(&reads);
            proptest::prop_assert!(units.iter().all(|unit| !unit.is_empty()));
            proptest::prop_assert_eq!([units.concat(), left].concat(), bytes);
        }
    }

    /// A bulk length no server takes (past Redis's 512 MiB, or past `usize` once its
    /// `\r\n` is added): the server answers a protocol error at once, so the proxy must pass
    /// the bytes on rather than wait for data that will never come.
    #[test]
    fn a_bulk_length_no_server_takes_passes_at_once() {
        for bytes in [
            b"*1\r\n$18446744073709551615\r\n".to_vec(),
            b"*1\r\n$99999999999\r\n".to_vec(),
        ] {
            let (units, left) = feed(&[&bytes]);
            assert_eq!(units, vec![bytes.clone()]);
            assert!(
                left.is_empty(),
                "{:?} held back",
                String::from_utf8_lossy(&left)
            );
        }
    }

    #[test]
    fn bytes_that_are_no_command_pass_as_they_are() {
        let mut bytes = b"\x16\x03\x01 tls hello".to_vec();
        assert_eq!(
            split_commands(&mut bytes),
            vec![b"\x16\x03\x01 tls hello".to_vec()]
        );
        assert!(bytes.is_empty());
    }
}
