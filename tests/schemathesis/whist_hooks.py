"""Schemathesis hooks for the Whist webserver (loaded with SCHEMATHESIS_HOOKS=whist_hooks).

The contract (../shared/CONTRACT.md) makes some 5xx answers deliberate: an assign that finds no slot answers
`503 {"error": "NO_INSTANCE_AVAILABLE"}`, and likewise REGION_NOT_ENABLED, COMMIT_HASH_MISMATCH,
USER_ALREADY_ACTIVE and MAINTENANCE. schemathesis' own `not_a_server_error` counts every 5xx; the suite runs
without it and with `contract_server_error` instead, which fails on any 5xx except those, on the operation the
contract gives them to.

`POST /stripe/webhook` takes only bodies signed with the endpoint's secret, over the exact bytes sent, at the
time they are sent: no schema can say that. `sign_stripe_webhook` signs what the fuzzer sends as Stripe would,
with the secret the server under test was given (`STRIPE_WEBHOOK_SECRET` in this process's environment), so that
generated events reach the handler and a valid one is taken; a request with no `Stripe-Signature` is left
unsigned, and so is a body that is not a Stripe event's shape (see there), which the server refuses for its
signature.
"""

import hashlib
import hmac
import json
import os
import time

import schemathesis

CONTRACT_5XX = {
    ("POST", "/mandelbox/assign"): {
        "REGION_NOT_ENABLED",
        "NO_INSTANCE_AVAILABLE",
        "COMMIT_HASH_MISMATCH",
        "USER_ALREADY_ACTIVE",
        "MAINTENANCE",
    },
}


@schemathesis.check
def contract_server_error(ctx, response, case):
    """A 5xx is a failure unless the contract gives that code to that operation."""
    if response.status_code < 500:
        return None
    allowed = CONTRACT_5XX.get((case.method.upper(), case.operation.path), set())
    try:
        code = response.json().get("error")
    except Exception:  # a body that is not a JSON object is itself outside the contract
        code = None
    if response.status_code == 503 and code in allowed:
        return None
    raise AssertionError(f"{response.status_code} {code!r}: a server error the contract does not give this operation")


WEBHOOK = ("POST", "/stripe/webhook")


def _is_event_shaped(body):
    """A JSON object whose `data`, if any, is an object or null: the shape of every event Stripe sends.

    The server reads the envelope with serde, which also takes a JSON array where the schema says object (a
    struct read from a sequence). Stripe never sends one; left unsigned, such a body is refused for its signature,
    as a negative case should be.
    """
    return isinstance(body, dict) and isinstance(body.get("data", {}), (dict, type(None)))


@schemathesis.hook
def before_call(ctx, case, kwargs):
    """Signs a generated Stripe webhook delivery over the bytes that will be sent (see the module documentation)."""
    if (case.method.upper(), case.operation.path) != WEBHOOK:
        return
    secret = os.environ.get("STRIPE_WEBHOOK_SECRET")
    headers = case.headers or {}
    if secret is None or "Stripe-Signature" not in headers or not _is_event_shaped(case.body):
        return
    payload = json.dumps(case.body).encode("utf-8")
    timestamp = int(time.time())
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("utf-8") + payload, hashlib.sha256)
    # The bytes are sent as they are (a body given to the call replaces the generated one unserialised).
    kwargs["data"] = payload
    headers["Stripe-Signature"] = f"t={timestamp},v1={mac.hexdigest()}"
