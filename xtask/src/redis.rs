//! Finding `redis-server`, and installing it where this machine allows.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `redis-server` binary: `$REDIS_SERVER`, else `PATH`; installed with apt-get when
/// missing and running as root on Debian.
pub(crate) fn ensure_redis_server() -> Result<PathBuf, String> {
    if let Some(found) = find() {
        return Ok(found);
    }
    if !is_root() || !Path::new("/usr/bin/apt-get").exists() {
        return Err(
            "redis-server not found: install it (Debian: sudo apt-get install redis-server) or set REDIS_SERVER=/path/to/redis-server"
                .to_owned(),
        );
    }
    println!("== redis-server not found; installing Debian's redis-server with apt-get");
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "redis-server"][..],
    ] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if !status.success() {
            return Err(format!("apt-get {} failed ({status})", args.join(" ")));
        }
    }
    find().ok_or_else(|| "apt-get installed redis-server, but it is not on PATH".to_owned())
}

fn find() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("REDIS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}
