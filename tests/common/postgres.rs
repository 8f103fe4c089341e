//! A PostgreSQL database of a test's own: on the server `AGENTS_TEST_PG` names (by default the
//! one this project's machines run on 127.0.0.1:5432, user `postgres`, trust auth), or, if none
//! answers, on a private server started from the installed binaries (`initdb`, `pg_ctl`) in a
//! temporary directory. A test that cannot have either fails: the cluster is tested for real.

use std::{path::PathBuf, process::Command, sync::OnceLock, time::Duration};

use tokio_postgres::NoTls;

/// A database, dropped (with its connections) when this is.
pub struct Database {
    /// Its connection string.
    pub url: String,
    name: String,
    server: String,
}

/// The server's connection string without a database: the configured or local one, else a
/// private one (started once per test process).
async fn server() -> String {
    let configured = std::env::var("AGENTS_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres".to_owned());
    if tokio_postgres::connect(
        &format!("{configured} dbname=postgres connect_timeout=5"),
        NoTls,
    )
    .await
    .is_ok()
    {
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
/// `postgres` user when run as root, which `initdb` refuses); stopped when the process ends.
fn private_server() -> String {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|versions| versions.filter_map(Result::ok).map(|v| v.path().join("bin")).max())
        .filter(|bin| bin.join("initdb").exists())
        .expect("no PostgreSQL server answers and no PostgreSQL binaries are installed (/usr/lib/postgresql/*/bin): install postgresql, or set AGENTS_TEST_PG");
    let dir: PathBuf = std::env::temp_dir().join(format!("agents-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = unsafe { libc_geteuid() } == 0;
    let run = |program: &str, args: &[&str]| {
        let exe = bin.join(program);
        let mut command = if root {
            let _ = Command::new("chown")
                .args(["-R", "postgres", dir.to_str().unwrap()])
                .status();
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let status = command.args(args).status().unwrap();
        assert!(status.success(), "{program} {args:?} failed");
    };
    let data = dir.join("data");
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    run(
        "initdb",
        &[
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        ],
    );
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
        dir.display()
    );
    run(
        "pg_ctl",
        &[
            "-D",
            data.to_str().unwrap(),
            "-o",
            &options,
            "-w",
            "-l",
            dir.join("log").to_str().unwrap(),
            "start",
        ],
    );
    format!("host=127.0.0.1 port={port} user=postgres")
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

impl Database {
    /// A new, empty database.
    pub async fn new() -> Database {
        let server = server().await;
        let name = format!("agents_test_{:016x}", random());
        admin(&server, &format!("CREATE DATABASE {name}")).await;
        Database {
            url: format!("{server} dbname={name}"),
            name,
            server,
        }
    }

    /// Runs `sql` on it.
    pub async fn execute(&self, sql: &str) {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await.unwrap();
        tokio::spawn(connection);
        client.batch_execute(sql).await.unwrap();
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (server, sql) = (
            self.server.clone(),
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
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

async fn admin(server: &str, sql: &str) {
    let url = format!("{server} dbname=postgres");
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at `{url}`: {e}"));
    tokio::spawn(connection);
    client.batch_execute(sql).await.unwrap();
}

fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}
