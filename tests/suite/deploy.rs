//! Deploying: the Procfile run by a real Procfile runner (release, then web and worker, then SIGTERM), migrations
//! only where the release policy says (read-only commands never migrate; `WHIST_AUTO_MIGRATE=false` refuses a schema
//! behind the binary), the expand/contract check over `migrations/`, and TLS to Postgres verified against a CA.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use whist_adapters::tls::Authority;
use whist_tests::private_postgres::PrivatePostgres;
use whist_tests::{admin_token, assign_body, eventually, free_port, ChildProcess, TestDatabase};

use crate::whist_binary;

/// The repository's root (the suite belongs to the root package).
pub(crate) fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `honcho`, the Procfile runner `.ci/run` installs from PyPI.
fn honcho() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|folder| folder.join("honcho"))
        .find(|candidate| candidate.is_file())
        .expect("honcho is on PATH (.ci/run installs it: pip install honcho)")
}

/// PATH with the `whist` this suite built first, as a deployment's slug has it.
pub(crate) fn path_with_whist() -> String {
    let folder = whist_binary()
        .parent()
        .expect("the binary's folder")
        .to_path_buf();
    let mut folders = vec![folder];
    if let Some(path) = std::env::var_os("PATH") {
        folders.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(folders)
        .expect("a PATH")
        .to_string_lossy()
        .into_owned()
}

async fn schema_tables(url: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.expect("connects");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema()",
    )
    .fetch_one(&pool)
    .await
    .expect("counts");
    pool.close().await;
    tables
}

async fn run_to_end(
    arguments: &[&str],
    folder: &Path,
    environment: &[(&str, String)],
    log: &str,
) -> (std::process::ExitStatus, String) {
    let mut process = ChildProcess::start(&whist_binary(), arguments, folder, environment, log);
    let status = process
        .exited(Duration::from_secs(60))
        .await
        .expect("the command ends by itself");
    (status, process.log_text())
}

#[tokio::test]
async fn read_only_commands_never_migrate_the_store() {
    let database = TestDatabase::postgres().await;
    let url = database.url.clone().expect("Postgres");
    let environment = [("DATABASE_URL", url.clone())];
    for arguments in [
        &["events", "list"][..],
        &["events", "verify"][..],
        &["projections", "status"][..],
        &["dev", "token", "--user", "someone"][..],
    ] {
        run_to_end(
            arguments,
            database.data_dir.path(),
            &environment,
            "read-only.log",
        )
        .await;
        assert_eq!(
            schema_tables(&url).await,
            0,
            "`whist {}` left the schema alone",
            arguments.join(" ")
        );
    }
}

#[tokio::test]
async fn without_auto_migration_serve_and_worker_refuse_a_schema_behind_them_until_the_release_step_ran(
) {
    let database = TestDatabase::postgres().await;
    let url = database.url.clone().expect("Postgres");
    let folder = database.data_dir.path();
    let mut environment = vec![
        ("DATABASE_URL", url.clone()),
        ("WHIST_AUTO_MIGRATE", "false".to_string()),
    ];
    for role in ["serve", "worker"] {
        let (status, log) = run_to_end(&[role], folder, &environment, &format!("{role}.log")).await;
        assert!(!status.success(), "{role} started on an empty schema");
        assert!(log.contains("whist migrate"), "{role} names the fix: {log}");
    }
    assert_eq!(schema_tables(&url).await, 0, "neither migrated");
    let (status, log) = run_to_end(&["migrate"], folder, &environment, "migrate.log").await;
    assert!(status.success(), "{log}");
    // A port taken just before it is bound: one taken earlier may have gone to another test meanwhile.
    environment.push(("PORT", free_port().to_string()));
    let mut serve = ChildProcess::start(
        &whist_binary(),
        &["serve"],
        folder,
        &environment,
        "serve.log",
    );
    serve.wait_healthy(Duration::from_secs(60)).await;
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    let status = serve.exited(Duration::from_secs(30)).await.expect("exits");
    assert!(status.success(), "{}", serve.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_procfile_releases_then_runs_web_and_worker_which_assign_and_stop_on_sigterm() {
    let database = TestDatabase::postgres().await;
    let url = database.url.clone().expect("Postgres");
    let folder = database.data_dir.path();
    let procfile = repository().join("Procfile");
    let procfile = procfile.to_str().expect("a UTF-8 path");
    // The deployment's settings: its release step migrates, so its processes do not.
    let mut environment = vec![
        ("PATH", path_with_whist()),
        ("DATABASE_URL", url.clone()),
        ("WHIST_AUTO_MIGRATE", "false".to_string()),
        ("SHUTDOWN_GRACE_S", "20".to_string()),
    ];

    let mut release = ChildProcess::start(
        &honcho(),
        &["-f", procfile, "-d", ".", "start", "release"],
        folder,
        &environment,
        "release.log",
    );
    release
        .exited(Duration::from_secs(60))
        .await
        .expect("the release step ends");
    assert!(
        release.log_text().contains("release.1 stopped (rc=0)"),
        "{}",
        release.log_text()
    );

    // web gets the base port (taken just before it is bound); worker (no HTTP) the next hundred.
    let port = free_port();
    environment.push(("PUBLIC_URL", format!("http://127.0.0.1:{port}")));
    let port_text = port.to_string();
    let mut processes = ChildProcess::start(
        &honcho(),
        &[
            "-f", procfile, "-d", ".", "start", "-p", &port_text, "web", "worker",
        ],
        folder,
        &environment,
        "processes.log",
    );
    let client = whist_tests::http_client();
    let base = format!("http://127.0.0.1:{port}");
    let assigned = eventually(Duration::from_secs(90), || {
        let client = client.clone();
        let base = base.clone();
        async move {
            let Ok(response) = client
                .post(format!("{base}/mandelbox/assign"))
                .bearer_auth(admin_token("procfile-user"))
                .json(&assign_body(&["us-east-1"], "local_dev", 1))
                .send()
                .await
            else {
                return false;
            };
            response.status().as_u16() == 200
        }
    })
    .await;
    assert!(
        assigned,
        "an assign through web, on a host the worker keeps: {}",
        processes.log_text()
    );

    let asked = Instant::now();
    processes.signal(nix::sys::signal::Signal::SIGTERM);
    processes
        .exited(Duration::from_secs(30))
        .await
        .expect("honcho ends once its processes have");
    let took = asked.elapsed();
    let log = processes.log_text();
    for process in ["web.1", "worker.1"] {
        assert!(
            log.contains(&format!("{process} stopped (rc=0)")),
            "{process} exits 0 on SIGTERM: {log}"
        );
    }
    assert!(took < Duration::from_secs(25), "stopped in {took:?}");
}

/// Something a migration drops or renames.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Removal {
    migration: String,
    kind: String,
    name: String,
}

/// Migrations that remove something an earlier migration made, and why that was safe: a contract step runs only
/// once no process of a release that used the thing is left (ARCHITECTURE.md, "Changing the schema"). Editing a
/// migration after it shipped would change its checksum, so the mark lives here.
const CONTRACT_STEPS: &[(&str, &str)] = &[(
    "20261129000008_positions_at_append.sql",
    "dropped whist_sequence_events and the old signature of whist_append_units when positions moved to the append; \
     shipped before this policy, so processes of the release before it had to be stopped first",
), (
    "20261205000012_appends_checked.sql",
    "replaces the table event_log_head by a view of the same name and columns in the same transaction: processes \
     of the previous release only read it (`SELECT position FROM event_log_head WHERE id = 1`), and the function \
     they append with, which wrote it, is replaced in that transaction too",
)];

/// The words of `sql`, lower-cased, split at white space, parentheses, commas and semicolons.
fn sql_words(sql: &str) -> Vec<String> {
    sql.split(|c: char| c.is_whitespace() || c == '(' || c == ',' || c == ';')
        .filter(|word| !word.is_empty())
        .map(|word| word.to_ascii_lowercase())
        .collect()
}

/// The names of tables, columns, functions, views and types that `sql` creates.
fn created(sql: &str) -> Vec<String> {
    let words = sql_words(sql);
    let mut names = Vec::new();
    for (index, word) in words.iter().enumerate() {
        let after = |offset: usize| words.get(index + offset).cloned().unwrap_or_default();
        let name_after = |mut offset: usize| {
            while ["if", "not", "exists", "or", "replace"].contains(&after(offset).as_str()) {
                offset += 1;
            }
            after(offset)
        };
        match (word.as_str(), after(1).as_str()) {
            ("create", "table" | "function" | "view" | "type") => names.push(name_after(2)),
            ("create", "or") => names.push(name_after(4)),
            ("add", "column") => names.push(name_after(2)),
            _ => {}
        }
    }
    names
}

/// What `sql` drops or renames, of the names in `earlier`.
fn removals(migration: &str, sql: &str, earlier: &[String]) -> Vec<Removal> {
    let words = sql_words(sql);
    let mut found = Vec::new();
    for (index, word) in words.iter().enumerate() {
        let after = |offset: usize| words.get(index + offset).cloned().unwrap_or_default();
        let (kind, mut offset) = match (word.as_str(), after(1).as_str()) {
            ("drop", kind @ ("table" | "function" | "view" | "type" | "column")) => {
                (kind.to_string(), 2)
            }
            ("rename", "column") => ("column (renamed)".to_string(), 2),
            ("rename", "to") => ("table (renamed)".to_string(), 0),
            _ => continue,
        };
        if kind == "table (renamed)" {
            // ALTER TABLE name RENAME TO other: the name stands before RENAME.
            let name = words
                .get(index.saturating_sub(1))
                .cloned()
                .unwrap_or_default();
            if earlier.contains(&name) {
                found.push(Removal {
                    migration: migration.to_string(),
                    kind,
                    name,
                });
            }
            continue;
        }
        while ["if", "exists"].contains(&after(offset).as_str()) {
            offset += 1;
        }
        let name = after(offset);
        if earlier.contains(&name) {
            found.push(Removal {
                migration: migration.to_string(),
                kind,
                name,
            });
        }
    }
    found
}

/// Every removal of something an earlier migration made, migration by migration, in order.
fn removals_of_earlier(migrations: &[(String, String)]) -> Vec<Removal> {
    let mut earlier: Vec<String> = Vec::new();
    let mut found = Vec::new();
    for (name, sql) in migrations {
        found.extend(removals(name, sql, &earlier));
        earlier.extend(created(sql));
    }
    found
}

fn shipped(backend: &str) -> Vec<(String, String)> {
    let folder = repository().join("migrations").join(backend);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .expect("the migrations folder")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "sql"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .expect("a name")
                .to_string();
            let sql = std::fs::read_to_string(&path).expect("readable");
            (name, sql)
        })
        .collect()
}

#[test]
fn no_migration_drops_or_renames_what_an_earlier_one_made_unless_it_is_a_contract_step() {
    for backend in ["postgres", "sqlite"] {
        let unmarked: Vec<Removal> = removals_of_earlier(&shipped(backend))
            .into_iter()
            .filter(|removal| {
                !CONTRACT_STEPS
                    .iter()
                    .any(|(migration, _)| *migration == removal.migration)
            })
            .collect();
        assert!(
            unmarked.is_empty(),
            "{backend}: an expand step may only add; these remove what processes of the previous release still \
             use (split them into a later contract step, and list it in CONTRACT_STEPS): {unmarked:#?}"
        );
    }
}

#[test]
fn the_migration_check_finds_drops_and_renames_of_earlier_objects_and_ignores_new_ones() {
    let migrations = vec![
        (
            "1_first.sql".to_string(),
            "CREATE TABLE IF NOT EXISTS hosts (id TEXT); CREATE OR REPLACE FUNCTION pick() RETURNS int AS $$ \
             SELECT 1 $$ LANGUAGE sql;"
                .to_string(),
        ),
        (
            "2_second.sql".to_string(),
            "CREATE TABLE scratch (id TEXT); DROP TABLE scratch; ALTER TABLE hosts ADD COLUMN region TEXT;"
                .to_string(),
        ),
        (
            "3_third.sql".to_string(),
            "DROP FUNCTION IF EXISTS pick(); ALTER TABLE hosts RENAME COLUMN region TO zone; \
             ALTER TABLE hosts RENAME TO machines;"
                .to_string(),
        ),
    ];
    let found = removals_of_earlier(&migrations);
    let named: Vec<(&str, &str, &str)> = found
        .iter()
        .map(|removal| {
            (
                removal.migration.as_str(),
                removal.kind.as_str(),
                removal.name.as_str(),
            )
        })
        .collect();
    assert_eq!(
        named,
        [
            ("3_third.sql", "function", "pick"),
            ("3_third.sql", "column (renamed)", "region"),
            ("3_third.sql", "table (renamed)", "hosts"),
        ]
    );
}

#[tokio::test]
async fn the_store_is_reached_over_tls_verified_against_its_ca_and_nothing_less() {
    // A private cluster that takes TCP connections only over TLS, its certificate issued by a CA of the test's own
    // for 127.0.0.1 (and not for `localhost`).
    let authority = Authority::new("database CA").expect("a CA");
    let identity = authority.issue(&["127.0.0.1"]).expect("a certificate");
    let cluster = PrivatePostgres::start_with_tls(&identity).await;
    let folder = tempfile::tempdir().expect("a folder");
    let ca = folder.path().join("database-ca.pem");
    std::fs::write(&ca, authority.certificate_pem()).expect("the CA is written");
    let stranger = folder.path().join("other-ca.pem");
    std::fs::write(
        &stranger,
        Authority::new("someone else")
            .expect("a CA")
            .certificate_pem(),
    )
    .expect("the other CA is written");
    let url = cluster.url("postgres");
    let with = |query: String| vec![("DATABASE_URL", format!("{url}?{query}"))];
    let dir = folder.path().to_path_buf();
    let migrate = |environment: Vec<(&'static str, String)>, log: &'static str| {
        let dir = dir.clone();
        async move { run_to_end(&["migrate"], &dir, &environment, log).await }
    };

    // verify-full against the CA: the release step migrates over TLS.
    let verified = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    let (status, log) = migrate(with(verified.clone()), "verified.log").await;
    assert!(status.success(), "verify-full with the CA: {log}");

    // A certificate another CA issued is refused, as is a name the certificate does not carry.
    let (status, log) = migrate(
        with(format!(
            "sslmode=verify-full&sslrootcert={}",
            stranger.display()
        )),
        "stranger.log",
    )
    .await;
    assert!(!status.success(), "another CA was trusted: {log}");
    assert!(log.to_lowercase().contains("certificate"), "{log}");
    let by_name = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        url.replace("127.0.0.1", "localhost"),
        ca.display()
    );
    let (status, log) = migrate(vec![("DATABASE_URL", by_name)], "by-name.log").await;
    assert!(!status.success(), "a name the certificate lacks: {log}");

    // Without TLS the server itself refuses.
    let (status, log) = migrate(with("sslmode=disable".to_string()), "plain.log").await;
    assert!(!status.success(), "a connection without TLS: {log}");

    // The schema the verified run made is there (read over TLS as well).
    let (status, log) = run_to_end(
        &["projections", "status"],
        folder.path(),
        &with(verified),
        "status.log",
    )
    .await;
    assert!(status.success(), "{log}");
}
