//! A PgBouncer of the test's own (Debian's `pgbouncer`, which `.ci/run` installs), with its own configuration file
//! and port, in front of the machine's Postgres; never the system service. It refuses to run as root, so under
//! root it runs as the `postgres` user.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How PgBouncer hands server connections to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection per client connection, for as long as the client stays.
    Session,
    /// A server connection per transaction.
    Transaction,
}

impl PoolMode {
    fn name(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

/// A running PgBouncer; stopped when dropped.
pub struct PgBouncer {
    pub port: u16,
    folder: tempfile::TempDir,
    child: Child,
}

fn binary() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .expect("pgbouncer is installed (.ci/run installs Debian's pgbouncer)")
}

impl PgBouncer {
    /// Starts PgBouncer in `mode` in front of Postgres at `upstream_port` on loopback, at most `pool_size` server
    /// connections per database and user, and waits until it takes connections.
    pub async fn start(upstream_port: u16, mode: PoolMode, pool_size: u32) -> Self {
        Self::start_with(upstream_port, mode, pool_size, None).await
    }

    /// As [`PgBouncer::start`], taking clients only over TLS with `identity` (`client_tls_sslmode = require`).
    pub async fn start_with_tls(
        upstream_port: u16,
        mode: PoolMode,
        pool_size: u32,
        identity: &whist_adapters::tls::ServerIdentity,
    ) -> Self {
        Self::start_with(upstream_port, mode, pool_size, Some(identity)).await
    }

    async fn start_with(
        upstream_port: u16,
        mode: PoolMode,
        pool_size: u32,
        tls: Option<&whist_adapters::tls::ServerIdentity>,
    ) -> Self {
        let folder = tempfile::Builder::new()
            .prefix("whist-pgbouncer-")
            .tempdir()
            .expect("a temporary folder");
        let port = crate::free_port();
        let config = folder.path().join("pgbouncer.ini");
        let users = folder.path().join("users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n\"root\" \"\"\n").expect("the user list");
        let mut client_tls = String::new();
        if let Some(identity) = tls {
            use std::os::unix::fs::PermissionsExt;
            let certificate = folder.path().join("server.crt");
            let key = folder.path().join("server.key");
            std::fs::write(&certificate, &identity.certificate_pem).expect("the certificate");
            std::fs::write(&key, &identity.key_pem).expect("the key");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .expect("the key's mode");
            client_tls = format!(
                "client_tls_sslmode = require\nclient_tls_cert_file = {}\nclient_tls_key_file = {}\n",
                certificate.display(),
                key.display()
            );
        }
        std::fs::write(
            &config,
            format!(
                "[databases]\n* = host=127.0.0.1 port={upstream_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {users}\n\
                 pool_mode = {mode}\nmax_client_conn = 1000\ndefault_pool_size = {pool_size}\n\
                 ignore_startup_parameters = extra_float_digits,options\nlogfile = {log}\n{client_tls}",
                users = users.display(),
                mode = mode.name(),
                log = folder.path().join("pgbouncer.log").display(),
            ),
        )
        .expect("the configuration");
        let as_root = nix::unistd::geteuid().is_root();
        if as_root {
            let output = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(folder.path())
                .output()
                .expect("chown runs");
            assert!(output.status.success(), "the folder goes to postgres");
        }
        let mut command = if as_root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(binary());
            command
        } else {
            Command::new(binary())
        };
        let child = command
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgbouncer starts");
        let bouncer = Self {
            port,
            folder,
            child,
        };
        assert!(
            crate::wait_listening(port, Duration::from_secs(20)).await,
            "pgbouncer listens: {}",
            bouncer.log_text()
        );
        bouncer
    }

    /// `url` (a URL of the machine's Postgres) through this PgBouncer instead.
    pub fn url_for(&self, url: &str, upstream_port: u16) -> String {
        url.replacen(
            &format!("127.0.0.1:{upstream_port}"),
            &format!("127.0.0.1:{}", self.port),
            1,
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.folder.path().join("pgbouncer.log")).unwrap_or_default()
    }

    pub fn folder(&self) -> &Path {
        self.folder.path()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser passes SIGTERM on to pgbouncer; without runuser this is pgbouncer itself.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}
