//! A production rehearsal: `ENVIRONMENT=prod`, every process started from the `Procfile` (the release step, two
//! `web`, one `worker`), nginx (Debian's) in front of the two `web` with `X-Forwarded-For` and `TRUSTED_PROXIES`,
//! Postgres through PgBouncer over TLS verified against its CA (`sslmode=verify-full`) with `DATABASE_DIRECT_URL`
//! straight to the server, Auth0's JWKS over HTTPS from its own CA, Stripe's signed webhooks, and hosts booting on
//! moto's instances over pinned HTTPS. Under 16 desktop apps it runs a release (`create-buffers`, `swap-over`) and a
//! rolling restart of the web processes, one at a time. It records the assigns answered, every answer outside the
//! contract (none allowed) and every request that failed at the balancer during the restart (none allowed: nginx
//! retries the other upstream, and a desktop app resends a request whose connection closed under it, an assign
//! with the same `Idempotency-Key`, so it is answered once), and the hosts launched against the warm buffer's
//! target.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use whist_adapters::config::TokenKey;
use whist_adapters::store::Database;
use whist_adapters::tls::Authority;
use whist_adapters::tokens::{Purpose, Tokens};
use whist_tests::moto_hosts::HostImages;
use whist_tests::pgbouncer::{PgBouncer, PoolMode};
use whist_tests::{
    free_port, http_client, subscribe_at, ChildProcess, Moto, MotoHosts, TestDatabase,
    STRIPE_WEBHOOK_SECRET,
};

use super::{record, Row};
use crate::auth::{claims, keys, serve_jwks_with, sign, AUDIENCE, ISSUER};

const REGION: &str = "us-east-1";
const OLD_IMAGE: &str = "ami-12c6146b";
const OLD_HASH: &str = "hash-rehearsal-old";
const NEW_IMAGE: &str = "ami-03cf127a";
const NEW_HASH: &str = "hash-rehearsal-new";
const CAPACITY: u32 = 4;
const DESIRED_FREE: u32 = 8;
const CLIENTS: usize = 16;
const DEPLOYMENT: &str = "whist-rehearsal";
const UPSTREAM_PORT: u16 = 5432;
/// 32 bytes of key, base64: the deployment's token key.
const TOKEN_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// The Procfile's command for `process` (`release`, `web`, `worker`).
fn procfile_command(process: &str) -> String {
    let procfile = std::fs::read_to_string(crate::deploy::repository().join("Procfile"))
        .expect("the Procfile reads");
    procfile
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{process}:")))
        .map(|command| command.trim().to_string())
        .unwrap_or_else(|| panic!("the Procfile has a {process} entry"))
}

/// Runs the Procfile's `process` through `sh -c`, as a Procfile runner does.
fn start_process(
    process: &str,
    folder: &Path,
    environment: &[(&'static str, String)],
    log: &str,
) -> ChildProcess {
    let command = procfile_command(process);
    ChildProcess::start(
        Path::new("/bin/sh"),
        &["-c", &command],
        folder,
        environment,
        log,
    )
}

/// nginx in front of the two web processes, retrying the other upstream on a refused connection, a 502 or a 503
/// (a process that is draining answers 503 before it has read the request's effects into anything). A web process
/// is taken out of the balancer (`down`, and a reload) before it is stopped, as a deployment deregisters a target
/// before it stops it: the balancer sends it nothing new, and its idle keep-alive connections end with the old
/// workers instead of racing a request.
struct Nginx {
    port: u16,
    upstreams: Vec<u16>,
    child: std::process::Child,
    folder: tempfile::TempDir,
}

impl Nginx {
    async fn start(upstreams: &[u16]) -> Self {
        let folder = tempfile::Builder::new()
            .prefix("whist-nginx-")
            .tempdir()
            .expect("a folder");
        let port = free_port();
        write_config(folder.path(), port, upstreams, None);
        let child = std::process::Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(folder.path().join("nginx.conf"))
            .arg("-p")
            .arg(folder.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx starts (.ci/run installs Debian's nginx)");
        let nginx = Self {
            port,
            upstreams: upstreams.to_vec(),
            child,
            folder,
        };
        assert!(
            whist_tests::wait_listening(nginx.port, Duration::from_secs(20)).await,
            "nginx listens: {}",
            nginx.error_log()
        );
        nginx
    }

    fn config_path(&self) -> PathBuf {
        self.folder.path().join("nginx.conf")
    }

    /// Takes `down` out of the balancer (or, with `None`, puts every upstream back) and reloads: new workers take
    /// the new configuration, the old ones finish what they carry and exit.
    async fn balance(&self, down: Option<u16>) {
        write_config(self.folder.path(), self.port, &self.upstreams, down);
        let status = std::process::Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(self.config_path())
            .arg("-p")
            .arg(self.folder.path())
            .args(["-s", "reload"])
            .status()
            .expect("nginx -s reload runs");
        assert!(status.success(), "nginx reloads: {}", self.error_log());
        // The old workers finish their requests (each within a second here) and go.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.folder.path().join("error.log")).unwrap_or_default()
    }

    /// Requests nginx passed to a second upstream after the first refused or failed them (its access log names
    /// every upstream a request went to).
    fn retried(&self) -> usize {
        std::fs::read_to_string(self.folder.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(", 127.0.0.1:"))
            .count()
    }
}

/// Writes nginx's configuration into `folder`: listening on `port`, balancing `upstreams`, `down` (if any) out.
fn write_config(folder: &Path, port: u16, upstreams: &[u16], down: Option<u16>) {
    let dir = folder.display();
    let servers: String = upstreams
        .iter()
        .map(|upstream| {
            let state = if Some(*upstream) == down { " down" } else { "" };
            format!("    server 127.0.0.1:{upstream} max_fails=0{state};\n")
        })
        .collect();
    let config = format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               log_format upstreams '$remote_addr $request $status $upstream_addr $upstream_status';\n\
               access_log {dir}/access.log upstreams;\n\
               client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;\n\
               uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;\n\
               upstream whist {{\n{servers}    keepalive 32;\n  }}\n\
               server {{\n\
                 listen 127.0.0.1:{port};\n\
                 location / {{\n\
                   proxy_pass http://whist;\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n\
                   proxy_set_header Host $host;\n\
                   proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                   proxy_next_upstream error timeout http_502 http_503 non_idempotent;\n\
                   proxy_next_upstream_tries 4;\n\
                   proxy_connect_timeout 2s;\n\
                   proxy_read_timeout 30s;\n\
                 }}\n\
               }}\n\
             }}\n"
        );
    std::fs::write(folder.join("nginx.conf"), config).expect("the configuration");
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the desktop apps saw.
#[derive(Default)]
struct Seen {
    assigned: u64,
    disconnected: u64,
    /// 503s with a contract error code (no capacity while the buffer fills, and so on).
    refused: BTreeMap<String, u64>,
    /// Answers the contract does not have: must stay empty.
    outside: Vec<String>,
    /// Requests that failed at the balancer (no answer after every retry, or nginx's own 502/504): must stay empty.
    balancer: Vec<String>,
    /// Requests sent again after a connection that ended under them (nginx's reload closes its idle keep-alive
    /// connections, and a request sent on one just then gets no answer): the desktop app's retry, safe because an
    /// assign carries an `Idempotency-Key` and a disconnect is idempotent.
    resent: u64,
    /// Every mandelbox an assign answered with.
    mandelboxes: BTreeSet<String>,
}

/// How many times a desktop app sends a request whose connection ended under it.
const SENDS: usize = 4;

/// Sends the request `request` builds, again (at most `SENDS` times in all) when it got no answer: a connection
/// closed or reset under it, or no connection at all. Each resend is counted in `seen`.
async fn send_resending(
    request: impl Fn() -> reqwest::RequestBuilder,
    seen: &Mutex<Seen>,
) -> Result<reqwest::Response, reqwest::Error> {
    let mut sent = 1;
    loop {
        match request().send().await {
            Err(error) if sent < SENDS && (error.is_request() || error.is_connect()) => {
                sent += 1;
                seen.lock().expect("seen").resent += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answer => return answer,
        }
    }
}

/// Whether `body` is the webserver's own JSON error (not nginx's HTML page).
fn contract_error(body: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|value| value["error"].as_str().map(str::to_string))
}

/// One desktop app: assigns as its Auth0 user, and disconnects as its protocol server would, until `stop`.
async fn desktop_app(
    index: usize,
    base: String,
    token: String,
    tokens: Arc<Tokens>,
    hashes: Arc<Mutex<&'static str>>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let http = http_client();
    let mut session = 0i64;
    while !stop.load(Ordering::SeqCst) {
        session += 1;
        let hash = *hashes.lock().expect("the hash");
        let key = format!("app-{index}-session-{session}");
        let body = whist_tests::assign_body(&[REGION], hash, session);
        let answer = send_resending(
            || {
                http.post(format!("{base}/mandelbox/assign"))
                    .bearer_auth(&token)
                    .header("Idempotency-Key", &key)
                    .json(&body)
                    .timeout(Duration::from_secs(30))
            },
            &seen,
        )
        .await;
        let (status, body) = match answer {
            Ok(response) => (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            ),
            Err(error) => {
                seen.lock()
                    .expect("seen")
                    .balancer
                    .push(format!("assign {index}/{session}: {error}"));
                continue;
            }
        };
        match (status, contract_error(&body)) {
            (200, _) => {
                let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let Some(mandelbox_id) = answer["mandelbox_id"].as_str() else {
                    seen.lock()
                        .expect("seen")
                        .outside
                        .push(format!("200 {body}"));
                    continue;
                };
                {
                    let mut seen = seen.lock().expect("seen");
                    seen.assigned += 1;
                    seen.mandelboxes.insert(mandelbox_id.to_string());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let secret = tokens.derive(Purpose::Protocol, mandelbox_id);
                let answer = send_resending(
                    || {
                        http.post(format!("{base}/mandelbox/{mandelbox_id}/disconnect"))
                            .bearer_auth(&secret)
                            .timeout(Duration::from_secs(30))
                    },
                    &seen,
                )
                .await;
                let mut seen = seen.lock().expect("seen");
                match answer.map(|response| response.status().as_u16()) {
                    Ok(200) => seen.disconnected += 1,
                    Ok(other) => seen.outside.push(format!("disconnect {other}")),
                    Err(error) => seen.balancer.push(format!("disconnect: {error}")),
                }
            }
            (503, Some(code)) => {
                *seen.lock().expect("seen").refused.entry(code).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (502 | 504, None) => seen
                .lock()
                .expect("seen")
                .balancer
                .push(format!("assign {status} from the balancer")),
            _ => seen
                .lock()
                .expect("seen")
                .outside
                .push(format!("assign {status} {body}")),
        }
    }
}

async fn run_to_end(
    arguments: &[&str],
    folder: &Path,
    environment: &[(&'static str, String)],
    log: &str,
) -> (bool, String) {
    let mut process =
        ChildProcess::start(&crate::whist_binary(), arguments, folder, environment, log);
    let status = process.exited(Duration::from_secs(240)).await;
    (
        status.is_some_and(|status| status.success()),
        process.log_text(),
    )
}

async fn count(store: &Database, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.any())
        .await
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_production_rehearsal_releases_and_restarts_behind_nginx_and_pgbouncer_losing_nothing() {
    let started = Instant::now();
    let folder = tempfile::tempdir().expect("a folder");
    let dir: PathBuf = folder.path().to_path_buf();

    // The database, through PgBouncer over TLS (its certificate from the database CA), and directly.
    let database = TestDatabase::postgres_for(60).await;
    let direct = database.url.clone().expect("Postgres");
    let database_ca = Authority::new("rehearsal database CA").expect("a CA");
    let ca_file = dir.join("database-ca.pem");
    std::fs::write(&ca_file, database_ca.certificate_pem()).expect("the CA is written");
    let bouncer = PgBouncer::start_with_tls(
        UPSTREAM_PORT,
        PoolMode::Session,
        60,
        &database_ca
            .issue(&["127.0.0.1"])
            .expect("a certificate for PgBouncer"),
    )
    .await;
    let pooled = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        bouncer.url_for(&direct, UPSTREAM_PORT),
        ca_file.display()
    );

    // Auth0's JWKS over HTTPS from the identity provider's CA.
    let identity_ca = Authority::new("rehearsal identity CA").expect("a CA");
    let (tenant, _, _) = keys();
    let (jwks_url, _published, _jwks, _jwks_server) = serve_jwks_with(
        vec![tenant.jwk.clone()],
        Duration::ZERO,
        Some(&identity_ca.issue(&["127.0.0.1"]).expect("a certificate")),
    )
    .await;

    // EC2 and the hosts that boot on its instances (HTTPS, self-signed, pinned at registration).
    let moto = Moto::start().await;
    let host_port = free_port();
    let _hosts = MotoHosts::start(
        &moto.endpoint,
        DEPLOYMENT,
        &[REGION],
        HostImages {
            commit_hashes: HashMap::from([
                (OLD_IMAGE.to_string(), OLD_HASH.to_string()),
                (NEW_IMAGE.to_string(), NEW_HASH.to_string()),
            ]),
            capacity: CAPACITY,
            port: host_port,
        },
    );

    let web_ports = [free_port(), free_port()];
    let nginx = Nginx::start(&web_ports).await;
    let base = format!("http://127.0.0.1:{}", nginx.port);
    let environment: Vec<(&'static str, String)> = vec![
        ("PATH", crate::deploy::path_with_whist()),
        ("ENVIRONMENT", "prod".to_string()),
        ("DATABASE_URL", pooled),
        ("DATABASE_DIRECT_URL", direct.clone()),
        ("WHIST_AUTO_MIGRATE", "false".to_string()),
        ("WHIST_TOKEN_KEYS", format!("k1:{TOKEN_KEY}")),
        ("WHIST_CLOUD", "aws".to_string()),
        ("AWS_ENDPOINT_URL", moto.endpoint.clone()),
        ("WHIST_DEPLOYMENT", DEPLOYMENT.to_string()),
        ("ENABLED_REGIONS", serde_json::json!([REGION]).to_string()),
        ("DESIRED_FREE_MANDELBOXES", DESIRED_FREE.to_string()),
        ("WHIST_HOST_CAPACITY", CAPACITY.to_string()),
        ("HOST_SERVICE_PORT", host_port.to_string()),
        ("PUBLIC_URL", base.clone()),
        ("TRUSTED_PROXIES", r#"["127.0.0.1/32"]"#.to_string()),
        ("AUTH0_JWKS_URL", jwks_url),
        ("AUTH0_ISSUER", ISSUER.to_string()),
        ("AUTH0_AUDIENCE", AUDIENCE.to_string()),
        ("AUTH0_CA_PEM", identity_ca.certificate_pem()),
        ("STRIPE_WEBHOOK_SECRET", STRIPE_WEBHOOK_SECRET.to_string()),
        ("ASSIGN_RATE_LIMIT_PER_MINUTE", "0".to_string()),
        ("MANDELBOX_LIMIT_PER_USER", "4".to_string()),
        ("SHUTDOWN_GRACE_S", "5".to_string()),
        ("WHIST_REPAIR_INTERVAL_S", "5".to_string()),
        ("RUST_LOG", "warn".to_string()),
    ];
    let with_port = |port: u16| {
        let mut environment = environment.clone();
        environment.push(("PORT", port.to_string()));
        environment
    };

    // The release step, then the processes.
    let mut release = start_process("release", &dir, &environment, "release.log");
    let released = release.exited(Duration::from_secs(120)).await;
    assert!(
        released.is_some_and(|status| status.success()),
        "the release step migrates: {}",
        release.log_text()
    );
    let store = database.open_with(4).await;
    whist_tests::activate_release(&store, &[REGION], OLD_IMAGE, OLD_HASH).await;
    let mut webs: Vec<ChildProcess> = Vec::new();
    for (index, port) in web_ports.iter().enumerate() {
        let mut web = start_process(
            "web",
            &dir,
            &with_port(*port),
            &format!("web-{index}-0.log"),
        );
        web.wait_healthy(Duration::from_secs(90)).await;
        webs.push(web);
    }
    // The worker at `info` (it logs no request, only its loops' decisions), so that a fleet that does not fill says
    // whether it led, decided and launched.
    let mut worker_environment = environment.clone();
    worker_environment.retain(|(key, _)| *key != "RUST_LOG");
    worker_environment.push(("RUST_LOG", "info".to_string()));
    let worker = start_process("worker", &dir, &worker_environment, "worker.log");
    let troubles = |webs: &[ChildProcess]| {
        let mut logs = vec![worker.log_text(), nginx.error_log(), bouncer.log_text()];
        logs.extend(webs.iter().map(ChildProcess::log_text));
        logs.join("\n---\n")
    };
    let free_slots =
        "SELECT CAST(COALESCE(SUM(mandelbox_capacity - live_mandelboxes), 0) AS BIGINT) \
                      FROM instances WHERE status = 'ACTIVE'";
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&store, free_slots).await < i64::from(DESIRED_FREE) {
        if Instant::now() >= deadline {
            panic!(
                "the warm buffer fills: the hosts now:\n  {}\nthe fleet's history:\n  {}\n{}",
                whist_tests::fleet_rows(&store, REGION).await.join("\n  "),
                whist_tests::fleet_history(&store).await.join("\n  "),
                troubles(&webs)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // 16 desktop apps, each a subscriber signed in through Auth0.
    let tokens = Arc::new(
        Tokens::with_keys(vec![TokenKey {
            id: "k1".to_string(),
            bytes: base64::Engine::decode(&base64::engine::general_purpose::STANDARD, TOKEN_KEY)
                .expect("base64"),
        }])
        .expect("the deployment's keys"),
    );
    let http = http_client();
    let hash = Arc::new(Mutex::new(OLD_HASH));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut apps = Vec::new();
    for index in 0..CLIENTS {
        let user = format!("auth0|rehearsal-{index}");
        subscribe_at(&http, &base, &user).await;
        let token = sign(tenant, &claims(&user, "openid", ISSUER, AUDIENCE, 3600));
        apps.push(tokio::spawn(desktop_app(
            index,
            base.clone(),
            token,
            tokens.clone(),
            hash.clone(),
            stop.clone(),
            seen.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A release: buffers of the new image, then the swap-over; the apps move to the new hash.
    let (ok, log) = run_to_end(
        &[
            "images",
            "create-buffers",
            "--commit-hash",
            NEW_HASH,
            "--amis",
            &serde_json::json!({ REGION: NEW_IMAGE }).to_string(),
            "--timeout",
            "180s",
        ],
        &dir,
        &environment,
        "create-buffers.log",
    )
    .await;
    assert!(ok, "create-buffers: {log}\n{}", troubles(&webs));
    let (ok, log) = run_to_end(
        &["images", "swap-over", "--commit-hash", NEW_HASH],
        &dir,
        &environment,
        "swap-over.log",
    )
    .await;
    assert!(ok, "swap-over: {log}");
    *hash.lock().expect("the hash") = NEW_HASH;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The rolling restart: one web process at a time, each back and healthy before the next goes.
    let balancer_before = seen.lock().expect("seen").balancer.len();
    for (index, port) in web_ports.iter().enumerate() {
        let mut old = webs.remove(index);
        nginx.balance(Some(*port)).await;
        old.signal(nix::sys::signal::Signal::SIGTERM);
        let status = old.exited(Duration::from_secs(25)).await;
        assert!(
            status.is_some_and(|status| status.success()),
            "a web process stops with 0 on SIGTERM: {}",
            old.log_text()
        );
        let mut web = start_process(
            "web",
            &dir,
            &with_port(*port),
            &format!("web-{index}-1.log"),
        );
        web.wait_healthy(Duration::from_secs(90)).await;
        webs.insert(index, web);
        nginx.balance(None).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for app in apps {
        app.await.expect("the app ran");
    }
    let seen = std::mem::take(&mut *seen.lock().expect("seen"));
    let failed_in_restart = seen.balancer.len() - balancer_before;
    assert!(
        seen.outside.is_empty(),
        "answers outside the contract: {:?}\n{}",
        seen.outside,
        troubles(&webs)
    );
    assert!(
        seen.balancer.is_empty(),
        "requests failed at the balancer: {:?}\n{}",
        seen.balancer,
        troubles(&webs)
    );
    // A resent assign answered with the first one's mandelbox: the log allocated exactly the mandelboxes answered.
    let allocated = count(
        &store,
        "SELECT count(*) FROM events WHERE event_type = 'MandelboxAllocated'",
    )
    .await;
    assert_eq!(
        allocated,
        seen.mandelboxes.len() as i64,
        "every allocation was answered once ({} answers, {} resent requests)\n{}",
        seen.assigned,
        seen.resent,
        troubles(&webs)
    );
    assert_eq!(
        seen.assigned,
        seen.mandelboxes.len() as u64,
        "no two assigns answered with the same mandelbox"
    );
    assert!(
        seen.assigned >= CLIENTS as u64,
        "the apps were served: {} assigned, {:?} refused\n{}",
        seen.assigned,
        seen.refused,
        troubles(&webs)
    );
    let launches = |image: &str| {
        format!(
            "SELECT count(*) FROM events WHERE event_type = 'InstanceLaunchRequested' \
             AND CAST(payload AS TEXT) LIKE '%{image}%'"
        )
    };
    let launched_old = count(&store, &launches(OLD_IMAGE)).await;
    let launched_new = count(&store, &launches(NEW_IMAGE)).await;
    let target = i64::from(DESIRED_FREE.div_ceil(CAPACITY));
    let refused: u64 = seen.refused.values().sum();
    let retried = nginx.retried();
    for web in webs {
        web.kill();
    }
    worker.kill();
    // No process panicked on the way, not even in a loop its supervisor restarted: every process's log, across the
    // rolling restart.
    let panicked: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("the processes' folder")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
        .filter(|path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .contains("panicked")
        })
        .collect();
    assert!(
        panicked.is_empty(),
        "a process panicked:\n{}",
        whist_tests::log_troubles(panicked.iter().map(PathBuf::as_path))
    );
    record(&Row {
        scenario: "Production rehearsal",
        load: format!(
            "ENVIRONMENT=prod from the Procfile: nginx -> 2 web + 1 worker, PgBouncer (TLS, verify-full) + direct \
             LISTEN, JWKS over HTTPS, moto hosts over pinned HTTPS; {CLIENTS} apps: {} assigns answered, {} \
             disconnected, {refused} refused with 503 {:?}",
            seen.assigned, seen.disconnected, seen.refused
        ),
        faults: format!(
            "a release (create-buffers, swap-over) and a rolling restart of both web processes; hosts launched: \
             {launched_old} of the old image, {launched_new} of the new (buffer target {target} hosts each, more \
             under load)"
        ),
        bad_inputs: 0,
        lost: format!(
            "nothing: 0 answers outside the contract, {failed_in_restart} requests failed at the balancer during \
             the restart (0 in all; nginx passed {retried} to the other web process; {} requests resent by the \
             apps after a connection closed under them, each assign answered with one mandelbox, {allocated} \
             allocated in all)",
            seen.resent
        ),
        seconds: started.elapsed().as_secs_f64(),
    });
}
