//! Delivery guarantees, on both stores, against receivers of our own on loopback that
//! verify every Standard Webhooks signature.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use reeve_events::store::ENDPOINT_DISABLED;
use reeve_events::{Dispatcher, DispatcherConfig, EventStore, NewEvent, RetryOutcome};
use reeve_runtime::clock::ManualClock;
use reeve_testkit::{Backend, ScratchDb, on_both_stores};

/// What a receiver does with the n-th request it gets (0-based).
#[derive(Clone, Copy)]
enum Answer {
    Ok,
    Fail,
    /// Takes the request, then never answers in time.
    Hang,
    Redirect,
}

#[derive(Default)]
struct Seen {
    /// (webhook-id, body) of every request whose signature verified.
    verified: Vec<(String, serde_json::Value)>,
    unverified: usize,
}

struct Receiver {
    url: String,
    seen: Arc<Mutex<Seen>>,
    secrets: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    async fn start(script: Vec<Answer>) -> Receiver {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let secrets: Arc<Mutex<Vec<String>>> = Arc::default();
        let count = Arc::new(Mutex::new(0usize));
        let (s, k, c) = (Arc::clone(&seen), Arc::clone(&secrets), Arc::clone(&count));
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (seen, secrets, count) = (Arc::clone(&s), Arc::clone(&k), Arc::clone(&c));
                async move {
                    let verified = secrets.lock().unwrap().iter().any(|secret| {
                        standardwebhooks::Webhook::new(secret)
                            .unwrap()
                            .verify(&body, &headers)
                            .is_ok()
                    });
                    let n = {
                        let mut seen = seen.lock().unwrap();
                        if verified {
                            let id = headers["webhook-id"].to_str().unwrap().to_owned();
                            seen.verified
                                .push((id, serde_json::from_slice(&body).unwrap()));
                        } else {
                            seen.unverified += 1;
                        }
                        let mut count = count.lock().unwrap();
                        *count += 1;
                        *count - 1
                    };
                    let answer: Response = match script.get(n).copied().unwrap_or(Answer::Ok) {
                        Answer::Ok => (StatusCode::OK, "thanks").into_response(),
                        Answer::Fail => (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response(),
                        Answer::Hang => {
                            tokio::time::sleep(Duration::from_secs(600)).await;
                            StatusCode::OK.into_response()
                        }
                        Answer::Redirect => (
                            StatusCode::FOUND,
                            [("location", "http://127.0.0.1:9/elsewhere")],
                        )
                            .into_response(),
                    };
                    answer
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, seen, secrets }
    }

    fn trust(&self, secret: &str) {
        self.secrets.lock().unwrap().push(secret.to_owned());
    }

    fn ids(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .verified
            .iter()
            .map(|(id, _)| id.clone())
            .collect()
    }
}

fn now_us() -> i64 {
    reeve_runtime::clock::now_us()
}

struct Setup {
    _db: ScratchDb,
    store: EventStore,
    clock: ManualClock,
}

async fn setup(backend: Backend) -> Setup {
    let db = ScratchDb::new(backend, "events").await;
    let store = EventStore::open(&db.url).await.unwrap();
    Setup {
        _db: db,
        store,
        clock: ManualClock::at(now_us()),
    }
}

fn dispatcher(setup: &Setup, config: DispatcherConfig) -> Dispatcher {
    Dispatcher::new(setup.store.clone(), config, setup.clock.clock()).unwrap()
}

fn quick() -> DispatcherConfig {
    DispatcherConfig {
        request_timeout: Duration::from_secs(2),
        ..DispatcherConfig::default()
    }
}

fn event(kind: &str, user: &str) -> NewEvent {
    NewEvent::new(kind, Some(user), serde_json::json!({"user_id": user}))
}

async fn each_event_once_per_endpoint_after_dispatcher_crashes_mid_send(backend: Backend) {
    let setup = setup(backend).await;
    let receiver = Receiver::start(vec![Answer::Hang]).await;
    let endpoint = setup
        .store
        .add_endpoint(&receiver.url, &[], setup.clock.now_us())
        .await
        .unwrap();
    receiver.trust(&endpoint.secret);
    let events: Vec<NewEvent> = (0..3)
        .map(|i| event("credits.granted", &format!("u{i}")))
        .collect();
    setup
        .store
        .insert(&events, setup.clock.now_us())
        .await
        .unwrap();

    // The first dispatcher sends all three; two are answered and recorded, one request
    // hangs (the receiver has it), and the process dies before recording it.
    let first = dispatcher(&setup, DispatcherConfig::default());
    let crashed = tokio::spawn(async move { first.run_once().await });
    for _ in 0..1_000 {
        if receiver.seen.lock().unwrap().verified.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    crashed.abort();
    assert_eq!(receiver.ids().len(), 3);

    // Another replica finds nothing until the lease runs out, then sends them again.
    let second = dispatcher(&setup, quick());
    assert_eq!(second.run_once().await.unwrap(), 0);
    setup.clock.advance(61_000_000);
    // At least the cut-off one (the others, if their outcome was not yet recorded).
    let redone = second.run_once().await.unwrap();
    assert!((1..=3).contains(&redone), "{redone}");
    assert_eq!(second.run_once().await.unwrap(), 0);

    {
        let seen = receiver.seen.lock().unwrap();
        assert_eq!(seen.unverified, 0);
        assert_eq!(
            seen.verified.len(),
            3 + redone,
            "at least once: cut-off ones sent twice"
        );
        let distinct: HashSet<&str> = seen.verified.iter().map(|(id, _)| id.as_str()).collect();
        let expected: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            distinct, expected,
            "deduped by webhook-id: each event exactly once"
        );
        for (id, body) in &seen.verified {
            assert_eq!(body["id"], *id);
            assert_eq!(body["type"], "credits.granted");
            assert!(body["created_at"].as_str().unwrap().ends_with('Z'));
        }
    }
    let log = setup.store.attempts(None, false, 100).await.unwrap();
    assert_eq!(log.len(), 3);
    assert!(log.iter().all(|a| a.outcome == "succeeded"));
    assert_eq!(
        log.iter().filter(|a| a.attempt == 2).count(),
        redone,
        "a cut-off attempt leaves no row; its retry is #2"
    );
}

async fn receiver_failing_three_times_gets_the_event_on_the_fourth_try_logged(backend: Backend) {
    let setup = setup(backend).await;
    let receiver = Receiver::start(vec![Answer::Fail, Answer::Fail, Answer::Fail]).await;
    let endpoint = setup
        .store
        .add_endpoint(&receiver.url, &[], setup.clock.now_us())
        .await
        .unwrap();
    receiver.trust(&endpoint.secret);
    let sent = event("credits.purchased", "alice");
    setup
        .store
        .insert(std::slice::from_ref(&sent), setup.clock.now_us())
        .await
        .unwrap();
    let dispatcher = dispatcher(&setup, quick());
    assert_eq!(dispatcher.run_once().await.unwrap(), 1);
    // Not due before its back-off.
    setup.clock.advance(4_000_000);
    assert_eq!(dispatcher.run_once().await.unwrap(), 0);
    for wait_secs in [1, 5 * 60, 30 * 60] {
        setup.clock.advance(wait_secs * 1_000_000);
        assert_eq!(dispatcher.run_once().await.unwrap(), 1);
    }
    setup.clock.advance(10 * 3600 * 1_000_000);
    assert_eq!(
        dispatcher.run_once().await.unwrap(),
        0,
        "delivered: never again"
    );

    assert_eq!(receiver.ids(), vec![sent.id.clone(); 4]);
    let mut log = setup
        .store
        .attempts(Some(&endpoint.id), false, 100)
        .await
        .unwrap();
    log.reverse();
    let summary: Vec<(i64, &str, Option<i64>)> = log
        .iter()
        .map(|a| (a.attempt, a.outcome.as_str(), a.status_code))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "failed", Some(500)),
            (2, "failed", Some(500)),
            (3, "failed", Some(500)),
            (4, "succeeded", Some(200)),
        ]
    );
    assert!(
        log.iter()
            .all(|a| a.event_id == sent.id && a.event_type == "credits.purchased")
    );
    assert_eq!(log[0].response_excerpt, "down");
    assert_eq!(log[3].response_excerpt, "thanks");
    assert_eq!(log[3].delivery_status, "succeeded");
    let failed = setup.store.attempts(None, true, 100).await.unwrap();
    assert_eq!(failed.len(), 3);
}

async fn filters_route_events_and_redirects_are_not_followed(backend: Backend) {
    let setup = setup(backend).await;
    let all = Receiver::start(vec![]).await;
    let grants = Receiver::start(vec![]).await;
    let redirecting = Receiver::start(vec![Answer::Redirect]).await;
    let now = setup.clock.now_us();
    let a = setup.store.add_endpoint(&all.url, &[], now).await.unwrap();
    let g = setup
        .store
        .add_endpoint(&grants.url, &["credits.granted".to_owned()], now)
        .await
        .unwrap();
    let r = setup
        .store
        .add_endpoint(&redirecting.url, &[], now)
        .await
        .unwrap();
    all.trust(&a.secret);
    grants.trust(&g.secret);
    redirecting.trust(&r.secret);
    let events = vec![
        event("credits.granted", "a"),
        event("credits.depleted", "a"),
    ];
    setup.store.insert(&events, now).await.unwrap();
    let dispatcher = dispatcher(&setup, quick());
    assert_eq!(dispatcher.run_once().await.unwrap(), 5);
    assert_eq!(all.ids().len(), 2);
    assert_eq!(grants.ids(), vec![events[0].id.clone()]);
    let redirected = setup.store.attempts(Some(&r.id), true, 10).await.unwrap();
    assert_eq!(redirected.len(), 1);
    assert_eq!(redirected[0].status_code, Some(302));
    assert!(
        redirected[0]
            .error
            .as_deref()
            .unwrap()
            .contains("redirect not followed")
    );
    // Bad registrations are refused.
    for bad in [
        "ftp://x/hook",
        "http://user:pw@host/",
        "not a url",
        "http://[::1/x",
    ] {
        assert!(
            setup.store.add_endpoint(bad, &[], now).await.is_err(),
            "{bad}"
        );
    }
    assert!(
        setup
            .store
            .add_endpoint(&all.url, &["Bad Type".to_owned()], now)
            .await
            .is_err()
    );
}

/// One `credits.granted` event, inserted at the test clock's now.
async fn grant_event_now(setup: &Setup) {
    setup
        .store
        .insert(&[event("credits.granted", "a")], setup.clock.now_us())
        .await
        .unwrap();
}

async fn an_endpoint_failing_for_days_is_disabled_with_an_event(backend: Backend) {
    let setup = setup(backend).await;
    let dead = Receiver::start(vec![Answer::Fail; 100]).await;
    let watcher = Receiver::start(vec![]).await;
    let now = setup.clock.now_us();
    let d = setup
        .store
        .add_endpoint(&dead.url, &["credits.granted".to_owned()], now)
        .await
        .unwrap();
    let w = setup
        .store
        .add_endpoint(&watcher.url, &[ENDPOINT_DISABLED.to_owned()], now)
        .await
        .unwrap();
    dead.trust(&d.secret);
    watcher.trust(&w.secret);
    let config = DispatcherConfig {
        disable_after: Duration::from_secs(3 * 24 * 3600),
        ..quick()
    };
    let dispatcher = dispatcher(&setup, config);
    // An event a day, each failing until the endpoint has failed for three days; an
    // operator enabling it while it is still enabled does not restart its clock.
    for day in 0..4 {
        grant_event_now(&setup).await;
        dispatcher.run_once().await.unwrap();
        if day == 1 {
            assert!(setup.store.enable_endpoint(&d.id).await.unwrap());
        }
        setup.clock.advance(24 * 3600 * 1_000_000);
    }
    dispatcher.run_once().await.unwrap();
    dispatcher.run_once().await.unwrap();
    let endpoints = setup.store.endpoints().await.unwrap();
    let dead_now = endpoints.iter().find(|e| e.id == d.id).unwrap();
    assert_eq!(dead_now.status, "disabled");
    let told = watcher.seen.lock().unwrap().verified.clone();
    assert_eq!(told.len(), 1);
    assert_eq!(told[0].1["type"], ENDPOINT_DISABLED);
    assert_eq!(told[0].1["data"]["endpoint_id"], d.id);
    // Nothing more is sent to it.
    let before = dead.ids().len();
    grant_event_now(&setup).await;
    setup.clock.advance(24 * 3600 * 1_000_000);
    dispatcher.run_once().await.unwrap();
    assert_eq!(dead.ids().len(), before);
    // Enabled again, it starts a new clock: one more failing day does not disable it.
    assert!(setup.store.enable_endpoint(&d.id).await.unwrap());
    assert!(
        !setup
            .store
            .enable_endpoint("no-such-endpoint")
            .await
            .unwrap()
    );
    grant_event_now(&setup).await;
    dispatcher.run_once().await.unwrap();
    setup.clock.advance(24 * 3600 * 1_000_000);
    dispatcher.run_once().await.unwrap();
    let endpoints = setup.store.endpoints().await.unwrap();
    let revived = endpoints.iter().find(|e| e.id == d.id).unwrap();
    assert_eq!(revived.status, "enabled");
    assert!(dead.ids().len() > before);
}

async fn manual_redelivery_and_secret_rotation_keep_the_webhook_id(backend: Backend) {
    let setup = setup(backend).await;
    let receiver = Receiver::start(vec![]).await;
    let now = setup.clock.now_us();
    let endpoint = setup
        .store
        .add_endpoint(&receiver.url, &[], now)
        .await
        .unwrap();
    let sent = event("lot.expired", "bob");
    setup
        .store
        .insert(std::slice::from_ref(&sent), now)
        .await
        .unwrap();
    let dispatcher = dispatcher(&setup, quick());
    // The receiver knows only the new secret after a rotation; the old one still signs.
    let rotated = setup
        .store
        .rotate_secret(&endpoint.id, 3_600_000_000, now)
        .await
        .unwrap()
        .unwrap();
    receiver.trust(&rotated);
    dispatcher.run_once().await.unwrap();
    let log = setup.store.attempts(None, false, 10).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        setup.store.retry(&log[0].delivery_id, now).await.unwrap(),
        RetryOutcome::Scheduled
    );
    assert_eq!(
        setup.store.retry(&log[0].delivery_id, now).await.unwrap(),
        RetryOutcome::Scheduled
    );
    assert_eq!(
        setup.store.retry("dlv_nope", now).await.unwrap(),
        RetryOutcome::NotFound
    );
    // The old secret alone verifies too, until its overlap ends.
    receiver.secrets.lock().unwrap().clear();
    receiver.trust(&endpoint.secret);
    dispatcher.run_once().await.unwrap();
    assert_eq!(receiver.ids(), vec![sent.id.clone(), sent.id.clone()]);
    assert_eq!(receiver.seen.lock().unwrap().unverified, 0);
    setup.clock.advance(3_601_000_000);
    setup
        .store
        .retry(&log[0].delivery_id, setup.clock.now_us())
        .await
        .unwrap();
    dispatcher.run_once().await.unwrap();
    assert_eq!(
        receiver.seen.lock().unwrap().unverified,
        1,
        "old secret retired"
    );
    // Removing the endpoint cancels what is pending and keeps the log.
    assert!(setup.store.remove_endpoint(&endpoint.id).await.unwrap());
    assert!(!setup.store.remove_endpoint(&endpoint.id).await.unwrap());
    assert!(setup.store.endpoints().await.unwrap().is_empty());
    assert_eq!(
        setup.store.attempts(None, false, 10).await.unwrap().len(),
        3
    );
}

on_both_stores!(
    each_event_once_per_endpoint_after_dispatcher_crashes_mid_send,
    receiver_failing_three_times_gets_the_event_on_the_fourth_try_logged,
    filters_route_events_and_redirects_are_not_followed,
    an_endpoint_failing_for_days_is_disabled_with_an_event,
    manual_redelivery_and_secret_rotation_keep_the_webhook_id,
);
