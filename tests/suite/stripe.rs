//! Subscriptions through Stripe: signed webhooks, the gate on assign, the payment portal URL (against a loopback
//! Stripe API fake).

use std::time::Duration;

use whist_tests::stripe_fake::StripeFake;
use whist_tests::{
    assign_body, launch_spec, spawn_app, spawn_app_with, stripe_event, stripe_signature,
    user_token, TestApp, TestDatabase, STRIPE_WEBHOOK_SECRET,
};

fn new_user() -> String {
    format!("auth0|{}", uuid::Uuid::new_v4().simple())
}

async fn assign_status(app: &TestApp, user: &str, session: i64) -> u16 {
    app.client
        .post(app.url("/mandelbox/assign"))
        .bearer_auth(user_token(user))
        .json(&assign_body(&["us-east-1"], "hash-a", session))
        .send()
        .await
        .expect("answers")
        .status()
        .as_u16()
}

fn subscription_event(id: &str, kind: &str, created: i64, customer: &str, status: &str) -> String {
    stripe_event(
        id,
        &format!("customer.subscription.{kind}"),
        created,
        serde_json::json!({
            "id": "sub_test_1",
            "object": "subscription",
            "customer": customer,
            "status": status,
            "items": {"object": "list", "data": []},
        }),
    )
}

fn checkout_completed(id: &str, created: i64, customer: &str, user: &str) -> String {
    stripe_event(
        id,
        "checkout.session.completed",
        created,
        serde_json::json!({
            "id": format!("cs_{id}"),
            "object": "checkout.session",
            "mode": "subscription",
            "customer": customer,
            "client_reference_id": user,
        }),
    )
}

async fn deliver(app: &TestApp, payload: &str) -> u16 {
    let now = chrono::Utc::now().timestamp();
    app.deliver_webhook(
        payload,
        &stripe_signature(payload, STRIPE_WEBHOOK_SECRET, now),
    )
    .await
}

/// Events recorded for `aggregate_type`, in the store itself.
async fn stored_events(app: &TestApp, aggregate_type: &str) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE aggregate_type = $1")
        .bind(aggregate_type)
        .fetch_one(app.state.database.any())
        .await
        .expect("counts")
}

#[tokio::test]
async fn a_subscription_created_then_deleted_opens_then_closes_the_gate() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let _host = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 8)
        .await;
    let user = new_user();
    let customer = "cus_gate";
    assert_eq!(
        assign_status(&app, &user, 1).await,
        402,
        "no subscription yet"
    );

    let now = chrono::Utc::now().timestamp();
    assert_eq!(
        deliver(&app, &checkout_completed("evt_c1", now, customer, &user)).await,
        200
    );
    let created = subscription_event("evt_s1", "created", now, customer, "active");
    assert_eq!(deliver(&app, &created).await, 200);
    let response = app
        .client
        .post(app.url("/mandelbox/assign"))
        .bearer_auth(user_token(&user))
        .json(&assign_body(&["us-east-1"], "hash-a", 2))
        .send()
        .await
        .expect("answers");
    assert_eq!(
        response.status().as_u16(),
        200,
        "an active subscriber is served"
    );
    let assigned: serde_json::Value = response.json().await.expect("a body");
    let mandelbox_id = assigned["mandelbox_id"]
        .as_str()
        .expect("an id")
        .to_string();

    let deleted = subscription_event("evt_s2", "deleted", now + 1, customer, "canceled");
    assert_eq!(deliver(&app, &deleted).await, 200);
    assert_eq!(
        assign_status(&app, &user, 3).await,
        402,
        "a cancelled subscriber is not"
    );
    // The live mandelbox is left to finish.
    let view = app.mandelbox_view(&user_token(&user), &mandelbox_id).await;
    assert_ne!(view["status"], "DEAD", "{view}");
    assert_ne!(view["status"], "DYING", "{view}");
    app.stop().await;
}

#[tokio::test]
async fn forged_stale_altered_and_foreign_signatures_are_refused_and_record_nothing() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let user = new_user();
    let customer = "cus_forged";
    let now = chrono::Utc::now().timestamp();
    let payload = checkout_completed("evt_f1", now, customer, &user);
    let good = stripe_signature(&payload, STRIPE_WEBHOOK_SECRET, now);
    let forged = format!("t={now},v1={}", "ab".repeat(32));
    let stale = stripe_signature(&payload, STRIPE_WEBHOOK_SECRET, now - 301);
    let foreign = stripe_signature(&payload, "whsec_someone_else", now);
    let altered = payload.replace(&user, "auth0|mallory");
    for (body, signature, what) in [
        (payload.as_str(), forged.as_str(), "a forged signature"),
        (payload.as_str(), stale.as_str(), "a signature 301 s old"),
        (
            altered.as_str(),
            good.as_str(),
            "a body altered after signing",
        ),
        (payload.as_str(), foreign.as_str(), "an unknown secret"),
        (payload.as_str(), "", "no signature"),
    ] {
        assert_eq!(app.deliver_webhook(body, signature).await, 400, "{what}");
    }
    assert_eq!(stored_events(&app, "subscription").await, 0);
    assert_eq!(stored_events(&app, "stripe_customer").await, 0);
    // The untouched delivery is taken.
    assert_eq!(app.deliver_webhook(&payload, &good).await, 200);
    assert_eq!(stored_events(&app, "subscription").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn the_same_event_delivered_three_times_is_recorded_once() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let user = new_user();
    let customer = "cus_thrice";
    let now = chrono::Utc::now().timestamp();
    assert_eq!(
        deliver(&app, &checkout_completed("evt_t0", now, customer, &user)).await,
        200
    );
    let created = subscription_event("evt_t1", "created", now, customer, "active");
    for _ in 0..3 {
        assert_eq!(deliver(&app, &created).await, 200);
    }
    assert_eq!(
        stored_events(&app, "subscription").await,
        2,
        "the link and one status change"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_update_delivered_before_its_creation_ends_in_the_newer_state() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let _host = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 8)
        .await;
    let user = new_user();
    let customer = "cus_ooo";
    let now = chrono::Utc::now().timestamp();
    // The subscription events come first: the customer is not linked yet, so they are held.
    let updated = subscription_event("evt_o2", "updated", now + 5, customer, "active");
    let created = subscription_event("evt_o1", "created", now, customer, "incomplete");
    assert_eq!(deliver(&app, &updated).await, 200);
    assert_eq!(deliver(&app, &created).await, 200);
    assert_eq!(
        deliver(&app, &checkout_completed("evt_o0", now, customer, &user)).await,
        200
    );
    assert_eq!(
        assign_status(&app, &user, 1).await,
        200,
        "the newer state (active) won"
    );

    // And once linked, a stale event arriving late changes nothing either.
    let stale = subscription_event("evt_o3", "updated", now + 1, customer, "past_due");
    assert_eq!(deliver(&app, &stale).await, 200);
    let (subscription, _) = app
        .state
        .services
        .subscriptions
        .load_from_history(&user)
        .await
        .expect("loads");
    assert_eq!(subscription.status.as_deref(), Some("active"));
    assert!(subscription.seen_events.contains("evt_o3"));
    app.stop().await;
}

#[tokio::test]
async fn other_event_types_are_answered_and_ignored() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let invoice = stripe_event(
        "evt_i1",
        "invoice.paid",
        chrono::Utc::now().timestamp(),
        serde_json::json!({"id": "in_1", "object": "invoice", "customer": "cus_x"}),
    );
    assert_eq!(deliver(&app, &invoice).await, 200);
    assert_eq!(stored_events(&app, "subscription").await, 0);
    app.stop().await;
}

async fn app_with_stripe(database: &TestDatabase, fake: &StripeFake) -> TestApp {
    let mut settings = database.settings();
    settings.stripe.secret = Some(whist_adapters::config::Secret::new(
        "sk_test_whist".to_string(),
    ));
    settings.stripe.price_id = Some("price_whist_monthly".to_string());
    settings.stripe.api_base = fake.base_url.clone();
    spawn_app_with(database, settings).await
}

async fn portal_url(app: &TestApp, user: &str) -> (u16, serde_json::Value) {
    let response = app
        .client
        .get(app.url("/payment_portal_url"))
        .bearer_auth(user_token(user))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test]
async fn a_new_user_gets_a_checkout_with_a_trial_and_a_subscriber_gets_the_billing_portal() {
    let database = TestDatabase::postgres().await;
    let fake = StripeFake::start("sk_test_whist").await;
    let app = app_with_stripe(&database, &fake).await;
    let user = new_user();

    let (status, body) = portal_url(&app, &user).await;
    assert_eq!(status, 200, "{body}");
    let url = body["url"].as_str().expect("a url");
    assert!(url.starts_with("https://checkout.stripe.test/"), "{url}");
    let requests = fake.requests();
    assert_eq!(requests[0].path, "/v1/customers");
    assert!(
        requests[0].idempotency_key.is_some(),
        "the customer is created idempotently"
    );
    assert_eq!(requests[0].form.get("metadata[whist_user_id]"), Some(&user));
    let checkout = &requests[1];
    assert_eq!(checkout.path, "/v1/checkout/sessions");
    assert_eq!(
        checkout.form.get("mode").map(String::as_str),
        Some("subscription")
    );
    assert_eq!(
        checkout
            .form
            .get("line_items[0][price]")
            .map(String::as_str),
        Some("price_whist_monthly")
    );
    assert_eq!(checkout.form.get("client_reference_id"), Some(&user));
    assert!(
        checkout
            .form
            .contains_key("subscription_data[trial_period_days]"),
        "a user who never subscribed gets a trial: {:?}",
        checkout.form
    );
    let customer = checkout
        .form
        .get("customer")
        .cloned()
        .expect("the customer");

    // The same user asks again: the linked customer is reused, no second customer is created.
    let (status, _) = portal_url(&app, &user).await;
    assert_eq!(status, 200);
    assert_eq!(
        fake.requests()
            .iter()
            .filter(|request| request.path == "/v1/customers")
            .count(),
        1
    );

    // Stripe reports the subscription: now the portal, with the same customer.
    let now = chrono::Utc::now().timestamp();
    let created = subscription_event("evt_p1", "created", now, &customer, "trialing");
    assert_eq!(deliver(&app, &created).await, 200);
    let (status, body) = portal_url(&app, &user).await;
    assert_eq!(status, 200);
    let url = body["url"].as_str().expect("a url");
    assert!(url.starts_with("https://billing.stripe.test/"), "{url}");
    let last = fake.requests().last().cloned().expect("a request");
    assert_eq!(last.path, "/v1/billing_portal/sessions");
    assert_eq!(last.form.get("customer"), Some(&customer));

    // Cancelled: back to Checkout, without a trial this time.
    let deleted = subscription_event("evt_p2", "deleted", now + 1, &customer, "canceled");
    assert_eq!(deliver(&app, &deleted).await, 200);
    let (status, _) = portal_url(&app, &user).await;
    assert_eq!(status, 200);
    let last = fake.requests().last().cloned().expect("a request");
    assert_eq!(last.path, "/v1/checkout/sessions");
    assert!(!last
        .form
        .contains_key("subscription_data[trial_period_days]"));
    app.stop().await;
}

#[tokio::test]
async fn a_stripe_api_that_refuses_the_key_answers_502_and_records_nothing() {
    let database = TestDatabase::postgres().await;
    let fake = StripeFake::start("sk_test_a_different_key").await;
    let app = app_with_stripe(&database, &fake).await;
    let user = new_user();
    let (status, body) = portal_url(&app, &user).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "STRIPE_UNAVAILABLE");
    assert_eq!(stored_events(&app, "subscription").await, 0);
    app.stop().await;
}
