//! Traces: a caller's W3C `traceparent` is continued through an assign, the reconciler's job it planned, the call
//! to the host service and the host's own status reports; spans reach an OTLP/HTTP receiver on loopback; log lines
//! name their trace and span.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use poem::web::Data;
use poem::{handler, post, EndpointExt, Response, Route};
use prost::Message;
use whist_tests::{admin_token, assign_body, eventually, free_port, ChildProcess};

/// The caller's trace and span, as a balancer in front of the server would send them.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// Every span the receiver was sent.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Span>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.0.lock().expect("the spans").clone()
    }
}

#[handler]
async fn export(body: poem::Body, Data(received): Data<&Received>) -> Response {
    let Ok(bytes) = body.into_vec().await else {
        return Response::builder()
            .status(poem::http::StatusCode::BAD_REQUEST)
            .finish();
    };
    let Ok(request) = ExportTraceServiceRequest::decode(bytes.as_slice()) else {
        return Response::builder()
            .status(poem::http::StatusCode::BAD_REQUEST)
            .finish();
    };
    let mut spans = received.0.lock().expect("the spans");
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            spans.extend(scope.spans);
        }
    }
    Response::builder()
        .content_type("application/x-protobuf")
        .body(ExportTraceServiceResponse::default().encode_to_vec())
}

/// An OTLP/HTTP (protobuf) trace receiver on loopback: its port and what it receives.
async fn receiver() -> (u16, Received) {
    let (acceptor, port) = whist_tests::loopback_acceptor().await;
    let received = Received::default();
    let app = Route::new()
        .at("/v1/traces", post(export))
        .data(received.clone());
    tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(app));
    (port, received)
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(|attribute| attribute.value.as_ref())
        .and_then(|value| match &value.value {
            Some(AnyValue::StringValue(text)) => Some(text.clone()),
            Some(AnyValue::IntValue(number)) => Some(number.to_string()),
            _ => None,
        })
}

#[tokio::test]
async fn an_assign_continues_its_callers_trace_through_the_job_and_the_host_and_is_exported_over_otlp(
) {
    let (receiver_port, received) = receiver().await;
    let folder = tempfile::tempdir().expect("a folder");
    let port = free_port();
    let mut server = ChildProcess::start(
        &crate::whist_binary(),
        &["serve"],
        folder.path(),
        &[
            ("PORT", port.to_string()),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{receiver_port}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
            // The request's own line ("request done") is a debug line.
            ("RUST_LOG", "info,whist_api=debug".to_string()),
        ],
        "serve.log",
    );
    server.wait_healthy(Duration::from_secs(60)).await;

    // Assign (retried until the simulated hosts are up), each attempt its own request in the caller's trace.
    let client = whist_tests::http_client();
    let base = format!("http://127.0.0.1:{port}");
    let assigned_by = Arc::new(Mutex::new(None::<String>));
    let attempt = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let assigned = eventually(Duration::from_secs(60), || {
        let (client, base, assigned_by) = (client.clone(), base.clone(), assigned_by.clone());
        let request_id = format!(
            "traced-assign-{}",
            attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        async move {
            let Ok(response) = client
                .post(format!("{base}/mandelbox/assign"))
                .bearer_auth(admin_token("traced-user"))
                .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
                .header("x-request-id", &request_id)
                .json(&assign_body(&["us-east-1"], "local_dev", 1))
                .send()
                .await
            else {
                return false;
            };
            let ok = response.status().as_u16() == 200;
            if ok {
                *assigned_by.lock().expect("the id") = Some(request_id);
            }
            ok
        }
    })
    .await;
    assert!(assigned, "an assign: {}", server.log_text());
    let request_id = assigned_by
        .lock()
        .expect("the id")
        .clone()
        .expect("the assign's request id");

    // The whole chain reaches the receiver: request → assign → … → job → host call → host → its status report.
    let in_trace = |spans: &[Span]| -> Vec<Span> {
        spans
            .iter()
            .filter(|span| hex(&span.trace_id) == TRACE_ID)
            .cloned()
            .collect()
    };
    let complete = eventually(Duration::from_secs(30), || {
        let spans = in_trace(&received.spans());
        async move {
            spans
                .iter()
                .any(|span| span.name == "simulated host spin-up")
                && spans
                    .iter()
                    .any(|span| span.name == "POST /host/mandelbox/{mandelbox_id}/status")
        }
    })
    .await;
    let spans = in_trace(&received.spans());
    let names: Vec<&str> = spans.iter().map(|span| span.name.as_str()).collect();
    assert!(complete, "the trace reached the host and back: {names:?}");

    let request = spans
        .iter()
        .find(|span| attribute(span, "request_id").as_deref() == Some(request_id.as_str()))
        .unwrap_or_else(|| panic!("the assign's request span, by its request id: {names:?}"));
    assert_eq!(request.name, "POST /mandelbox/assign");
    assert_eq!(
        hex(&request.parent_span_id),
        CALLER_SPAN,
        "the caller's span is its parent"
    );
    assert_eq!(
        attribute(request, "http.response.status_code").as_deref(),
        Some("200")
    );
    let children: Vec<&Span> = spans
        .iter()
        .filter(|span| span.parent_span_id == request.span_id)
        .collect();
    assert!(
        children.iter().any(|span| span.name == "assign"),
        "the use case is a child span of the request: {names:?}"
    );
    let by_id = |id: &[u8]| spans.iter().find(|span| span.span_id == id);
    // The job's span continues the assign (through the decision's recorded trace context).
    let job = spans
        .iter()
        .find(|span| {
            span.name == "job" && attribute(span, "kind").as_deref() == Some("spin_up_mandelbox")
        })
        .unwrap_or_else(|| panic!("the spin-up job's span: {names:?}"));
    let mut ancestor = by_id(&job.parent_span_id);
    let mut reaches_the_request = false;
    while let Some(span) = ancestor {
        if span.span_id == request.span_id {
            reaches_the_request = true;
            break;
        }
        ancestor = by_id(&span.parent_span_id);
    }
    assert!(
        reaches_the_request,
        "the job's span descends from the assign's request: {names:?}"
    );
    let call = spans
        .iter()
        .find(|span| span.name == "host call" && span.parent_span_id == job.span_id)
        .unwrap_or_else(|| panic!("the job's call to the host: {names:?}"));
    let host = spans
        .iter()
        .find(|span| span.name == "simulated host spin-up")
        .expect("the host's span");
    assert_eq!(
        host.parent_span_id, call.span_id,
        "the host continued the traceparent the call sent over HTTP"
    );
    let report = spans
        .iter()
        .find(|span| span.name == "POST /host/mandelbox/{mandelbox_id}/status")
        .expect("the host's status report");
    assert_eq!(
        report.parent_span_id, host.span_id,
        "the report continued the host's trace"
    );

    // Log lines name their trace and span.
    let log = server.log_text();
    let traced_line = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| {
            line["trace_id"] == TRACE_ID
                && line["span_id"].as_str().is_some_and(|id| id.len() == 16)
        });
    assert!(
        traced_line.is_some(),
        "a log line of the trace names it: {log}"
    );

    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = server.exited(Duration::from_secs(30)).await.expect("exits");
    assert!(status.success(), "{}", server.log_text());
}
