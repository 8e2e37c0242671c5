//! The OpenAPI document served at `/openapi.json`: poem-openapi's, completed with what it cannot see.
//!
//! - The answers every operation can give that are made outside its handler, by the extractors and the request
//!   middleware: `400` for a parameter or body that does not parse, `401` (and `403` for admin endpoints) for a
//!   refused token, `413` and `415` for a body too large or not JSON, `503` while the server shuts down. They are
//!   all `{"error": CODE}` JSON bodies (`middleware` turns the extractors' plain-text errors into that shape).
//! - The bounds of each integer format, which the server's parsers enforce: a `uint32` above 4294967295 is refused,
//!   so the document says so, and a client (or a fuzzer) that keeps to the document is never refused for it.
//!
//! - The pages served beside the API (`/dashboard`, `/docs`, `/openapi.json`), which the contract lists too.
//! - One entry per path: poem-openapi writes a path once per `#[OpenApi]` impl that serves it (`GET
//!   /admin/instances` in one, `POST` in another), and a JSON reader keeps only the last; the operations are merged.
//! - An explicit empty `security` on the operations that take no token ([`PUBLIC_OPERATIONS`]): poem-openapi writes
//!   `security` only for the operations that take a scheme, and a reader cannot tell "public" from "forgotten".
//! - An example of every error answer, `{"error": CODE}` with the code that operation answers ([`error_example`]):
//!   poem-openapi takes examples only from schemas, and `ErrorBody` is one schema for every code.
//!
//! The same document gives every route's methods, for the `Allow` header of a `405`. `/docs` is Swagger UI over the
//! served document itself ([`SwaggerUi`]), not over poem-openapi's.

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The media type of every JSON answer, as poem-openapi declares it.
pub const JSON: &str = "application/json; charset=utf-8";

/// The security scheme whose refusals include `403` (a token without scope `admin`).
const ADMIN_SCHEME: &str = "AdminAuth";

/// The operations that take no token, by `operationId`: their document says so with an empty `security`. Any other
/// operation declares its scheme by taking it as a parameter (`tests/suite/openapi.rs` fails on one that does
/// neither).
pub const PUBLIC_OPERATIONS: [&str; 10] = [
    "getHealth",
    "getReadiness",
    "getMetrics",
    "listRegions",
    // HireFire's credential is the secret path segment, which the handler compares.
    "testHireFire",
    "getHireFireInfo",
    // Stripe's proof is the body's signature, which the handler checks.
    "receiveStripeWebhook",
    // The pages: the dashboard asks for its admin token in the browser.
    "getDashboard",
    "getDocs",
    "getOpenApiDocument",
];

/// The code an error answer's example shows when it is not the usual one for its status: (operationId, status,
/// code), from the handler's own answers.
const ERROR_CODES: [(&str, &str, &str); 10] = [
    ("registerHost", "401", "UNKNOWN_OR_USED_TOKEN"),
    ("registerHost", "409", "IDENTITY_MISMATCH"),
    ("receiveStripeWebhook", "400", "BAD_SIGNATURE"),
    ("launchInstances", "409", "REGION_NOT_ENABLED"),
    ("drainInstance", "409", "HOST_ENDED"),
    ("terminateInstance", "409", "HOST_ENDED"),
    ("rebuildProjection", "404", "UNKNOWN_PROJECTION"),
    ("rebuildProjection", "409", "NOT_REBUILDABLE"),
    ("listAggregateEvents", "404", "UNKNOWN_AGGREGATE_TYPE"),
    ("getAggregateState", "404", "NO_EVENTS"),
];

/// The usual code of an error answer with `status` (the extractors', the middleware's and most handlers').
fn usual_error_code(status: &str) -> Option<&'static str> {
    Some(match status {
        "400" => "INVALID_REQUEST",
        "401" => "UNAUTHORIZED",
        "402" => "That resource is only available to Whist subscribers",
        "403" => "FORBIDDEN",
        "404" => "NOT_FOUND",
        "410" => "HOST_DONE",
        "413" => "PAYLOAD_TOO_LARGE",
        "415" => "UNSUPPORTED_MEDIA_TYPE",
        "429" => "RATE_LIMITED",
        "502" => "STRIPE_UNAVAILABLE",
        "503" => crate::http::error::STORE_UNAVAILABLE,
        _ => return None,
    })
}

/// The example of an error answer of the operation `operation_id` with `status`, when its body is an `ErrorBody`.
pub fn error_example(operation_id: &str, status: &str) -> Option<Value> {
    ERROR_CODES
        .iter()
        .find(|(operation, code_status, _)| *operation == operation_id && *code_status == status)
        .map(|(_, _, code)| *code)
        .or_else(|| usual_error_code(status))
        .map(|code| json!({ "error": code }))
}

/// Examples of error answers whose body is not an `ErrorBody`: (operationId, status, example).
fn other_error_example(operation_id: &str, status: &str) -> Option<Value> {
    match (operation_id, status) {
        ("assignMandelbox", "503") => Some(json!({
            "ip": "",
            "mandelbox_id": "",
            "error": "NO_INSTANCE_AVAILABLE"
        })),
        ("getReadiness", "503") => Some(json!({ "status": "event store unreachable" })),
        _ => None,
    }
}

/// `paths`, with the operations of a path written more than once merged.
struct MergedPaths(Map<String, Value>);

impl<'de> Deserialize<'de> for MergedPaths {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PathsVisitor;
        impl<'de> Visitor<'de> for PathsVisitor {
            type Value = MergedPaths;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("the paths of an OpenAPI document")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MergedPaths, A::Error> {
                let mut paths = Map::new();
                while let Some((path, item)) = map.next_entry::<String, Value>()? {
                    match (paths.get_mut(&path), item) {
                        (Some(Value::Object(known)), Value::Object(more)) => known.extend(more),
                        (_, item) => {
                            paths.insert(path, item);
                        }
                    }
                }
                Ok(MergedPaths(paths))
            }
        }
        deserializer.deserialize_map(PathsVisitor)
    }
}

#[derive(Deserialize)]
struct RawDocument {
    paths: MergedPaths,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The pages the webserver serves beside its API (plain poem routes, in `startup.rs` and `dashboard.rs`): the
/// contract lists them with the endpoints, so the document does too.
fn pages() -> Map<String, Value> {
    let html = json!({ "type": "string" });
    let page = |operation_id: &str,
                tag: &str,
                summary: &str,
                description: &str,
                media: &str,
                schema: &Value| {
        json!({ "get": {
            "tags": [tag],
            "summary": summary,
            "description": description,
            "operationId": operation_id,
            "security": [],
            "responses": { "200": {
                "description": summary,
                "content": { media: { "schema": schema } }
            } }
        } })
    };
    let mut pages = Map::new();
    pages.insert(
        "/dashboard".to_string(),
        page(
            "getDashboard",
            "Admin",
            "Open the operator dashboard.",
            "An HTML page. It asks for an admin token in the browser, then reads the admin endpoints with it.",
            "text/html; charset=utf-8",
            &html,
        ),
    );
    pages.insert(
        "/docs".to_string(),
        page(
            "getDocs",
            "Operations",
            "Read this document in Swagger UI.",
            "An HTML page that loads `/openapi.json`.",
            "text/html; charset=utf-8",
            &html,
        ),
    );
    pages.insert(
        "/openapi.json".to_string(),
        page(
            "getOpenApiDocument",
            "Operations",
            "Read this document.",
            "OpenAPI 3 for every endpoint of the webserver.",
            JSON,
            &json!({ "type": "object" }),
        ),
    );
    pages
}

/// Completes poem-openapi's document (see the module documentation).
pub fn complete(spec: &str) -> Result<Value, serde_json::Error> {
    let raw: RawDocument = serde_json::from_str(spec)?;
    let mut document = Value::Object(raw.rest);
    let mut paths = raw.paths.0;
    for (path, item) in pages() {
        paths.entry(path).or_insert(item);
    }
    document["paths"] = Value::Object(paths);
    if let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) {
        for item in paths.values_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for operation in item.values_mut() {
                if let Some(operation) = operation.as_object_mut() {
                    complete_operation(operation);
                }
            }
        }
    }
    bound_integers(&mut document);
    Ok(document)
}

fn complete_operation(operation: &mut Map<String, Value>) {
    let has_parameters = operation
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(|parameters| !parameters.is_empty());
    let has_body = operation.contains_key("requestBody");
    let schemes: Vec<String> = operation
        .get("security")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(|requirement| requirement.keys().cloned())
        .collect();
    let mut added = Vec::new();
    if has_parameters || has_body {
        added.push((
            "400",
            "A parameter or the body does not parse or is out of range.",
        ));
    }
    if !schemes.is_empty() {
        added.push(("401", "No token, or a token that is refused."));
    }
    if schemes.iter().any(|scheme| scheme == ADMIN_SCHEME) {
        added.push(("403", "A valid token without scope `admin`."));
    }
    if has_body {
        added.push(("413", "The body is over 1 MiB."));
        added.push(("415", "The body is not `application/json`."));
    }
    added.push((
        "503",
        "The server is shutting down, or its store is unreachable.",
    ));
    let operation_id = operation
        .get("operationId")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if schemes.is_empty() && PUBLIC_OPERATIONS.contains(&operation_id.as_str()) {
        operation.insert("security".to_string(), json!([]));
    }
    let responses = operation.entry("responses").or_insert_with(|| json!({}));
    if let Some(responses) = responses.as_object_mut() {
        for (status, description) in added {
            responses
                .entry(status)
                .or_insert_with(|| error_response(description));
        }
        for (status, response) in responses.iter_mut() {
            if status.starts_with('4') || status.starts_with('5') {
                add_error_example(&operation_id, status, response);
            }
        }
    }
}

/// Gives each JSON content of an error answer its example, unless it has one.
fn add_error_example(operation_id: &str, status: &str, response: &mut Value) {
    let Some(content) = response.get_mut("content").and_then(Value::as_object_mut) else {
        return;
    };
    for media in content.values_mut() {
        let Some(media) = media.as_object_mut() else {
            continue;
        };
        if media.contains_key("example") {
            continue;
        }
        let is_error_body = media
            .get("schema")
            .and_then(|schema| schema.get("$ref"))
            .and_then(Value::as_str)
            == Some(ERROR_BODY_REF);
        let example = if is_error_body {
            error_example(operation_id, status)
        } else {
            other_error_example(operation_id, status)
        };
        if let Some(example) = example {
            media.insert("example".to_string(), example);
        }
    }
}

/// The reference to the `{"error": CODE}` schema.
const ERROR_BODY_REF: &str = "#/components/schemas/ErrorBody";

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { JSON: { "schema": { "$ref": ERROR_BODY_REF } } }
    })
}

/// The range each integer format's parser accepts.
fn format_bounds(format: &str) -> Option<(Value, Value)> {
    Some(match format {
        "int8" => (json!(i8::MIN), json!(i8::MAX)),
        "int16" => (json!(i16::MIN), json!(i16::MAX)),
        "int32" => (json!(i32::MIN), json!(i32::MAX)),
        "int64" => (json!(i64::MIN), json!(i64::MAX)),
        "uint8" => (json!(0), json!(u8::MAX)),
        "uint16" => (json!(0), json!(u16::MAX)),
        "uint32" => (json!(0), json!(u32::MAX)),
        "uint64" => (json!(0), json!(u64::MAX)),
        _ => return None,
    })
}

/// Adds `minimum`/`maximum` to every integer schema whose format bounds it and that states no bound of its own.
fn bound_integers(value: &mut Value) {
    match value {
        Value::Object(object) => {
            let bounds = (object.get("type") == Some(&json!("integer")))
                .then(|| object.get("format").and_then(Value::as_str))
                .flatten()
                .and_then(format_bounds);
            if let Some((minimum, maximum)) = bounds {
                object.entry("minimum").or_insert(minimum);
                object.entry("maximum").or_insert(maximum);
            }
            for child in object.values_mut() {
                bound_integers(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(bound_integers),
        _ => {}
    }
}

/// The methods of each path of the document, as (path template split in segments, methods).
#[derive(Debug, Clone, Default)]
pub struct Methods {
    routes: Vec<(Vec<String>, Vec<String>)>,
}

impl Methods {
    /// Reads the paths of a completed document, plus routes served outside it.
    pub fn of(document: &Value, extra: &[(&str, &[&str])]) -> Self {
        let mut routes = Vec::new();
        if let Some(paths) = document.get("paths").and_then(Value::as_object) {
            for (path, item) in paths {
                let methods = item
                    .as_object()
                    .map(|item| {
                        item.keys()
                            .filter(|key| {
                                matches!(
                                    key.as_str(),
                                    "get"
                                        | "put"
                                        | "post"
                                        | "delete"
                                        | "patch"
                                        | "head"
                                        | "options"
                                )
                            })
                            .map(|key| key.to_uppercase())
                            .collect()
                    })
                    .unwrap_or_default();
                routes.push((segments(path), methods));
            }
        }
        for (path, methods) in extra {
            routes.push((
                segments(path),
                methods.iter().map(|method| method.to_string()).collect(),
            ));
        }
        Self { routes }
    }

    /// The route that serves `path`: of the templates that match it, the one with the most literal segments
    /// (`/mandelbox/assign` before `/mandelbox/{mandelbox_id}`).
    fn route(&self, path: &str) -> Option<&(Vec<String>, Vec<String>)> {
        let requested = segments(path);
        self.routes
            .iter()
            .filter(|(template, _)| {
                template.len() == requested.len()
                    && template
                        .iter()
                        .zip(&requested)
                        .all(|(expected, given)| expected.starts_with('{') || expected == given)
            })
            .max_by_key(|(template, _)| {
                template
                    .iter()
                    .filter(|segment| !segment.starts_with('{'))
                    .count()
            })
    }

    /// The template of the route that serves `path` (`/mandelbox/{mandelbox_id}`), if one does: what metrics and
    /// logs name a request by, so that neither ids nor secrets in a path become labels.
    pub fn template(&self, path: &str) -> Option<String> {
        self.route(path)
            .map(|(template, _)| format!("/{}", template.join("/")))
    }

    /// The `Allow` header value for `path`, if a route matches it.
    pub fn allow(&self, path: &str) -> Option<String> {
        let (_, methods) = self.route(path)?;
        let mut methods = methods.clone();
        if methods.iter().any(|method| method == "GET") && !methods.iter().any(|m| m == "HEAD") {
            methods.push("HEAD".to_string());
        }
        Some(methods.join(", "))
    }
}

fn segments(path: &str) -> Vec<String> {
    path.trim_matches('/')
        .split('/')
        .map(str::to_string)
        .collect()
}

/// `/docs`: Swagger UI over the document served at `/openapi.json`, loaded by the browser from there, so that what a
/// reader sees is what clients are told (poem-openapi's own page embeds its uncompleted document instead). Swagger
/// UI's script and style are the ones poem-openapi bundles, served by the webserver itself: nothing is fetched from
/// another origin.
#[derive(Clone)]
pub struct SwaggerUi {
    /// `swagger-ui.css`.
    pub css: bytes::Bytes,
    /// `swagger-ui-bundle.js`.
    pub script: bytes::Bytes,
}

impl SwaggerUi {
    /// The page at `/docs`.
    pub const PAGE: &'static str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Whist webserver API</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
<div id="ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>
SwaggerUIBundle({ dom_id: "#ui", url: "/openapi.json", deepLinking: true, validatorUrl: null });
</script>
</body>
</html>
"##;

    /// The assets poem-openapi bundles, taken from its own Swagger UI page (`bundled_page`, from
    /// `OpenApiService::swagger_ui_html`), which inlines them: the first `<style>` and `<script>` elements. `None`
    /// if that page no longer has them (a unit test fails first).
    pub fn from_bundled_page(bundled_page: &str) -> Option<Self> {
        let css = element_text(bundled_page, "<style", "</style>")?;
        let script = element_text(bundled_page, "<script", "</script>")?;
        (script.contains("SwaggerUIBundle") && !css.trim().is_empty()).then(|| Self {
            css: bytes::Bytes::copy_from_slice(css.as_bytes()),
            script: bytes::Bytes::copy_from_slice(script.as_bytes()),
        })
    }
}

/// The text of the first element of `html` that opens with `open` (a tag name with its `<`) and closes with `close`.
fn element_text<'a>(html: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = html.find(open)?;
    let text_start = start + html[start..].find('>')? + 1;
    let text_end = text_start + html[text_start..].find(close)?;
    Some(&html[text_start..text_end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r##"{
        "openapi": "3.0.0",
        "paths": {
            "/admin/instances/{instance_id}": {
                "delete": {"security": [{"AdminAuth": []}], "parameters": [{"name": "instance_id"}],
                           "responses": {"200": {"description": "done"}}}
            },
            "/regions": {"get": {"responses": {"200": {"description": "the list"}}}},
            "/mandelbox/assign": {
                "post": {"security": [{"UserAuth": []}], "requestBody": {},
                         "responses": {"200": {"description": "a slot"}, "503": {"description": "no slot"}}}
            }
        },
        "components": {"schemas": {"Body": {"type": "object", "properties": {
            "capacity": {"type": "integer", "format": "uint32"},
            "count": {"type": "integer", "format": "uint32", "maximum": 50}
        }}}}
    }"##;

    #[test]
    fn every_operation_declares_the_answers_made_outside_its_handler() {
        let document = complete(SPEC).expect("a document");
        let statuses = |path: &str, method: &str| -> Vec<String> {
            let mut statuses: Vec<String> = document["paths"][path][method]["responses"]
                .as_object()
                .expect("responses")
                .keys()
                .cloned()
                .collect();
            statuses.sort();
            statuses
        };
        assert_eq!(
            statuses("/admin/instances/{instance_id}", "delete"),
            ["200", "400", "401", "403", "503"]
        );
        assert_eq!(statuses("/regions", "get"), ["200", "503"]);
        assert_eq!(
            statuses("/mandelbox/assign", "post"),
            ["200", "400", "401", "413", "415", "503"]
        );
        assert_eq!(
            document["paths"]["/mandelbox/assign"]["post"]["responses"]["503"]["description"],
            "no slot",
            "a declared answer is kept"
        );
    }

    #[test]
    fn a_path_written_twice_keeps_the_operations_of_both() {
        let spec = r#"{"paths": {"/admin/instances": {"get": {"responses": {}}},
                                "/admin/instances": {"post": {"responses": {}}}}}"#;
        let document = complete(spec).expect("a document");
        let item = document["paths"]["/admin/instances"]
            .as_object()
            .expect("the path");
        assert!(item.contains_key("get") && item.contains_key("post"));
    }

    #[test]
    fn integers_are_bounded_by_their_format_unless_bounded_already() {
        let document = complete(SPEC).expect("a document");
        let properties = &document["components"]["schemas"]["Body"]["properties"];
        assert_eq!(properties["capacity"]["minimum"], 0);
        assert_eq!(properties["capacity"]["maximum"], u32::MAX);
        assert_eq!(properties["count"]["maximum"], 50);
    }

    #[test]
    fn allow_lists_the_methods_of_the_matching_route() {
        let document = complete(SPEC).expect("a document");
        let methods = Methods::of(&document, &[("/stripe/webhook", &["POST"])]);
        assert_eq!(
            methods.allow("/admin/instances/i-123").as_deref(),
            Some("DELETE")
        );
        assert_eq!(methods.allow("/regions").as_deref(), Some("GET, HEAD"));
        assert_eq!(methods.allow("/stripe/webhook").as_deref(), Some("POST"));
        assert_eq!(methods.allow("/nowhere"), None);
    }

    #[test]
    fn a_path_is_named_by_the_template_of_its_route_and_literal_segments_win() {
        let document = complete(SPEC).expect("a document");
        let methods = Methods::of(
            &document,
            &[
                ("/hirefire/{token}/info", &["GET"]),
                ("/mandelbox/{mandelbox_id}", &["GET"]),
            ],
        );
        assert_eq!(
            methods.template("/admin/instances/0b8a3c9e").as_deref(),
            Some("/admin/instances/{instance_id}")
        );
        assert_eq!(
            methods.template("/mandelbox/assign").as_deref(),
            Some("/mandelbox/assign")
        );
        assert_eq!(
            methods.template("/hirefire/s3cret-token/info").as_deref(),
            Some("/hirefire/{token}/info")
        );
        assert_eq!(methods.template("/wp-login.php"), None);
    }

    #[test]
    fn public_operations_get_an_empty_security_and_others_keep_theirs() {
        let spec = r#"{"paths": {
            "/healthz": {"get": {"operationId": "getHealth", "responses": {}}},
            "/forgotten": {"get": {"operationId": "forgotten", "responses": {}}},
            "/mandelbox/assign": {"post": {"operationId": "assignMandelbox",
                                           "security": [{"UserAuth": []}], "responses": {}}}
        }}"#;
        let document = complete(spec).expect("a document");
        assert_eq!(document["paths"]["/healthz"]["get"]["security"], json!([]));
        assert!(document["paths"]["/forgotten"]["get"]
            .get("security")
            .is_none());
        assert_eq!(
            document["paths"]["/mandelbox/assign"]["post"]["security"],
            json!([{"UserAuth": []}])
        );
    }

    #[test]
    fn every_error_answer_gets_the_example_of_its_code() {
        let spec = r##"{"paths": {
            "/host/register": {"post": {"operationId": "registerHost", "requestBody": {},
                "security": [{"BootstrapToken": []}],
                "responses": {
                    "200": {"description": "registered"},
                    "401": {"description": "refused", "content": {"application/json; charset=utf-8":
                        {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
                }}}
        }}"##;
        let document = complete(spec).expect("a document");
        let responses = &document["paths"]["/host/register"]["post"]["responses"];
        let example = |status: &str| responses[status]["content"][JSON]["example"].clone();
        assert_eq!(example("401"), json!({"error": "UNKNOWN_OR_USED_TOKEN"}));
        assert_eq!(example("400"), json!({"error": "INVALID_REQUEST"}));
        assert_eq!(example("415"), json!({"error": "UNSUPPORTED_MEDIA_TYPE"}));
        assert_eq!(example("503"), json!({"error": "STORE_UNAVAILABLE"}));
        assert!(responses["200"].get("content").is_none());
    }

    #[test]
    fn every_error_code_override_names_an_operation_that_answers_it() {
        for (operation, status, code) in ERROR_CODES {
            assert!(
                status.starts_with('4') || status.starts_with('5'),
                "{operation} {status}"
            );
            assert_ne!(
                usual_error_code(status),
                Some(code),
                "{operation} {status}: an override that says the usual code"
            );
        }
    }

    #[test]
    fn swagger_ui_assets_are_taken_from_poem_openapis_page() {
        let page = "<html><head><style charset=\"UTF-8\">.swagger-ui{}</style>\
                    <script charset=\"UTF-8\">var SwaggerUIBundle = 1;</script></head>\
                    <body><script>let spec = {};</script></body></html>";
        let assets = SwaggerUi::from_bundled_page(page).expect("the assets");
        assert_eq!(&assets.css[..], b".swagger-ui{}");
        assert_eq!(&assets.script[..], b"var SwaggerUIBundle = 1;");
        assert!(SwaggerUi::from_bundled_page("<html></html>").is_none());
        assert!(SwaggerUi::PAGE.contains(r#"url: "/openapi.json""#));
    }
}
