//! The round-trip floor measured in process: a minimal blocking client sends the exact acquire
//! command and release script to one server and reads each reply before sending the next, as
//! `redis-benchmark -c 1` does, but blocking in `read` instead of an event loop (two system calls
//! a request where `redis-benchmark` makes nine). Run in short chunks alternating with the
//! clients under test, it sees the machine at the same moments they do; it is the stricter
//! reference printed beside the `redis-benchmark` limit.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// One connection that writes a command whole and reads its reply whole, nothing else.
pub(crate) struct MinimalClient {
    connection: BufReader<TcpStream>,
    acquire: Vec<u8>,
    release: Vec<u8>,
    reply: Vec<u8>,
}

/// A command's words; `Script(source)` is sent as `EVALSHA <digest of source>`, loaded first.
pub(crate) enum Word<'a> {
    Plain(&'a str),
    Script(&'a str),
}

impl MinimalClient {
    /// Connects to the server on 127.0.0.1:`port` and prepares the two commands of a cycle.
    pub(crate) fn connect(
        port: u16,
        acquire: &[Word<'_>],
        release: &[Word<'_>],
    ) -> io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut client = Self {
            connection: BufReader::new(stream),
            acquire: Vec::new(),
            release: Vec::new(),
            reply: Vec::new(),
        };
        client.acquire = client.encode(acquire)?;
        client.release = client.encode(release)?;
        Ok(client)
    }

    /// The time `cycles` acquire + release cycles take.
    pub(crate) fn time_cycles(&mut self, cycles: u32) -> io::Result<Duration> {
        let started = Instant::now();
        for _ in 0..cycles {
            let acquire = std::mem::take(&mut self.acquire);
            let release = std::mem::take(&mut self.release);
            let result = self.call(&acquire).and_then(|()| self.call(&release));
            (self.acquire, self.release) = (acquire, release);
            result?;
        }
        Ok(started.elapsed())
    }

    fn encode(&mut self, words: &[Word<'_>]) -> io::Result<Vec<u8>> {
        let mut parts = Vec::new();
        for word in words {
            match word {
                Word::Plain(word) => parts.push((*word).to_owned()),
                Word::Script(source) => {
                    self.call(&resp(&["SCRIPT", "LOAD", source]))?;
                    parts.push("EVALSHA".to_owned());
                    parts.push(String::from_utf8_lossy(&self.reply).into_owned());
                }
            }
        }
        Ok(resp(&parts.iter().map(String::as_str).collect::<Vec<_>>()))
    }

    /// Sends `command` and reads one reply (status, integer, nil or bulk string) into `reply`.
    fn call(&mut self, command: &[u8]) -> io::Result<()> {
        self.connection.get_mut().write_all(command)?;
        self.reply.clear();
        self.connection.read_until(b'\n', &mut self.reply)?;
        let line = self
            .reply
            .strip_suffix(b"\r\n")
            .ok_or_else(|| invalid("a reply without CRLF"))?;
        match line.split_first() {
            Some((b'+' | b':', _)) => Ok(()),
            Some((b'$', length)) => {
                let length: i64 = std::str::from_utf8(length)
                    .ok()
                    .and_then(|length| length.parse().ok())
                    .ok_or_else(|| invalid("a bad bulk length"))?;
                self.reply.clear();
                if let Ok(length) = usize::try_from(length) {
                    self.reply.resize(length + 2, 0);
                    self.connection.read_exact(&mut self.reply)?;
                    self.reply.truncate(length);
                }
                Ok(())
            }
            Some((b'-', error)) => Err(invalid(&String::from_utf8_lossy(error))),
            _ => Err(invalid("an unexpected reply type")),
        }
    }
}

fn resp(words: &[&str]) -> Vec<u8> {
    let mut command = format!("*{}\r\n", words.len()).into_bytes();
    for word in words {
        command.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
        command.extend_from_slice(word.as_bytes());
        command.extend_from_slice(b"\r\n");
    }
    command
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("minimal client: {what}"),
    )
}
