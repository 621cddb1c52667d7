//! Wall-clock faults: a redis-server whose wall clock a test can jump (the `walljump` shim,
//! built here from `tests/walljump/walljump.c`), and libfaketime for client processes.
//!
//! Redis expires keys by its wall clock, so a node whose clock jumps forward drops its locks
//! early; the library computes validity on the monotonic clock, so a client's wall clock must
//! not matter. libfaketime cannot fake redis-server's clock (it hangs in jemalloc), hence the
//! shim of our own.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::server::RedisServer;

/// The shim's source, compiled at test time with the system C compiler.
const SHIM_SOURCE: &str = include_str!("../walljump/walljump.c");

/// Where Debian's `faketime` package puts libfaketime.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A built walljump shim and the file holding its clock offset.
#[derive(Debug)]
pub struct WallJump {
    dir: tempfile::TempDir,
}

impl WallJump {
    /// Compiles the shim with `$CC` (default `cc`) into a temporary directory.
    ///
    /// # Errors
    /// When the compiler is missing or fails.
    pub fn build() -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let source = dir.path().join("walljump.c");
        std::fs::write(&source, SHIM_SOURCE)?;
        let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
        let output = Command::new(&compiler)
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(dir.path().join("walljump.so"))
            .arg(&source)
            .arg("-ldl")
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run {compiler}: {e}")))?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "{compiler} failed to build the walljump shim: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let shim = Self { dir };
        shim.jump(Duration::ZERO, false)?;
        Ok(shim)
    }

    /// Starts a redis-server whose wall clock follows this shim's offset.
    ///
    /// # Errors
    /// When the server does not start.
    pub fn start_server(&self, binary: &Path) -> io::Result<RedisServer> {
        let env = [
            ("LD_PRELOAD".to_owned(), path_string(&self.library())),
            ("WALLJUMP_FILE".to_owned(), path_string(&self.offset_file())),
        ];
        RedisServer::start_with_env(binary, &[], &env)
    }

    /// Sets the wall clock of every process under the shim to real time plus (or minus, when
    /// `backwards`) `by`, from their next clock reading on.
    ///
    /// # Errors
    /// When the offset file cannot be written.
    pub fn jump(&self, by: Duration, backwards: bool) -> io::Result<()> {
        let millis = i128::try_from(by.as_millis()).unwrap_or(i128::MAX);
        let millis = if backwards { -millis } else { millis };
        // Written beside it and renamed over it: the shim rereads the file on every clock
        // reading, and a file rewritten in place is empty for a moment (offset 0 to a reader,
        // a clock step nobody asked for: attack_s16a.rs).
        let staged = self.dir.path().join("offset-ms.next");
        std::fs::write(&staged, millis.to_string())?;
        std::fs::rename(&staged, self.offset_file())
    }

    fn library(&self) -> PathBuf {
        self.dir.path().join("walljump.so")
    }

    fn offset_file(&self) -> PathBuf {
        self.dir.path().join("offset-ms")
    }
}

/// libfaketime, when Debian's `faketime` package is installed (`cargo xtask it` installs it).
pub fn libfaketime() -> Option<PathBuf> {
    let path = PathBuf::from(LIBFAKETIME);
    path.is_file().then_some(path)
}

fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
