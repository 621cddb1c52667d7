//! A slow link in front of a server, for the fair hand-offs measured over a network: a TCP
//! proxy on a thread (and tokio runtime) of its own that holds every chunk it reads for a
//! fixed delay before passing it on, in each direction, chunks pipelined as on a real link (a
//! chunk read while another is held is held for its own delay, not after the other's). tokio's
//! timer ticks in whole ms: a delay of 1 ms holds a chunk 1 to 2 ms, which the round trip
//! measured through the link counts.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The proxy; stops (and closes its connections) when dropped.
pub(crate) struct SlowLink {
    port: u16,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SlowLink {
    /// A link of `delay` each way to `127.0.0.1:target`.
    pub(crate) fn start(target: u16, delay: Duration) -> io::Result<Self> {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = port_tx.send(Err(error));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match TcpListener::bind("127.0.0.1:0").await {
                    Ok(listener) => listener,
                    Err(error) => {
                        let _ = port_tx.send(Err(error));
                        return;
                    }
                };
                let _ = port_tx.send(listener.local_addr().map(|address| address.port()));
                let accepting = async {
                    while let Ok((client, _)) = listener.accept().await {
                        tokio::spawn(forward(
                            client,
                            SocketAddr::from(([127, 0, 0, 1], target)),
                            delay,
                        ));
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    () = accepting => {}
                }
            });
        });
        let port = port_rx
            .recv()
            .map_err(|_| io::Error::other("the link's thread ended before it listened"))??;
        Ok(Self {
            port,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The URL to connect to instead of the server's.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn forward(client: TcpStream, target: SocketAddr, delay: Duration) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pass(client_read, server_write, delay),
        pass(server_read, client_write, delay),
    );
}

/// Reads chunks from `from` and writes each to `to` `delay` after it was read.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (held, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reading = async move {
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(read @ 1..) = from.read(&mut buffer).await {
            if held
                .send((Instant::now() + delay, buffer[..read].to_vec()))
                .is_err()
            {
                break;
            }
        }
    };
    let writing = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reading, writing);
}
