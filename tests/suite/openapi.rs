//! The OpenAPI document a live server serves at `/openapi.json`, and its Swagger UI at `/docs`: the document is
//! valid OpenAPI 3 (by `openapi-spec-validator`, from PyPI), every operation in it is complete (a stable
//! `operationId`, a one-line summary, its security requirement, examples of its request body and error answers),
//! every endpoint of the contract is in it, the webhook is documented as it answers, and `/docs` is Swagger UI over
//! that same document, served by the server itself. (The browser test in `console.rs` renders `/docs`.)

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use whist_tests::{spawn_app, stripe_signature, TestApp, TestDatabase, STRIPE_WEBHOOK_SECRET};

const METHODS: [&str; 7] = ["get", "put", "post", "delete", "patch", "head", "options"];

async fn served_document(app: &TestApp) -> Value {
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    response.json().await.expect("the document is JSON")
}

/// Every operation of the document: (method, path, operation).
fn operations(document: &Value) -> Vec<(String, String, Value)> {
    let mut operations = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            if METHODS.contains(&method.as_str()) {
                operations.push((method.clone(), path.clone(), operation.clone()));
            }
        }
    }
    operations
}

/// Whether a media type object has an example: its own, or its schema's (through a `$ref`).
fn has_example(document: &Value, media: &Value) -> bool {
    if media.get("example").is_some() || media.get("examples").is_some() {
        return true;
    }
    let schema = &media["schema"];
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference.rsplit('/').next().unwrap_or_default();
            document["components"]["schemas"][name]
                .get("example")
                .is_some()
        }
        None => schema.get("example").is_some(),
    }
}

#[tokio::test]
async fn the_served_openapi_document_is_valid_openapi_3() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let document = served_document(&app).await;
    app.stop().await;
    let folder = tempfile::tempdir().expect("a folder");
    let file = folder.path().join("openapi.json");
    std::fs::write(&file, document.to_string()).expect("the document is written");
    let output = tokio::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .await
        .expect("python3 runs");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !printed.contains("No module named"),
        "openapi-spec-validator is installed (.ci/run: pip install openapi-spec-validator): {printed}"
    );
    assert!(output.status.success(), "{printed}");
    assert!(printed.contains("OK"), "{printed}");
}

#[tokio::test]
async fn every_operation_has_an_operation_id_a_summary_a_security_requirement_and_examples() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let document = served_document(&app).await;
    app.stop().await;
    let schemes: BTreeSet<&String> = document["components"]["securitySchemes"]
        .as_object()
        .expect("security schemes")
        .keys()
        .collect();
    let mut operation_ids = BTreeMap::new();
    let mut problems = Vec::new();
    for (method, path, operation) in operations(&document) {
        let name = format!("{} {path}", method.to_uppercase());
        match operation["operationId"].as_str() {
            Some(id)
                if id.starts_with(|first: char| first.is_ascii_lowercase())
                    && id.chars().all(|c| c.is_ascii_alphanumeric()) =>
            {
                if let Some(other) = operation_ids.insert(id.to_string(), name.clone()) {
                    problems.push(format!("{name}: operationId {id} is also {other}'s"));
                }
            }
            other => problems.push(format!("{name}: operationId {other:?} is not camelCase")),
        }
        match operation["summary"].as_str() {
            Some(summary) if !summary.trim().is_empty() && !summary.contains('\n') => {}
            other => problems.push(format!("{name}: summary {other:?} is not one line")),
        }
        match operation["security"].as_array() {
            Some(requirements) => {
                for scheme in requirements
                    .iter()
                    .filter_map(Value::as_object)
                    .flat_map(|requirement| requirement.keys())
                {
                    if !schemes.contains(scheme) {
                        problems.push(format!("{name}: security scheme {scheme} is not declared"));
                    }
                }
            }
            None => problems.push(format!(
                "{name}: no security requirement (public operations have an empty one)"
            )),
        }
        if let Some(body) = operation.get("requestBody") {
            for (media_type, media) in body["content"].as_object().expect("content") {
                if !has_example(&document, media) {
                    problems.push(format!("{name}: the {media_type} body has no example"));
                }
            }
        }
        for (status, response) in operation["responses"].as_object().expect("responses") {
            if !(status.starts_with('4') || status.starts_with('5')) {
                continue;
            }
            let content = response["content"].as_object();
            if content.is_none_or(|content| content.is_empty()) {
                problems.push(format!("{name}: the {status} answer has no body"));
            }
            for (media_type, media) in content.into_iter().flatten() {
                if media_type.contains("json") && !has_example(&document, media) {
                    problems.push(format!("{name}: the {status} answer has no example"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        operation_ids.len() >= 30,
        "every operation is counted: {operation_ids:?}"
    );
}

/// Every endpoint the contract (`../shared/CONTRACT.md`) gives the webserver, as (method, path template): kept here
/// so that the suite runs in a clone without the shared folder, and held to the contract's text by
/// `the_contract_endpoints_kept_here_are_the_contracts` wherever that text is at hand.
const CONTRACT_ENDPOINTS: &[(&str, &str)] = &[
    ("post", "/mandelbox/assign"),
    ("get", "/mandelbox/{mandelbox_id}"),
    ("get", "/regions"),
    ("get", "/payment_portal_url"),
    ("post", "/host/register"),
    ("post", "/host/heartbeat"),
    ("post", "/host/mandelbox/{mandelbox_id}/status"),
    ("post", "/mandelbox/{mandelbox_id}/disconnect"),
    ("post", "/stripe/webhook"),
    ("get", "/hirefire/test"),
    ("get", "/hirefire/{HIREFIRE_TOKEN}/info"),
    ("get", "/admin/events"),
    (
        "get",
        "/admin/aggregates/{aggregate_type}/{aggregate_id}/events",
    ),
    ("get", "/admin/aggregates/{aggregate_type}/{aggregate_id}"),
    ("get", "/admin/projections"),
    ("post", "/admin/projections/{name}/rebuild"),
    ("get", "/admin/instances"),
    ("get", "/admin/mandelboxes"),
    ("post", "/admin/instances"),
    ("post", "/admin/instances/{instance_id}/drain"),
    ("delete", "/admin/instances/{instance_id}"),
    ("put", "/admin/maintenance"),
    ("get", "/dashboard"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/docs"),
];

/// The contract's text (`WHIST_CONTRACT`, else `../shared/CONTRACT.md` beside the checkout), when it is at hand.
fn contract_text() -> Option<(String, String)> {
    let file = std::env::var("WHIST_CONTRACT").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/CONTRACT.md").to_string()
    });
    std::fs::read_to_string(&file).ok().map(|text| (file, text))
}

/// Every endpoint the contract's text gives the webserver, as (method, path template): each `` `METHOD /path` ``
/// in code, except the host service's own endpoints that the webserver calls.
fn contract_endpoints(text: &str) -> Vec<(String, String)> {
    let mut endpoints = Vec::new();
    let mut host_service_side = false;
    for line in text.lines() {
        if line.starts_with('#') {
            host_service_side = false;
        }
        if line.starts_with("Webserver → host service") {
            host_service_side = true;
        }
        if host_service_side {
            continue;
        }
        for code in line.split('`').skip(1).step_by(2) {
            let Some((method, rest)) = code.split_once(' ') else {
                continue;
            };
            if !METHODS.contains(&method.to_lowercase().as_str()) || !rest.starts_with('/') {
                continue;
            }
            let path = rest.split(['?', ' ']).next().unwrap_or_default();
            endpoints.push((method.to_lowercase(), path.to_string()));
        }
    }
    endpoints
}

#[test]
fn the_contract_endpoints_kept_here_are_the_contracts() {
    let Some((file, text)) = contract_text() else {
        // A clone without the shared folder (CI): the list above stands for the contract.
        eprintln!("the contract is not at hand here; CONTRACT_ENDPOINTS is checked where it is");
        return;
    };
    let read: BTreeSet<(String, String)> = contract_endpoints(&text).into_iter().collect();
    let kept: BTreeSet<(String, String)> = CONTRACT_ENDPOINTS
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    assert!(
        read.len() >= 25,
        "the contract's endpoints are read from {file}: {read:?}"
    );
    assert_eq!(kept, read, "CONTRACT_ENDPOINTS differs from {file}");
}

/// A path template with its parameters unnamed (`/hirefire/{}/info`).
fn unnamed(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                "{}"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn every_endpoint_of_the_contract_is_in_the_document() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let document = served_document(&app).await;
    app.stop().await;
    let documented: BTreeSet<(String, String)> = operations(&document)
        .into_iter()
        .map(|(method, path, _)| (method, unnamed(&path)))
        .collect();
    let missing: Vec<String> = CONTRACT_ENDPOINTS
        .iter()
        .filter(|(method, path)| !documented.contains(&(method.to_string(), unnamed(path))))
        .map(|(method, path)| format!("{} {path}", method.to_uppercase()))
        .collect();
    assert!(missing.is_empty(), "not in /openapi.json: {missing:?}");
}

#[tokio::test]
async fn the_stripe_webhook_is_documented_as_it_answers() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let document = served_document(&app).await;
    let webhook = &document["paths"]["/stripe/webhook"]["post"];
    assert_eq!(webhook["operationId"], "receiveStripeWebhook");
    assert_eq!(webhook["security"], serde_json::json!([]));
    let signature = webhook["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .find(|parameter| parameter["name"] == "Stripe-Signature")
        .expect("the Stripe-Signature header");
    assert_eq!(signature["in"], "header");
    assert_eq!(signature["required"], true);
    let body = &webhook["requestBody"]["content"]["application/json"];
    assert_eq!(body["schema"]["$ref"], "#/components/schemas/StripeEvent");
    let statuses: BTreeSet<&String> = webhook["responses"]
        .as_object()
        .expect("responses")
        .keys()
        .collect();
    assert_eq!(
        statuses.into_iter().cloned().collect::<Vec<_>>(),
        ["200", "400", "413", "415", "503"]
    );

    // The documented example, signed as Stripe signs it, is taken; the same bytes with a wrong signature are
    // refused with the documented example of a 400.
    let example = document["components"]["schemas"]["StripeEvent"]["example"].to_string();
    let now = chrono::Utc::now().timestamp();
    let signed = stripe_signature(&example, STRIPE_WEBHOOK_SECRET, now);
    assert_eq!(app.deliver_webhook(&example, &signed).await, 200);
    let forged = stripe_signature(&example, "whsec_someone_else", now);
    let response = app
        .client
        .post(app.url("/stripe/webhook"))
        .header("Stripe-Signature", forged)
        .header("Content-Type", "application/json; charset=utf-8")
        .body(example.clone())
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 400);
    let refusal: Value = response.json().await.expect("a JSON refusal");
    assert_eq!(
        refusal,
        webhook["responses"]["400"]["content"]["application/json; charset=utf-8"]["example"]
    );
    // No signature at all, and a body that is not declared JSON: refused as documented, nothing read.
    for (signature, content_type, status) in [
        (None, "application/json", 400),
        (Some("t=1,v1=00"), "text/plain", 415),
    ] {
        let mut request = app
            .client
            .post(app.url("/stripe/webhook"))
            .header("Content-Type", content_type)
            .body(example.clone());
        if let Some(signature) = signature {
            request = request.header("Stripe-Signature", signature);
        }
        let response = request.send().await.expect("answers");
        assert_eq!(response.status(), status, "{content_type}");
        let refusal: Value = response.json().await.expect("a JSON refusal");
        assert!(refusal["error"].is_string(), "{refusal}");
    }
    app.stop().await;
}

#[tokio::test]
async fn documented_error_examples_are_what_the_server_answers() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let document = served_document(&app).await;
    let example = |path: &str, method: &str, status: &str| {
        document["paths"][path][method]["responses"][status]["content"]
            ["application/json; charset=utf-8"]["example"]
            .clone()
    };
    let no_token = app
        .client
        .post(app.url("/mandelbox/assign"))
        .json(&whist_tests::assign_body(&["us-east-1"], "local_dev", 1))
        .send()
        .await
        .expect("answers");
    assert_eq!(no_token.status(), 401);
    let body: Value = no_token.json().await.expect("JSON");
    assert_eq!(
        body["error"],
        example("/mandelbox/assign", "post", "401")["error"]
    );
    let unknown = app
        .client
        .get(app.url(&format!("/mandelbox/{}", uuid::Uuid::new_v4())))
        .bearer_auth(whist_tests::user_token("auth0|examples"))
        .send()
        .await
        .expect("answers");
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.expect("JSON");
    assert_eq!(body, example("/mandelbox/{mandelbox_id}", "get", "404"));
    let not_an_admin = app
        .client
        .get(app.url("/admin/instances"))
        .bearer_auth(whist_tests::user_token("auth0|examples"))
        .send()
        .await
        .expect("answers");
    assert_eq!(not_an_admin.status(), 403);
    let body: Value = not_an_admin.json().await.expect("JSON");
    assert_eq!(body, example("/admin/instances", "get", "403"));
    app.stop().await;
}

#[tokio::test]
async fn docs_is_swagger_ui_over_the_served_document_with_its_assets_served_here() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let page = app
        .client
        .get(app.url("/docs"))
        .send()
        .await
        .expect("answers");
    assert_eq!(page.status(), 200);
    let html = page.text().await.expect("a page");
    assert!(html.contains(r#"url: "/openapi.json""#), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing from another origin: {html}"
    );
    for (asset, content_type, marker) in [
        (
            "/docs/swagger-ui-bundle.js",
            "text/javascript",
            "SwaggerUIBundle",
        ),
        ("/docs/swagger-ui.css", "text/css", ".swagger-ui"),
    ] {
        assert!(html.contains(asset), "the page loads {asset}");
        let response = app
            .client
            .get(app.url(asset))
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), 200, "{asset}");
        assert!(
            response
                .headers()
                .get("content-type")
                .and_then(|value| value.to_str().ok())
                .is_some_and(|value| value.starts_with(content_type)),
            "{asset}"
        );
        let text = response.text().await.expect("the asset");
        assert!(
            text.len() > 10_000 && text.contains(marker),
            "{asset}: {} bytes",
            text.len()
        );
    }
    app.stop().await;
}
