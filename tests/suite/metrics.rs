//! `/metrics` by Prometheus's conventions: every metric described, named with its unit, histograms with buckets
//! that fit them, the build it runs; checked by `promtool check metrics` (Debian's `prometheus` package) over a
//! live server's answer, and against the catalogue every call site must be listed in
//! (`whist_api::telemetry::catalogue`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use whist_api::telemetry::catalogue::{self, CATALOGUE};
use whist_tests::{assign_body, launch_spec, spawn_app, user_token, TestApp, TestDatabase};

async fn scrape(app: &TestApp) -> String {
    app.metrics().await
}

/// `whist --version`'s version and git commit: `whist 0.1.0 (<commit>)`.
fn whist_version() -> (String, String) {
    let output = std::process::Command::new(crate::whist_binary())
        .arg("--version")
        .output()
        .expect("whist --version runs");
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    let rest = text.trim().strip_prefix("whist ").expect("whist <version>");
    let (version, commit) = rest.split_once(" (").expect("<version> (<commit>)");
    let commit = commit.strip_suffix(')').expect("(<commit>)");
    (version.to_string(), commit.to_string())
}

/// `promtool check metrics` over `text`, from a file of its own: what promtool printed, or `None` when it found
/// nothing to complain about. Panics when promtool is missing (`.ci/run` installs it).
fn promtool_complaints(text: &str) -> Option<String> {
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    file.write_all(text.as_bytes()).expect("written");
    let input = std::fs::File::open(file.path()).expect("opened again");
    let output = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(input)
        .output()
        .unwrap_or_else(|error| {
            panic!("promtool runs (apt-get install prometheus, as .ci/run does): {error}")
        });
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (!output.status.success() || !printed.trim().is_empty())
        .then(|| format!("promtool exited {}:\n{printed}", output.status))
}

/// The `# TYPE` of each metric in `text`, and the names that have a `# HELP`.
fn types_and_helps(text: &str) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let mut types = BTreeMap::new();
    let mut helps = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE <name> <type>");
            types.insert(name.to_string(), kind.to_string());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            if !help.trim().is_empty() {
                helps.insert(name.to_string());
            }
        }
    }
    (types, helps)
}

#[tokio::test]
async fn a_live_servers_metrics_pass_promtool_with_help_units_buckets_and_the_build() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    app.active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 4)
        .await;
    for session in 1..=2 {
        let user = format!("auth0|{}", uuid::Uuid::new_v4().simple());
        let (status, body) = app
            .assign(
                &user_token(&user),
                assign_body(&["us-east-1"], "hash-a", session),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // The spin-up jobs' outcomes are written in batches once the host has answered.
    assert!(
        whist_tests::eventually(Duration::from_secs(20), || async {
            scrape(&app)
                .await
                .contains("whist_job_outcome_batch_jobs_bucket")
        })
        .await,
        "the reconciler wrote the spin-ups' outcomes"
    );
    let text = scrape(&app).await;
    app.stop().await;

    if let Some(complaints) = promtool_complaints(&text) {
        panic!("{complaints}\n{text}");
    }
    let (types, helps) = types_and_helps(&text);
    for (name, kind) in &types {
        assert!(helps.contains(name), "{name} has a # HELP:\n{text}");
        let listed =
            catalogue::find(name).unwrap_or_else(|| panic!("{name} is in the catalogue:\n{text}"));
        assert_eq!(
            listed.kind.as_str(),
            kind,
            "{name} is rendered as the catalogue's type"
        );
    }
    // The histograms an assign records, each with its own buckets: seconds for latencies, counts for batches.
    for (histogram, first_bucket) in [
        ("whist_http_request_duration_seconds", "0.001"),
        ("whist_assign_seconds", "0.001"),
        ("whist_assign_phase_seconds", "0.001"),
        ("whist_append_batch_units", "1"),
        ("whist_job_outcome_batch_jobs", "1"),
    ] {
        assert_eq!(
            types.get(histogram).map(String::as_str),
            Some("histogram"),
            "{histogram} is exported:\n{text}"
        );
        assert!(
            text.lines()
                .any(|line| line.starts_with(&format!("{histogram}_bucket"))
                    && line.contains(&format!("le=\"{first_bucket}\""))),
            "{histogram}'s first bucket is {first_bucket}:\n{text}"
        );
    }
    assert!(
        !text.contains("whist_append_batch_units_bucket{le=\"0.001\"}"),
        "a batch's size is not bucketed in seconds:\n{text}"
    );
    // The build: the version and commit `whist --version` prints.
    let (version, commit) = whist_version();
    assert_ne!(commit, "unknown", "the suite is built in a git checkout");
    let build_info = text
        .lines()
        .find(|line| line.starts_with("whist_build_info{"))
        .unwrap_or_else(|| panic!("whist_build_info is exported:\n{text}"));
    assert!(
        build_info.contains(&format!("version=\"{version}\""))
            && build_info.contains(&format!("git_commit=\"{commit}\""))
            && build_info.ends_with(" 1"),
        "{build_info} names version {version} and commit {commit}, with the value 1"
    );
    assert!(
        types.contains_key("whist_projection_lag_events"),
        "the projections' lag is counted in events:\n{text}"
    );
}

/// Every `counter!`, `gauge!` and `histogram!` in the crates' sources with a literal name: (macro, name, file).
fn call_sites() -> Vec<(String, String, PathBuf)> {
    // The suite belongs to the `whist` crate, at the workspace's root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    let mut folders: Vec<PathBuf> = [
        "adapters/src",
        "api/src",
        "projections/src",
        "domain/src",
        "src",
    ]
    .iter()
    .map(|folder| root.join(folder))
    .collect();
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("a source folder") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                files.push(path);
            }
        }
    }
    let mut sites = Vec::new();
    for file in files {
        let source = std::fs::read_to_string(&file).expect("a source file");
        for kind in ["counter", "gauge", "histogram"] {
            let call = format!("{kind}!(");
            for (start, _) in source.match_indices(&call) {
                // `describe_counter!(` and the like are not call sites.
                let before = source[..start].chars().next_back();
                if before.is_some_and(|character| character.is_alphanumeric() || character == '_') {
                    continue;
                }
                let after = source[start + call.len()..].trim_start();
                let Some(quoted) = after.strip_prefix('"') else {
                    continue;
                };
                let name = quoted.split('"').next().unwrap_or_default();
                sites.push((kind.to_string(), name.to_string(), file.clone()));
            }
        }
    }
    sites
}

#[test]
fn every_metric_the_code_records_is_in_the_catalogue_with_its_type_and_every_listed_one_is_recorded(
) {
    let sites = call_sites();
    assert!(sites.len() > 20, "the call sites are found: {sites:?}");
    for (kind, name, file) in &sites {
        let listed = catalogue::find(name).unwrap_or_else(|| {
            panic!(
                "{name} ({}) is described in api/src/telemetry/catalogue.rs",
                file.display()
            )
        });
        assert_eq!(
            listed.kind.as_str(),
            kind,
            "{name} ({}) is a {kind} in the catalogue too",
            file.display()
        );
    }
    for metric in CATALOGUE {
        assert!(
            sites.iter().any(|(_, name, _)| name == metric.name),
            "{} is recorded somewhere",
            metric.name
        );
    }
}
