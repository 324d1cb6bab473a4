//! The ledger's guarantees over real gRPC on loopback, on PostgreSQL and on SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use reeve_testkit::on_both_stores;

use std::collections::{HashMap, HashSet};

use common::{Backend, CREDIT, Client, TestDb, client};
use futures::future::join_all;
use reeve_proto::credits::v1 as pb;
use reeve_proto::credits::v1::deduct_outcome::Result as Outcome;
use tonic::Code;
use tonic_types::StatusExt;

on_both_stores!(
    concurrent_deducts_never_overdraw,
    identical_batches_sent_concurrently_apply_each_key_once,
    crossing_batches_neither_deadlock_nor_lose_updates,
    add_credits_is_keyed_by_payment_intent,
    retry_after_restart_returns_the_original_result,
    insufficient_credits_carries_balance_and_required,
    batch_outcomes_are_per_item_and_in_order,
    batch_size_is_limited,
    bad_amounts_are_invalid_argument,
    unknown_user_has_zero_balance,
    debits_may_create_a_debt_that_blocks_deductions,
    history_is_newest_first_and_paginated,
    balance_equals_sum_of_entries_at_every_moment,
    ledger_rows_cannot_be_changed,
);

async fn grant(client: &mut Client, user: &str, micros: i64, key: &str) -> pb::LedgerEntry {
    client
        .add_credits(pb::AddCreditsRequest {
            user_id: user.into(),
            amount_micros: micros,
            idempotency_key: key.into(),
            kind: pb::CreditKind::Grant.into(),
            description: "test grant".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap()
}

fn deduct_request(user: &str, micros: i64, key: &str) -> pb::DeductRequest {
    pb::DeductRequest {
        user_id: user.into(),
        amount_micros: micros,
        idempotency_key: key.into(),
        description: String::new(),
    }
}

async fn balance(client: &mut Client, user: &str) -> i64 {
    common::balance(client, user).await.balance_micros
}

async fn assert_balance_matches_ledger(db: &TestDb, user: &str) -> i64 {
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let audit = store.audit(user).await.unwrap();
    assert_eq!(
        audit.cached, audit.entries_sum,
        "cached balance of {user} drifted from its entries"
    );
    audit.cached.0
}

async fn concurrent_deducts_never_overdraw(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    grant(&mut admin, "alice", 50 * CREDIT, "grant-1").await;

    let calls = (0..64).map(|i| {
        let addr = server.local_addr;
        async move {
            let mut client = client(addr).await;
            client
                .deduct(deduct_request("alice", CREDIT, &format!("llm-call-{i}")))
                .await
        }
    });
    let results = join_all(calls).await;
    let mut applied = 0;
    for result in results {
        match result {
            Ok(response) => {
                assert!(!response.get_ref().duplicate);
                applied += 1;
            }
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::FailedPrecondition,
                    "unexpected error: {status:?}"
                );
                let info = status.get_error_details().error_info().cloned().unwrap();
                assert_eq!(info.reason, "INSUFFICIENT_CREDITS");
                assert_eq!(info.metadata["balance_micros"], "0");
                assert_eq!(info.metadata["required_micros"], CREDIT.to_string());
            }
        }
    }
    assert_eq!(applied, 50);
    assert_eq!(balance(&mut admin, "alice").await, 0);
    assert_eq!(assert_balance_matches_ledger(&db, "alice").await, 0);
    let store = credits_svc::store::open(&db.url).await.unwrap();
    assert_eq!(store.audit("alice").await.unwrap().entries, 51);
}

async fn identical_batches_sent_concurrently_apply_each_key_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    let users: Vec<String> = (0..25).map(|u| format!("user-{u}")).collect();
    for user in &users {
        grant(&mut admin, user, 1_000 * CREDIT, &format!("grant-{user}")).await;
    }
    // 1,000 items; every 10th repeats the key (and request) of the item before it.
    let mut items = Vec::new();
    let mut distinct: HashMap<String, (String, i64)> = HashMap::new();
    for i in 0..1_000 {
        let (user, amount, key) = if i % 10 == 9 {
            let previous: &pb::DeductRequest = &items[i - 1];
            (
                previous.user_id.clone(),
                previous.amount_micros,
                previous.idempotency_key.clone(),
            )
        } else {
            (
                users[i % users.len()].clone(),
                1_000 + i as i64,
                format!("flush-7/{i}"),
            )
        };
        distinct.insert(key.clone(), (user.clone(), amount));
        items.push(deduct_request(&user, amount, &key));
    }
    let batch = pb::DeductBatchRequest { items };
    let sends = (0..3).map(|_| {
        let addr = server.local_addr;
        let batch = batch.clone();
        async move {
            client(addr)
                .await
                .deduct_batch(batch)
                .await
                .unwrap()
                .into_inner()
        }
    });
    let responses = join_all(sends).await;

    let mut applied_keys = Vec::new();
    for response in &responses {
        assert_eq!(response.outcomes.len(), 1_000);
        for (item, outcome) in batch.items.iter().zip(&response.outcomes) {
            assert_eq!(item.idempotency_key, outcome.idempotency_key);
            match outcome.result.as_ref().unwrap() {
                Outcome::Applied(_) => applied_keys.push(outcome.idempotency_key.clone()),
                Outcome::Duplicate(_) => {}
                other => panic!("unexpected outcome {other:?}"),
            }
        }
    }
    let unique: HashSet<&String> = applied_keys.iter().collect();
    assert_eq!(
        applied_keys.len(),
        distinct.len(),
        "each distinct key is applied exactly once in all"
    );
    assert_eq!(unique.len(), distinct.len());
    // Every answer for one key names the same entry.
    for position in 0..1_000 {
        let ids: HashSet<i64> = responses
            .iter()
            .map(|r| match r.outcomes[position].result.as_ref().unwrap() {
                Outcome::Applied(a) | Outcome::Duplicate(a) => a.entry_id,
                other => panic!("unexpected outcome {other:?}"),
            })
            .collect();
        assert_eq!(ids.len(), 1);
    }
    for user in &users {
        let spent: i64 = distinct
            .values()
            .filter(|(u, _)| u == user)
            .map(|(_, a)| a)
            .sum();
        assert_eq!(balance(&mut admin, user).await, 1_000 * CREDIT - spent);
        assert_balance_matches_ledger(&db, user).await;
    }
}

async fn crossing_batches_neither_deadlock_nor_lose_updates(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    let users: Vec<String> = (0..40).map(|u| format!("u{u}")).collect();
    for user in &users {
        grant(&mut admin, user, 100 * CREDIT, &format!("g-{user}")).await;
    }
    // Eight batches over the same users, half in one order and half reversed.
    let sends = (0..8).map(|b| {
        let addr = server.local_addr;
        let mut order: Vec<&String> = users.iter().collect();
        if b % 2 == 1 {
            order.reverse();
        }
        let items: Vec<pb::DeductRequest> = order
            .iter()
            .map(|u| deduct_request(u, CREDIT, &format!("b{b}-{u}")))
            .collect();
        async move {
            client(addr)
                .await
                .deduct_batch(pb::DeductBatchRequest { items })
                .await
                .unwrap()
                .into_inner()
        }
    });
    let responses = tokio::time::timeout(std::time::Duration::from_secs(60), join_all(sends))
        .await
        .expect("batches deadlocked");
    for response in responses {
        assert!(
            response
                .outcomes
                .iter()
                .all(|o| matches!(o.result, Some(Outcome::Applied(_))))
        );
    }
    for user in &users {
        assert_eq!(balance(&mut admin, user).await, 92 * CREDIT);
        assert_balance_matches_ledger(&db, user).await;
    }
}

async fn add_credits_is_keyed_by_payment_intent(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    let purchase = |amount: i64| pb::AddCreditsRequest {
        user_id: "bob".into(),
        amount_micros: amount,
        idempotency_key: "pi_3MtwBwLkdIwHu7ix28a3tqPa".into(),
        kind: pb::CreditKind::Purchase.into(),
        description: "Stripe checkout".into(),
        ..Default::default()
    };
    let first = admin
        .add_credits(purchase(25 * CREDIT))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate);
    let retries = join_all((0..5).map(|_| {
        let addr = server.local_addr;
        let request = purchase(25 * CREDIT);
        async move {
            client(addr)
                .await
                .add_credits(request)
                .await
                .unwrap()
                .into_inner()
        }
    }))
    .await;
    for retry in retries {
        assert!(retry.duplicate);
        assert_eq!(retry.entry, first.entry);
    }
    let status = admin.add_credits(purchase(30 * CREDIT)).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(
        status.message().contains("different request"),
        "{}",
        status.message()
    );
    assert_eq!(
        status.get_error_details().error_info().unwrap().reason,
        "IDEMPOTENCY_KEY_REUSED"
    );
    assert_eq!(balance(&mut admin, "bob").await, 25 * CREDIT);
    assert_balance_matches_ledger(&db, "bob").await;
}

async fn retry_after_restart_returns_the_original_result(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut first_client = client(server.local_addr).await;
    grant(&mut first_client, "carol", 10 * CREDIT, "grant-carol").await;
    let original = first_client
        .deduct(deduct_request("carol", 3 * CREDIT, "gw-flush-1"))
        .await
        .unwrap()
        .into_inner();
    let batch = pb::DeductBatchRequest {
        items: vec![deduct_request("carol", CREDIT, "gw-flush-2")],
    };
    let original_batch = first_client
        .deduct_batch(batch.clone())
        .await
        .unwrap()
        .into_inner();
    server.stop().await.unwrap();

    let server = db.start().await;
    let mut retry_client = client(server.local_addr).await;
    let retried = retry_client
        .deduct(deduct_request("carol", 3 * CREDIT, "gw-flush-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(retried.duplicate);
    assert_eq!(retried.entry, original.entry);
    let retried_batch = retry_client.deduct_batch(batch).await.unwrap().into_inner();
    match (
        &original_batch.outcomes[0].result,
        &retried_batch.outcomes[0].result,
    ) {
        (Some(Outcome::Applied(a)), Some(Outcome::Duplicate(b))) => assert_eq!(a, b),
        other => panic!("unexpected outcomes {other:?}"),
    }
    assert_eq!(balance(&mut retry_client, "carol").await, 6 * CREDIT);
    server.stop().await.unwrap();
}

async fn insufficient_credits_carries_balance_and_required(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    grant(&mut admin, "dave", 2 * CREDIT, "g").await;
    let status = admin
        .deduct(deduct_request("dave", 2 * CREDIT + 1, "k"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let details = status.get_error_details();
    let info = details.error_info().unwrap();
    assert_eq!(info.reason, "INSUFFICIENT_CREDITS");
    assert_eq!(info.domain, credits_svc::error::ERROR_DOMAIN);
    assert_eq!(info.metadata["balance_micros"], (2 * CREDIT).to_string());
    assert_eq!(
        info.metadata["required_micros"],
        (2 * CREDIT + 1).to_string()
    );
    assert_eq!(
        details.precondition_failure().unwrap().violations[0].r#type,
        "INSUFFICIENT_CREDITS"
    );
    // Nothing was recorded under the key: once topped up, the same key applies.
    grant(&mut admin, "dave", CREDIT, "g2").await;
    let applied = admin
        .deduct(deduct_request("dave", 2 * CREDIT + 1, "k"))
        .await
        .unwrap()
        .into_inner();
    assert!(!applied.duplicate);
    assert_eq!(applied.entry.unwrap().balance_after_micros, CREDIT - 1);
}

async fn batch_outcomes_are_per_item_and_in_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    grant(&mut admin, "erin", 10 * CREDIT, "g-erin").await;
    let items = vec![
        deduct_request("erin", 4 * CREDIT, "a"),
        deduct_request("erin", 0, "zero"),
        deduct_request("erin", 7 * CREDIT, "too-much"),
        deduct_request("erin", 4 * CREDIT, "a"),
        deduct_request("erin", 5 * CREDIT, "a"),
        deduct_request("", CREDIT, "no-user"),
        deduct_request("nobody", CREDIT, "unknown-user"),
        deduct_request("erin", -CREDIT, "negative"),
        deduct_request("erin", i64::MIN, "min"),
        deduct_request("erin", 6 * CREDIT, "rest"),
        deduct_request("erin", CREDIT, "g-erin"),
    ];
    let outcomes = admin
        .deduct_batch(pb::DeductBatchRequest { items })
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    let result = |i: usize| outcomes[i].result.clone().unwrap();
    let Outcome::Applied(first) = result(0) else {
        panic!("{:?}", result(0))
    };
    assert_eq!(first.balance_after_micros, 6 * CREDIT);
    assert!(matches!(result(1), Outcome::Invalid(i) if i.code == "invalid_amount"));
    assert_eq!(
        result(2),
        Outcome::Insufficient(pb::InsufficientCredits {
            balance_micros: 6 * CREDIT,
            required_micros: 7 * CREDIT,
            held_micros: 0,
        })
    );
    assert_eq!(result(3), Outcome::Duplicate(first));
    assert!(matches!(result(4), Outcome::Invalid(i) if i.code == "idempotency_key_reused"));
    assert!(matches!(result(5), Outcome::Invalid(i) if i.code == "invalid_user_id"));
    assert_eq!(
        result(6),
        Outcome::Insufficient(pb::InsufficientCredits {
            balance_micros: 0,
            required_micros: CREDIT,
            held_micros: 0,
        })
    );
    assert!(matches!(result(7), Outcome::Invalid(i) if i.code == "invalid_amount"));
    assert!(matches!(result(8), Outcome::Invalid(_)));
    assert!(matches!(result(9), Outcome::Applied(a) if a.balance_after_micros == 0));
    // A deduction reusing the grant's key is a different request.
    assert!(matches!(result(10), Outcome::Invalid(i) if i.code == "idempotency_key_reused"));
    assert_eq!(balance(&mut admin, "erin").await, 0);
    assert_balance_matches_ledger(&db, "erin").await;
}

async fn batch_size_is_limited(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    let items: Vec<_> = (0..10_001)
        .map(|i| deduct_request("f", 1, &format!("k{i}")))
        .collect();
    let status = admin
        .deduct_batch(pb::DeductBatchRequest { items })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("10000"), "{}", status.message());
    let empty = admin
        .deduct_batch(pb::DeductBatchRequest { items: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.outcomes.is_empty());
}

async fn bad_amounts_are_invalid_argument(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    grant(&mut admin, "gina", CREDIT, "g").await;
    for amount in [0, -1, i64::MIN, i64::MAX] {
        let status = admin
            .deduct(deduct_request("gina", amount, &format!("d{amount}")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "deduct {amount}");
        let status = admin
            .add_credits(pb::AddCreditsRequest {
                user_id: "gina".into(),
                amount_micros: amount,
                idempotency_key: format!("a{amount}"),
                kind: pb::CreditKind::Grant.into(),
                description: String::new(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "add {amount}");
    }
    for amount in [0, i64::MIN, i64::MAX] {
        let status = admin
            .adjust(pb::AdjustRequest {
                user_id: "gina".into(),
                amount_micros: amount,
                idempotency_key: format!("adj{amount}"),
                reason: "test".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "adjust {amount}");
    }
    // Past the per-write bound (one billion credits): refused before any sum is taken.
    let too_big = credits_svc::ledger::MAX_WRITE_MICROS + 1;
    let status = admin
        .deduct(deduct_request("gina", too_big, "too-big"))
        .await
        .unwrap_err();
    assert_eq!(
        status.get_error_details().error_info().unwrap().reason,
        "AMOUNT_OVERFLOW"
    );
    let status = admin
        .add_credits(pb::AddCreditsRequest {
            user_id: "gina".into(),
            amount_micros: CREDIT,
            idempotency_key: "no-kind".into(),
            kind: 0,
            description: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = admin
        .adjust(pb::AdjustRequest {
            user_id: "gina".into(),
            amount_micros: 5,
            idempotency_key: "r".into(),
            reason: " ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(balance(&mut admin, "gina").await, CREDIT);
    assert_balance_matches_ledger(&db, "gina").await;
}

async fn unknown_user_has_zero_balance(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    let response = common::balance(&mut admin, "never-seen").await;
    assert_eq!(response.balance_micros, 0);
    assert_eq!(response.user_id, "never-seen");
    let status = admin
        .get_balance(pb::GetBalanceRequest {
            user_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

async fn debits_may_create_a_debt_that_blocks_deductions(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    grant(&mut admin, "hal", 5 * CREDIT, "g").await;
    admin
        .deduct(deduct_request("hal", 4 * CREDIT, "spend"))
        .await
        .unwrap();
    let refund = pb::AdjustRequest {
        user_id: "hal".into(),
        amount_micros: -5 * CREDIT,
        idempotency_key: "re_1".into(),
        reason: "refund re_1".into(),
    };
    let debit = admin.adjust(refund.clone()).await.unwrap().into_inner();
    assert_eq!(
        debit.entry.as_ref().unwrap().balance_after_micros,
        -4 * CREDIT
    );
    let again = admin.adjust(refund).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.entry, debit.entry);
    let status = admin
        .deduct(deduct_request("hal", 1, "after-debt"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    grant(&mut admin, "hal", 5 * CREDIT, "g2").await;
    let applied = admin
        .deduct(deduct_request("hal", CREDIT, "after-repay"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.entry.unwrap().balance_after_micros, 0);
    assert_balance_matches_ledger(&db, "hal").await;
}

async fn history_is_newest_first_and_paginated(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    grant(&mut admin, "ivy", 10 * CREDIT, "h0").await;
    for i in 1..=4 {
        admin
            .deduct(deduct_request("ivy", i * CREDIT / 10, &format!("h{i}")))
            .await
            .unwrap();
    }
    grant(&mut admin, "other", CREDIT, "other-grant").await;
    let mut keys = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .history(pb::HistoryRequest {
                user_id: "ivy".into(),
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.entries.len() <= 2);
        keys.extend(page.entries.iter().map(|e| e.idempotency_key.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(keys, ["h4", "h3", "h2", "h1", "h0"]);
    assert_eq!(pages, 3);
    let all = admin
        .history(pb::HistoryRequest {
            user_id: "ivy".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap();
    let newest = &all.get_ref().entries[0];
    assert_eq!(newest.kind, pb::EntryKind::Deduction as i32);
    assert_eq!(newest.amount_micros, -4 * CREDIT / 10);
    assert_eq!(newest.balance_after_micros, 9 * CREDIT);
    assert!(newest.created_at.as_ref().unwrap().seconds > 1_700_000_000);
    for bad in [
        pb::HistoryRequest {
            user_id: "ivy".into(),
            page_size: 501,
            page_token: String::new(),
        },
        pb::HistoryRequest {
            user_id: "ivy".into(),
            page_size: -1,
            page_token: String::new(),
        },
        pb::HistoryRequest {
            user_id: "ivy".into(),
            page_size: 2,
            page_token: "garbage".into(),
        },
    ] {
        assert_eq!(
            admin.history(bad).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}

async fn balance_equals_sum_of_entries_at_every_moment(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    grant(&mut admin, "jo", 1_000 * CREDIT, "g").await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let auditor = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut audits = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let audit = store.audit("jo").await.unwrap();
                assert_eq!(
                    audit.cached, audit.entries_sum,
                    "drift seen after {audits} audits"
                );
                audits += 1;
            }
            audits
        })
    };
    let writers = (0..8).map(|w| {
        let addr = server.local_addr;
        async move {
            let mut client = client(addr).await;
            for i in 0..20 {
                if i % 5 == 0 {
                    grant(&mut client, "jo", CREDIT, &format!("w{w}-g{i}")).await;
                } else {
                    let items = (0..10)
                        .map(|k| deduct_request("jo", 1_000 + k, &format!("w{w}-{i}-{k}")))
                        .collect();
                    client
                        .deduct_batch(pb::DeductBatchRequest { items })
                        .await
                        .unwrap();
                }
            }
        }
    });
    join_all(writers).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(auditor.await.unwrap() > 0);
    let expected = 1_000 * CREDIT + 8 * 4 * CREDIT - 8 * 16 * (10 * 1_000 + 45);
    assert_eq!(balance(&mut admin, "jo").await, expected);
}

async fn ledger_rows_cannot_be_changed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    grant(&mut admin, "kim", CREDIT, "g").await;
    let attempts = [
        "UPDATE credit_ledger SET amount_micros = 2",
        "DELETE FROM credit_ledger",
    ];
    for sql in attempts {
        let error = match backend {
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
                sqlx::query(sql).execute(&pool).await.unwrap_err()
            }
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
                sqlx::query(sql).execute(&pool).await.unwrap_err()
            }
        };
        assert!(error.to_string().contains("append-only"), "{error}");
    }
    assert_balance_matches_ledger(&db, "kim").await;
}

/// A user holding half the ledger, all of it older than everyone else's entries: with
/// statistics that say so, PostgreSQL once served their history by a backward scan of
/// the primary key, walking every other user's newer entries before the first of theirs
/// (94 ms a page at 10M entries, over 60 s at 50M). The store's query must read only the
/// user's own entries, whatever the statistics say; pages stay exact.
#[tokio::test]
async fn a_heavy_users_history_reads_only_their_entries() {
    const EACH: usize = 20_000;
    let db = TestDb::new(Backend::Postgres).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    grant(&mut admin, "heavy", CREDIT, "heavy-grant").await;
    for batch in 0..EACH / 1_000 {
        let items = (0..1_000)
            .map(|i| deduct_request("heavy", 1, &format!("heavy-{batch}-{i}")))
            .collect();
        admin
            .deduct_batch(pb::DeductBatchRequest { items })
            .await
            .unwrap();
    }
    for user in 0..100 {
        grant(
            &mut admin,
            &format!("u{user}"),
            CREDIT,
            &format!("g-u{user}"),
        )
        .await;
    }
    for batch in 0..EACH / 1_000 {
        let items = (0..1_000)
            .map(|i| deduct_request(&format!("u{}", i % 100), 1, &format!("u-{batch}-{i}")))
            .collect();
        admin
            .deduct_batch(pb::DeductBatchRequest { items })
            .await
            .unwrap();
    }
    let pool = reeve_runtime::db::postgres_pool(&db.url, 1).await.unwrap();
    sqlx::query("ANALYZE credit_ledger")
        .execute(&pool)
        .await
        .unwrap();
    let newest: i64 = sqlx::query_scalar("SELECT MAX(id) FROM credit_ledger")
        .fetch_one(&pool)
        .await
        .unwrap();
    for before in [i64::MAX, newest, EACH as i64 / 2] {
        let plan: Vec<String> = sqlx::query_scalar(&format!(
            "EXPLAIN SELECT * FROM credit_ledger {}",
            credits_svc::store::postgres::HISTORY_FILTER
        ))
        .bind("heavy")
        .bind(before)
        .bind(51_i64)
        .fetch_all(&pool)
        .await
        .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("credit_ledger_user_newest") && !plan.contains("credit_ledger_pkey"),
            "History below {before} is not read through the user's index:\n{plan}"
        );
    }
    // Every page exact: newest first, nothing skipped or repeated, only the user's.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .history(pb::HistoryRequest {
                user_id: "heavy".into(),
                page_size: 500,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.iter().all(|e| e.user_id == "heavy"));
        seen.extend(page.entries.iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), EACH + 1);
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "not newest first");
}

/// Every deduction updates its user's balance and the lots it draws from. PostgreSQL
/// updates a row in place (HOT, no index touched) only when no index depends on a
/// column the update changes, predicates included; one such index made every
/// deduction write a new entry into every index of `credit_lots` (migration 1007).
#[tokio::test]
async fn no_index_depends_on_what_a_deduction_changes() {
    let db = TestDb::new(Backend::Postgres).await;
    let _server = db.start().await;
    let pool = reeve_runtime::db::postgres_pool(&db.url, 1).await.unwrap();
    for (table, moved) in [
        (
            "credit_lots",
            &["remaining_micros", "held_micros", "expired_micros"][..],
        ),
        ("credit_accounts", &["balance_micros", "updated_at_us"][..]),
    ] {
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index \
             WHERE indrelid = to_regclass($1)",
        )
        .bind(table)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(!indexes.is_empty(), "{table} has its indexes");
        for index in &indexes {
            for column in moved {
                assert!(
                    !index.contains(column),
                    "{index} depends on {column}: every deduction would update {table} without HOT"
                );
            }
        }
        let options: Option<Vec<String>> =
            sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = to_regclass($1)")
                .bind(table)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            options,
            Some(vec!["fillfactor=70".to_owned()]),
            "{table} leaves room for HOT updates"
        );
    }
}

/// A batch on PostgreSQL first locks the users no other transaction holds and commits
/// their writes; the writes of a user held elsewhere follow in a transaction of their
/// own, which waits. Checked by holding one user's balance row from another session:
/// the batch's other users are charged (committed, seen from a third connection) while
/// it waits, the outcomes come back in request order, and a replay answers the same
/// entries as duplicates.
#[tokio::test]
async fn postgres_a_batch_charges_its_free_users_while_one_is_held_elsewhere() {
    batch_with_a_user_held_elsewhere(false).await;
}

/// The same, with one item reusing another user's key: the first transaction's append
/// finds it taken and rolls back after handing the held user on, so its users go the
/// blocking way, still beside the held user's transaction.
#[tokio::test]
async fn postgres_a_batch_whose_first_transaction_fails_still_charges_each_item_once() {
    batch_with_a_user_held_elsewhere(true).await;
}

async fn batch_with_a_user_held_elsewhere(reuse_a_key: bool) {
    let db = TestDb::new(Backend::Postgres).await;
    let server = db.start().await;
    let mut admin = client(server.local_addr).await;
    for user in ["ana", "bo", "cy"] {
        grant(&mut admin, user, 10 * CREDIT, &format!("g-{user}")).await;
    }
    let pool = reeve_runtime::db::postgres_pool(&db.url, 2).await.unwrap();
    let (blocking, blocker_pid) = common::lock_balance_row(&pool, "bo").await;
    let mut items = vec![
        deduct_request("ana", CREDIT, "held-1"),
        deduct_request("bo", 2 * CREDIT, "held-2"),
        deduct_request("cy", 3 * CREDIT, "held-3"),
        deduct_request("bo", CREDIT, "held-4"),
        deduct_request("ana", CREDIT, "held-5"),
        deduct_request("nobody", CREDIT, "held-6"),
    ];
    if reuse_a_key {
        items.push(deduct_request("ana", CREDIT, "g-cy"));
    }
    let batch = tokio::spawn({
        let addr = server.local_addr;
        let items = items.clone();
        async move {
            client(addr)
                .await
                .deduct_batch(pb::DeductBatchRequest { items })
                .await
        }
    });
    // The batch waits on this session's lock (not on another test's) ...
    common::wait_until_blocked_by(&pool, blocker_pid, "the batch").await;
    // ... and its free users are charged and committed while the held one is still
    // held (the blocking way, the batch would keep their rows locked until it is let
    // go, and this would time out).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let expected = [
        ("ana".to_owned(), 8 * CREDIT),
        ("bo".to_owned(), 10 * CREDIT),
        ("cy".to_owned(), 7 * CREDIT),
    ];
    loop {
        let committed: Vec<(String, i64)> = sqlx::query_as(
            "SELECT user_id, balance_micros FROM credit_accounts \
             WHERE user_id IN ('ana', 'bo', 'cy') ORDER BY user_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        if committed == expected {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the free users were not charged while one was held: {committed:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    blocking.rollback().await.unwrap();
    let outcomes = batch.await.unwrap().unwrap().into_inner().outcomes;
    assert_eq!(outcomes.len(), items.len());
    let applied: Vec<(String, i64)> = outcomes
        .iter()
        .take(5)
        .map(|o| match o.result.as_ref().unwrap() {
            Outcome::Applied(a) => (o.idempotency_key.clone(), a.balance_after_micros),
            other => panic!("{}: {other:?}", o.idempotency_key),
        })
        .collect();
    assert_eq!(
        applied,
        [
            ("held-1".to_owned(), 9 * CREDIT),
            ("held-2".to_owned(), 8 * CREDIT),
            ("held-3".to_owned(), 7 * CREDIT),
            ("held-4".to_owned(), 7 * CREDIT),
            ("held-5".to_owned(), 8 * CREDIT),
        ]
    );
    assert_eq!(
        outcomes[5].result,
        Some(Outcome::Insufficient(pb::InsufficientCredits {
            balance_micros: 0,
            required_micros: CREDIT,
            held_micros: 0,
        }))
    );
    if reuse_a_key {
        assert!(
            matches!(&outcomes[6].result, Some(Outcome::Invalid(i)) if i.code == "idempotency_key_reused"),
            "{:?}",
            outcomes[6]
        );
    }
    // A replay (a gateway retrying after a lost answer) writes nothing new.
    let replay = admin
        .deduct_batch(pb::DeductBatchRequest { items })
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    for (first, again) in outcomes.iter().zip(&replay).take(5) {
        let (Some(Outcome::Applied(first)), Some(Outcome::Duplicate(again))) =
            (&first.result, &again.result)
        else {
            panic!("not a duplicate of the first answer: {first:?} / {again:?}");
        };
        assert_eq!(first, again);
    }
    for (user, left) in [("ana", 8), ("bo", 7), ("cy", 7)] {
        assert_eq!(balance(&mut admin, user).await, left * CREDIT);
        assert_balance_matches_ledger(&db, user).await;
    }
}
