//! A PostgreSQL cluster of one test's own, for tests that stop and start the database server itself (an outage):
//! the machine's shared server must keep running for the tests beside it. The cluster is made with the machine's
//! own binaries (`/usr/lib/postgresql/<version>/bin`) in a temporary folder, listens on a free loopback port with
//! `trust` authentication, and is stopped and removed when dropped.
//!
//! `initdb` and `postgres` refuse to run as root, and the suite runs as root in the sandbox and in CI: then every
//! command runs as the `postgres` user (`runuser`), and the folder is handed to that user.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// How the server is stopped (`pg_ctl stop -m …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Sessions are ended and the server shuts down cleanly.
    Fast,
    /// The server quits at once, as on a crash; it recovers from its WAL on the next start.
    Immediate,
}

impl StopMode {
    fn flag(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Immediate => "immediate",
        }
    }
}

/// A private PostgreSQL cluster; stopped and deleted when dropped.
pub struct PrivatePostgres {
    /// The loopback port the server listens on.
    pub port: u16,
    bin: PathBuf,
    folder: tempfile::TempDir,
    as_postgres_user: bool,
}

/// The folder of the newest PostgreSQL installed under `/usr/lib/postgresql` (Debian's layout).
fn binaries() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .expect("PostgreSQL is installed under /usr/lib/postgresql")
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("a PostgreSQL version with initdb under /usr/lib/postgresql")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The uid and gid of the `postgres` user.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("`id` runs");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("the postgres user exists")
    };
    (id("-u"), id("-g"))
}

impl PrivatePostgres {
    /// Creates the cluster and starts its server.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Creates a cluster that takes TCP connections only over TLS, serving `identity`, and starts its server.
    pub async fn start_with_tls(identity: &whist_adapters::tls::ServerIdentity) -> Self {
        Self::start_with(Some(identity)).await
    }

    /// A cluster value for a new, empty folder handed to the server's user (nothing created or started yet).
    fn unstarted() -> Self {
        let folder = tempfile::Builder::new()
            .prefix("whist-private-pg-")
            .tempdir()
            .expect("a temporary folder");
        let as_postgres_user = is_root();
        if as_postgres_user {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(folder.path(), Some(uid), Some(gid))
                .expect("the folder can be handed to the postgres user");
        }
        Self {
            port: crate::free_port(),
            bin: binaries(),
            folder,
            as_postgres_user,
        }
    }

    /// An asynchronous standby of this cluster, started: a base backup taken with `pg_basebackup -R` (which makes
    /// it stream this server's WAL as it comes, and lag whenever it is stopped), on a port and folder of its own.
    pub async fn start_standby(&self) -> Self {
        let standby = Self::unstarted();
        let data = standby.data_dir();
        let port = self.port.to_string();
        standby
            .run(
                "pg_basebackup",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-D",
                    data.to_str().expect("a UTF-8 path"),
                    "-R",
                    "-X",
                    "stream",
                    "--no-sync",
                ],
            )
            .await;
        // The backup carries the primary's settings; the later lines win.
        let settings = std::fs::read_to_string(data.join("postgresql.auto.conf"))
            .expect("the backup's settings");
        standby.write_owned(
            "postgresql.auto.conf",
            &format!(
                "{settings}\nport = {}\nunix_socket_directories = '{}'\n",
                standby.port,
                standby.folder.path().display()
            ),
            0o600,
        );
        standby.start_server().await;
        standby
    }

    /// Promotes this standby to a primary and waits until it takes writes.
    pub async fn promote(&self) {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &["-D", data.to_str().expect("a UTF-8 path"), "-w", "promote"],
        )
        .await;
    }

    async fn start_with(tls: Option<&whist_adapters::tls::ServerIdentity>) -> Self {
        let cluster = Self::unstarted();
        let data = cluster.data_dir();
        let data = data.to_str().expect("a UTF-8 path");
        cluster
            .run(
                "initdb",
                &[
                    "-D",
                    data,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ],
            )
            .await;
        // Loopback only, a socket folder of its own (the machine's server has /var/run/postgresql), and no fsync:
        // the machine never loses power in a test, and an immediate stop still recovers from the WAL.
        let mut settings = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nmax_connections = 100\n\
             fsync = off\nlogging_collector = off\n",
            cluster.port,
            cluster.folder.path().display()
        );
        if let Some(identity) = tls {
            // TLS with the given certificate; over TCP nothing else is accepted.
            settings
                .push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            cluster.write_owned("server.crt", &identity.certificate_pem, 0o644);
            cluster.write_owned("server.key", &identity.key_pem, 0o600);
            cluster.write_owned(
                "pg_hba.conf",
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
                0o600,
            );
        }
        cluster.write_owned("postgresql.auto.conf", &settings, 0o600);
        cluster.start_server().await;
        cluster
    }

    /// Writes a file into the data folder, owned by the server's user, with `mode`.
    fn write_owned(&self, name: &str, contents: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data_dir().join(name);
        std::fs::write(&path, contents.as_bytes()).expect("a cluster file is written");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .expect("the file's mode is set");
        if self.as_postgres_user {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .expect("the file can be handed to the postgres user");
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.folder.path().join("data")
    }

    fn server_log(&self) -> PathBuf {
        self.folder.path().join("server.log")
    }

    /// The URL of `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// What the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.server_log()).unwrap_or_default()
    }

    /// Starts the server and waits until it takes connections.
    pub async fn start_server(&self) {
        let data = self.data_dir();
        let log = self.server_log();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("a UTF-8 path"),
                "-l",
                log.to_str().expect("a UTF-8 path"),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .await;
    }

    /// Stops the server and waits until it is down.
    pub async fn stop_server(&self, mode: StopMode) {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("a UTF-8 path"),
                "-m",
                mode.flag(),
                "-w",
                "-t",
                "60",
                "stop",
            ],
        )
        .await;
    }

    fn command(&self, program: &str, arguments: &[&str]) -> Command {
        let binary = self.bin.join(program);
        let mut command = if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(binary);
            command
        } else {
            Command::new(binary)
        };
        command.args(arguments).current_dir(self.folder.path());
        command
    }

    /// Runs one of the server's programs to the end (off the test's runtime threads); panics with its output if it
    /// fails.
    async fn run(&self, program: &str, arguments: &[&str]) {
        let mut command = self.command(program, arguments);
        let described = format!("{program} {}", arguments.join(" "));
        let output: Output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("the command's thread finishes")
            .unwrap_or_else(|error| panic!("{described} could not run: {error}"));
        assert!(
            output.status.success(),
            "{described} failed ({}):\n{}\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log_text()
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Best effort: the server may already be down (a test that stopped it and failed).
        let data = self.data_dir();
        if let Some(data) = data.to_str() {
            let _ = self
                .command("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}
