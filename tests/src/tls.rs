//! A redis-server with TLS for tests: a CA and a leaf certificate with an IP SAN for 127.0.0.1,
//! made with `openssl` at test time.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::server::{RedisServer, free_port};

/// A TLS redis-server, the port it serves TLS on, and the CA file that signed its certificate.
#[derive(Debug)]
pub struct TlsServer {
    /// The server (its plaintext port stays open for the harness's readiness checks).
    pub server: RedisServer,
    /// The TLS port.
    pub tls_port: u16,
    /// The PEM file of the CA.
    pub ca_file: PathBuf,
    _certificates: tempfile::TempDir,
}

impl TlsServer {
    /// Makes the certificates and starts the server.
    ///
    /// # Errors
    /// When `openssl` is missing or fails, or the server does not start.
    pub fn start(binary: &Path) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        make_certificates(dir.path())?;
        let tls_port = free_port()?;
        let file = |name: &str| dir.path().join(name).display().to_string();
        let (cert, key, ca) = (file("server.crt"), file("server.key"), file("ca.crt"));
        let port = tls_port.to_string();
        let server = RedisServer::start(
            binary,
            &[
                "--tls-port",
                &port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ],
        )?;
        Ok(Self {
            server,
            tls_port,
            ca_file: dir.path().join("ca.crt"),
            _certificates: dir,
        })
    }

    /// `<scheme>://127.0.0.1:<tls port>/`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}/", self.tls_port)
    }
}

fn openssl(dir: &Path, args: &[&str]) -> io::Result<()> {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| io::Error::new(e.kind(), format!("openssl is needed for TLS tests: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "openssl {args:?} failed: {status}"
        )))
    }
}

fn make_certificates(dir: &Path) -> io::Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=lock-tests-ca",
        ],
    )?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    )?;
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    )
}
