//! A throwaway PostgreSQL server for tests: `initdb` and `postgres` in a temporary directory on
//! a free loopback port, no system service. Shared by the store's unit tests (through
//! `#[path]`) and the integration tests. The binaries are looked up on `PATH`, then in Debian's
//! `/usr/lib/postgresql/<version>/bin`; as root, the server runs as the `postgres` user (which
//! Debian's package creates), since PostgreSQL refuses to run as root.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct PgServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    databases: AtomicUsize,
}

/// `initdb`'s directory, if PostgreSQL is installed.
fn bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .collect();
    debian.sort();
    debian.reverse();
    on_path
        .chain(debian)
        .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
}

/// The uid and gid to run the server as: the `postgres` user when we are root.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam with a valid C string; the result is read at once, before any other call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root needs a `postgres` user for the test server (Debian's postgresql package creates it)"
    );
    // SAFETY: pw is non-null and points at libc's static passwd record.
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

fn command(bin: &Path, user: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user {
                if libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // The server dies with the test that started it, even if the test is killed.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

impl PgServer {
    /// Starts a server, or `None` (with a message on stderr) when PostgreSQL is not installed.
    pub fn start() -> Option<Self> {
        let Some(bin) = bin_dir() else {
            eprintln!(
                "SKIPPED: PostgreSQL tests need `initdb` and `postgres` (Debian: apt-get install postgresql)"
            );
            return None;
        };
        let user = run_as();
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("pgdata");
        if let Some((uid, gid)) = user {
            // SAFETY: chown on a path we own, as root.
            let c = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
            assert_eq!(unsafe { libc::chown(c.as_ptr(), uid, gid) }, 0);
        }
        let out = command(&bin.join("initdb"), user)
            .args(["-D", data.to_str().unwrap()])
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = command(&bin.join("postgres"), user)
            .args(["-D", data.to_str().unwrap(), "-p", &port.to_string()])
            .args(["-k", dir.path().to_str().unwrap(), "-h", "127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        let server = Self {
            child,
            port,
            dir,
            databases: AtomicUsize::new(0),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "postgres did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    /// The URL of the server's maintenance database.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub async fn database(&self) -> String {
        use sqlx::Connection;
        let name = format!("t{}", self.databases.fetch_add(1, Ordering::SeqCst));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut conn = loop {
            // Listening is not yet accepting: the server may still be starting up.
            match sqlx::PgConnection::connect(&self.admin_url()).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot connect to the test postgres: {e}"),
            }
        };
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown (the data is thrown away with the directory).
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}
