//! A PostgreSQL database of a test's own, for cluster mode (feature `cluster`).

use std::{path::PathBuf, process::Command, sync::OnceLock, time::Duration};

use tokio_postgres::NoTls;

/// A new, empty PostgreSQL database, dropped (with its connections) when this is: on the server
/// `AGENTS_TEST_PG` names (a connection string without `dbname`), by default the one on
/// 127.0.0.1:5432 as `postgres`; or, if none answers, on a private server this process starts
/// from the installed binaries (`/usr/lib/postgresql/*/bin`: `initdb`, `pg_ctl`) in a temporary
/// directory. It panics if it can have neither: cluster mode is tested on a real server.
///
/// ```no_run
/// # #[tokio::main] async fn main() {
/// use agents::{testing::TestDatabase, ClusterOptions};
/// let db = TestDatabase::new().await;
/// let options = ClusterOptions::new(&db.url, "127.0.0.1:8080");
/// # }
/// ```
pub struct TestDatabase {
    /// Its connection string.
    pub url: String,
    name: String,
    server: String,
}

impl TestDatabase {
    /// A new, empty database.
    pub async fn new() -> TestDatabase {
        let server = server().await;
        let name = format!("agents_test_{:016x}", crate::cluster::random());
        admin(&server, &format!("CREATE DATABASE {name}")).await;
        TestDatabase {
            url: format!("{server} dbname={name}"),
            name,
            server,
        }
    }

    /// Runs `sql` (statements separated by `;`) on it.
    pub async fn execute(&self, sql: &str) {
        self.client().await.batch_execute(sql).await.unwrap();
    }

    /// A connection to it.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (server, sql) = (
            self.server.clone(),
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
        // A runtime of its own: the test's may be shutting down.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(10), admin(&server, &sql)).await
                })
        })
        .join();
    }
}

/// The server's connection string without a database: the configured or local one, else a
/// private one (started once per process).
async fn server() -> String {
    let configured = std::env::var("AGENTS_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres".to_owned());
    let probe = format!("{configured} dbname=postgres connect_timeout=5");
    if tokio_postgres::connect(&probe, NoTls).await.is_ok() {
        return configured;
    }
    static PRIVATE: OnceLock<String> = OnceLock::new();
    PRIVATE
        .get_or_init(|| {
            std::thread::spawn(private_server)
                .join()
                .expect("starting a private PostgreSQL")
        })
        .clone()
}

/// Starts a PostgreSQL server of this process's own from the installed binaries (as the
/// `postgres` user when run as root, which PostgreSQL refuses), as a child that the kernel
/// stops when the thread that started it ends: a thread that lives as long as the process.
fn private_server() -> String {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|versions| {
            versions
                .filter_map(Result::ok)
                .map(|v| v.path().join("bin"))
                .max()
        })
        .filter(|bin| bin.join("initdb").exists())
        .expect("no PostgreSQL server answers and no PostgreSQL binaries are installed (/usr/lib/postgresql/*/bin): install postgresql, or set AGENTS_TEST_PG");
    // The directories of the private servers of processes that have ended go first.
    for entry in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("agents-pg-") {
            if !std::path::Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("agents-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = is_root();
    if root {
        let _ = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status();
    }
    let command = move |program: &str| {
        let exe = bin.join(program);
        if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    };
    let data = dir.join("data");
    let data = data.to_str().unwrap().to_owned();
    let status = command("initdb")
        .args(["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "initdb failed");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let (started, wait) = std::sync::mpsc::channel();
    let socket_dir = dir.display().to_string();
    std::thread::spawn(move || {
        let mut server = command("postgres");
        server.args(["-D", &data, "-p", &port.to_string(), "-k", &socket_dir]);
        server.args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]);
        server.stderr(std::process::Stdio::null());
        die_with_this_thread(&mut server);
        let mut child = server.spawn().expect("starting postgres");
        let _ = started.send(());
        let _ = child.wait(); // this thread, and so the server, lives as long as the process
    });
    wait.recv().expect("starting postgres");
    let url = format!("host=127.0.0.1 port={port} user=postgres");
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return url;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the private PostgreSQL did not start on port {port}");
}

#[cfg(target_os = "linux")]
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(not(target_os = "linux"))]
fn is_root() -> bool {
    false
}

/// The child gets SIGTERM when the thread that spawned it ends (the process exits).
#[cfg(target_os = "linux")]
fn die_with_this_thread(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_this_thread(_: &mut Command) {}

async fn admin(server: &str, sql: &str) {
    let url = format!("{server} dbname=postgres");
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at `{url}`: {e}"));
    tokio::spawn(connection);
    client.batch_execute(sql).await.unwrap();
}
