//! The OpenAPI document served at `/openapi.json`: poem-openapi's, completed with what it cannot see.
//!
//! - The answers every operation can give that are made outside its handler, by the extractors and the request
//!   middleware: `400` for a parameter or body that does not parse, `401` (and `403` for admin endpoints) for a
//!   refused token, `413` and `415` for a body too large or not JSON, `503` while the server shuts down. They are
//!   all `{"error": CODE}` JSON bodies (`middleware` turns the extractors' plain-text errors into that shape).
//! - The bounds of each integer format, which the server's parsers enforce: a `uint32` above 4294967295 is refused,
//!   so the document says so, and a client (or a fuzzer) that keeps to the document is never refused for it.
//!
//! - One entry per path: poem-openapi writes a path once per `#[OpenApi]` impl that serves it (`GET
//!   /admin/instances` in one, `POST` in another), and a JSON reader keeps only the last; the operations are merged.
//!
//! The same document gives every route's methods, for the `Allow` header of a `405`.

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The media type of every JSON answer, as poem-openapi declares it.
pub const JSON: &str = "application/json; charset=utf-8";

/// The security scheme whose refusals include `403` (a token without scope `admin`).
const ADMIN_SCHEME: &str = "AdminAuth";

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

/// Completes poem-openapi's document (see the module documentation).
pub fn complete(spec: &str) -> Result<Value, serde_json::Error> {
    let raw: RawDocument = serde_json::from_str(spec)?;
    let mut document = Value::Object(raw.rest);
    document["paths"] = Value::Object(raw.paths.0);
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
    let responses = operation.entry("responses").or_insert_with(|| json!({}));
    if let Some(responses) = responses.as_object_mut() {
        for (status, description) in added {
            responses
                .entry(status)
                .or_insert_with(|| error_response(description));
        }
    }
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { JSON: { "schema": { "$ref": "#/components/schemas/ErrorBody" } } }
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
}
