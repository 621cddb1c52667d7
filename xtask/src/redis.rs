//! Finding `redis-server` and the fault tools, and installing them where this machine allows.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's `faketime` package puts libfaketime.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The `redis-server` binary: `$REDIS_SERVER`, else `PATH`; installed with apt-get when
/// missing and running as root on Debian.
pub(crate) fn ensure_redis_server() -> Result<PathBuf, String> {
    if let Some(found) = find_redis_server() {
        return Ok(found);
    }
    if !can_apt_get() {
        return Err(
            "redis-server not found: install it (Debian: sudo apt-get install redis-server) or set REDIS_SERVER=/path/to/redis-server"
                .to_owned(),
        );
    }
    println!("== redis-server not found; installing Debian's redis-server with apt-get");
    apt_get_install(&["redis-server"])?;
    find_redis_server()
        .ok_or_else(|| "apt-get installed redis-server, but it is not on PATH".to_owned())
}

/// Debian's backports suite, where `valkey-server` (8.0) is packaged for bookworm.
const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/lockkit-backports.sources";

/// The `valkey-server` binary: `$VALKEY_SERVER`, else `PATH`; installed with apt-get from
/// bookworm-backports (the suite enabled first) when missing and running as root on Debian.
pub(crate) fn ensure_valkey_server() -> Result<PathBuf, String> {
    let find = || {
        std::env::var_os("VALKEY_SERVER")
            .map(PathBuf::from)
            .or_else(|| find_in_path("valkey-server"))
    };
    if let Some(found) = find() {
        return Ok(found);
    }
    if !can_apt_get() {
        return Err(
            "valkey-server not found: install it (Debian 12: enable bookworm-backports, then sudo apt-get install -t bookworm-backports valkey-server) or set VALKEY_SERVER=/path/to/valkey-server"
                .to_owned(),
        );
    }
    println!("== valkey-server not found; installing it from Debian's bookworm-backports");
    if !Path::new(BACKPORTS_SOURCE).exists() {
        std::fs::write(
            BACKPORTS_SOURCE,
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )
        .map_err(|e| format!("cannot enable bookworm-backports ({BACKPORTS_SOURCE}): {e}"))?;
    }
    apt_get_install(&["-t", "bookworm-backports", "valkey-server"])?;
    find().ok_or_else(|| "apt-get installed valkey-server, but it is not on PATH".to_owned())
}

/// Whether the fault tools (nftables' `nft` for partitions, libfaketime for client clock jumps)
/// are present, installing them with apt-get when missing and root. Without them the tests
/// that need them skip with a printed reason.
pub(crate) fn ensure_fault_tools() -> bool {
    let present = || find_in_path("nft").is_some() && Path::new(LIBFAKETIME).is_file();
    if present() {
        return true;
    }
    if !can_apt_get() {
        println!(
            "== nft or libfaketime missing and not root: partition and client-clock tests will skip (apt-get install nftables faketime)"
        );
        return false;
    }
    println!("== installing Debian's nftables and faketime with apt-get (fault tests)");
    if let Err(error) = apt_get_install(&["nftables", "faketime"]) {
        println!("== {error}; partition and client-clock tests will skip");
    }
    present()
}

fn apt_get_install(packages: &[&str]) -> Result<(), String> {
    let mut install = vec!["install", "-y", "-qq"];
    install.extend_from_slice(packages);
    for args in [&["update", "-qq"][..], &install[..]] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if !status.success() {
            return Err(format!("apt-get {} failed ({status})", args.join(" ")));
        }
    }
    Ok(())
}

fn find_redis_server() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("REDIS_SERVER") {
        return Some(PathBuf::from(path));
    }
    find_in_path("redis-server")
}

fn find_in_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

fn can_apt_get() -> bool {
    is_root() && Path::new("/usr/bin/apt-get").exists()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}
