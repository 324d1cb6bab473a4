//! Money at the edges (issue 8), over real gRPC on loopback, on PostgreSQL and SQLite:
//! Stripe money follows the ledger and its per-payment cap, keys of callers and of
//! Stripe live apart, hostile identifiers are refused before any write, one refused
//! write fails alone, and load never answers INTERNAL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use common::{Backend, CREDIT, Client, TestDb, client, deduct};
use futures::future::join_all;
use reeve_proto::credits::v1 as pb;
use reeve_proto::credits::v1::deduct_outcome::Result as Outcome;
use reeve_testkit::on_both_stores;
use tonic::Code;

on_both_stores!(
    refunds_and_disputes_follow_the_payment_not_the_event,
    partial_refunds_without_previous_attributes_debit_the_cumulative_total,
    a_refund_of_a_payment_never_credited_debits_nobody,
    reinstatements_return_only_what_their_dispute_took,
    refunds_and_disputes_never_take_more_than_the_payment_gave,
    a_failed_refund_gives_back_once,
    concurrent_redeliveries_of_one_refund_debit_once,
    a_payment_credited_by_add_credits_and_by_its_event_counts_once,
    caller_keys_never_collide_with_stripe_keys,
    nul_and_control_characters_are_refused_before_any_write,
    a_write_the_database_refuses_fails_alone_among_concurrent_deductions,
    a_key_refused_for_want_of_credits_is_free_again_alone_and_in_a_batch,
    a_pre_namespace_ledger_keeps_its_keys_after_migration,
    a_lot_held_for_a_hold_gone_is_recounted_by_migration,
    a_holds_reservations_survive_their_move_into_its_row,
);

// Load never answers INTERNAL: PostgreSQL-only (SQLite writers are serialised).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_crossing_batches_sharing_keys_never_answer_internal() {
    crossing_batches_sharing_keys_never_answer_internal(Backend::Postgres).await;
}

async fn grant(client: &mut Client, user: &str, micros: i64, key: &str) {
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
        .unwrap();
}

async fn balance(client: &mut Client, user: &str) -> i64 {
    common::balance(client, user).await.balance_micros
}

async fn assert_audit_clean(db: &TestDb, users: &[&str]) {
    let store = credits_svc::store::open(&db.url).await.unwrap();
    for user in users {
        let audit = store.audit(user).await.unwrap();
        assert_eq!(audit.cached, audit.entries_sum, "{user} drifted");
    }
}

use pb::PaymentEventKind as Kind;
use pb::PaymentEventOutcome as Said;

fn event(
    kind: Kind,
    payment: &str,
    user: &str,
    credits_x100: i64,
    object: &str,
) -> pb::PaymentEventRequest {
    pb::PaymentEventRequest {
        kind: kind.into(),
        payment_id: payment.into(),
        user_id: user.into(),
        amount_micros: credits_x100 * CREDIT / 100,
        object_id: object.into(),
        description: String::new(),
        ..Default::default()
    }
}

async fn record(client: &mut Client, request: pb::PaymentEventRequest) -> pb::PaymentEventResponse {
    client
        .record_payment_event(request)
        .await
        .unwrap()
        .into_inner()
}

fn outcome(response: &pb::PaymentEventResponse) -> Said {
    Said::try_from(response.outcome).unwrap()
}

async fn refunds_and_disputes_follow_the_payment_not_the_event(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    // The payment intent names "payer"; the refund and dispute name "session-user".
    let paid = record(
        &mut c,
        event(Kind::PaymentSucceeded, "pi_1", "payer", 2500, ""),
    )
    .await;
    assert_eq!(outcome(&paid), Said::Applied);
    let refund = record(
        &mut c,
        event(Kind::Refunded, "pi_1", "session-user", 1000, "ch_1"),
    )
    .await;
    assert_eq!(outcome(&refund), Said::Applied);
    assert_eq!(refund.user_id, "payer");
    let dispute = record(
        &mut c,
        event(
            Kind::DisputeFundsWithdrawn,
            "pi_1",
            "session-user",
            1500,
            "dp_1",
        ),
    )
    .await;
    assert_eq!(outcome(&dispute), Said::Applied);
    assert_eq!(balance(&mut c, "payer").await, 0);
    assert_eq!(balance(&mut c, "session-user").await, 0);
    let entry = dispute.entry.unwrap();
    assert_eq!(entry.user_id, "payer");
    assert_eq!(entry.amount_micros, -15 * CREDIT);
    assert_audit_clean(&db, &["payer", "session-user"]).await;
}

async fn partial_refunds_without_previous_attributes_debit_the_cumulative_total(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    record(
        &mut c,
        event(Kind::PaymentSucceeded, "pi_2", "alice", 2500, ""),
    )
    .await;
    // Refunds of 5 then 8: the charge reports 5, then 13 refunded in all; the second
    // arrives first, and each is delivered twice.
    for cumulative in [1300, 500, 1300, 500] {
        record(
            &mut c,
            event(Kind::Refunded, "pi_2", "", cumulative, "ch_2"),
        )
        .await;
    }
    assert_eq!(balance(&mut c, "alice").await, 12 * CREDIT);
    assert_audit_clean(&db, &["alice"]).await;
}

async fn a_refund_of_a_payment_never_credited_debits_nobody(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "victim", 10 * CREDIT, "g").await;
    let refund = record(
        &mut c,
        event(Kind::Refunded, "pi_never", "victim", 1000, "ch_x"),
    )
    .await;
    assert_eq!(outcome(&refund), Said::UnknownPayment);
    assert!(refund.entry.is_none());
    let dispute = record(
        &mut c,
        event(
            Kind::DisputeFundsWithdrawn,
            "pi_never",
            "victim",
            1000,
            "dp_x",
        ),
    )
    .await;
    assert_eq!(outcome(&dispute), Said::UnknownPayment);
    assert_eq!(balance(&mut c, "victim").await, 10 * CREDIT);
    // Once the payment arrives, the same refund applies to its payer.
    record(
        &mut c,
        event(Kind::PaymentSucceeded, "pi_never", "payer", 2500, ""),
    )
    .await;
    let later = record(
        &mut c,
        event(Kind::Refunded, "pi_never", "victim", 1000, "ch_x"),
    )
    .await;
    assert_eq!(outcome(&later), Said::Applied);
    assert_eq!(balance(&mut c, "payer").await, 15 * CREDIT);
    assert_eq!(balance(&mut c, "victim").await, 10 * CREDIT);
}

async fn reinstatements_return_only_what_their_dispute_took(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    record(
        &mut c,
        event(Kind::PaymentSucceeded, "pi_3", "bob", 2500, ""),
    )
    .await;
    // A dispute never debited: nothing comes back, and its later withdrawal debits nothing.
    let early = record(
        &mut c,
        event(
            Kind::DisputeFundsReinstated,
            "pi_3",
            "",
            2500,
            "dp_won_first",
        ),
    )
    .await;
    assert_eq!(outcome(&early), Said::NothingToApply);
    assert_eq!(balance(&mut c, "bob").await, 25 * CREDIT);
    let late = record(
        &mut c,
        event(
            Kind::DisputeFundsWithdrawn,
            "pi_3",
            "",
            2500,
            "dp_won_first",
        ),
    )
    .await;
    assert_eq!(outcome(&late), Said::NothingToApply);
    assert_eq!(balance(&mut c, "bob").await, 25 * CREDIT);
    // A dispute debited, won, and its reinstatement redelivered: exactly its debit back, once.
    record(
        &mut c,
        event(Kind::DisputeFundsWithdrawn, "pi_3", "", 1000, "dp_2"),
    )
    .await;
    assert_eq!(balance(&mut c, "bob").await, 15 * CREDIT);
    let won = record(
        &mut c,
        event(Kind::DisputeFundsReinstated, "pi_3", "", 1000, "dp_2"),
    )
    .await;
    assert_eq!(outcome(&won), Said::Applied);
    let again = record(
        &mut c,
        event(Kind::DisputeFundsReinstated, "pi_3", "", 1000, "dp_2"),
    )
    .await;
    assert_eq!(outcome(&again), Said::Duplicate);
    assert_eq!(balance(&mut c, "bob").await, 25 * CREDIT);
    assert_audit_clean(&db, &["bob"]).await;
}

async fn refunds_and_disputes_never_take_more_than_the_payment_gave(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "carol", 100 * CREDIT, "g-carol").await;
    record(
        &mut c,
        event(Kind::PaymentSucceeded, "pi_4", "carol", 2500, ""),
    )
    .await;
    record(&mut c, event(Kind::Refunded, "pi_4", "", 1000, "ch_4")).await;
    let dispute = record(
        &mut c,
        event(Kind::DisputeFundsWithdrawn, "pi_4", "", 2500, "dp_4"),
    )
    .await;
    assert_eq!(outcome(&dispute), Said::Applied);
    assert_eq!(dispute.capped_micros, 10 * CREDIT);
    let more = record(&mut c, event(Kind::Refunded, "pi_4", "", 2500, "ch_4")).await;
    assert_eq!(outcome(&more), Said::NothingToApply);
    assert_eq!(more.capped_micros, 15 * CREDIT);
    // 100 granted + 25 paid − at most 25 taken back.
    assert_eq!(balance(&mut c, "carol").await, 100 * CREDIT);
    // The dispute won gives back only what it took (15), not the 25 it named.
    record(
        &mut c,
        event(Kind::DisputeFundsReinstated, "pi_4", "", 2500, "dp_4"),
    )
    .await;
    assert_eq!(balance(&mut c, "carol").await, 115 * CREDIT);
    assert_audit_clean(&db, &["carol"]).await;
}

async fn a_failed_refund_gives_back_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    record(
        &mut c,
        event(Kind::PaymentSucceeded, "pi_5", "dave", 2500, ""),
    )
    .await;
    record(&mut c, event(Kind::Refunded, "pi_5", "", 800, "ch_5")).await;
    assert_eq!(balance(&mut c, "dave").await, 17 * CREDIT);
    for _ in 0..3 {
        record(&mut c, event(Kind::RefundFailed, "pi_5", "", 800, "re_5")).await;
    }
    assert_eq!(balance(&mut c, "dave").await, 25 * CREDIT);
    // A failed refund of a payment nothing was refunded from gives nothing.
    record(
        &mut c,
        event(Kind::PaymentSucceeded, "pi_6", "dave", 100, ""),
    )
    .await;
    let none = record(&mut c, event(Kind::RefundFailed, "pi_6", "", 100, "re_6")).await;
    assert_eq!(outcome(&none), Said::NothingToApply);
    assert_eq!(balance(&mut c, "dave").await, 26 * CREDIT);
}

async fn concurrent_redeliveries_of_one_refund_debit_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    record(
        &mut c,
        event(Kind::PaymentSucceeded, "pi_7", "erin", 2500, ""),
    )
    .await;
    let addr = server.local_addr;
    join_all((0..20).map(|i| async move {
        let mut c = client(addr).await;
        let cumulative = if i % 2 == 0 { 500 } else { 1300 };
        record(
            &mut c,
            event(Kind::Refunded, "pi_7", "", cumulative, "ch_7"),
        )
        .await;
        record(
            &mut c,
            event(Kind::DisputeFundsWithdrawn, "pi_7", "", 200, "dp_7"),
        )
        .await;
    }))
    .await;
    assert_eq!(balance(&mut c, "erin").await, 10 * CREDIT);
    assert_audit_clean(&db, &["erin"]).await;
}

async fn a_payment_credited_by_add_credits_and_by_its_event_counts_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    let via_add = c
        .add_credits(pb::AddCreditsRequest {
            user_id: "frank".into(),
            amount_micros: 25 * CREDIT,
            idempotency_key: "pi_8".into(),
            kind: pb::CreditKind::Purchase.into(),
            description: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!via_add.duplicate);
    let via_event = record(
        &mut c,
        event(Kind::PaymentSucceeded, "pi_8", "frank", 2500, ""),
    )
    .await;
    assert_eq!(outcome(&via_event), Said::Duplicate);
    // The same payment intent for another user is a conflict, not a second credit.
    let status = c
        .record_payment_event(event(Kind::PaymentSucceeded, "pi_8", "mallory", 2500, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(balance(&mut c, "frank").await, 25 * CREDIT);
    assert_eq!(balance(&mut c, "mallory").await, 0);
}

async fn caller_keys_never_collide_with_stripe_keys(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "gateway-user", 10 * CREDIT, "g-gw").await;
    // A gateway deduction keyed like a payment intent, a refund and a dispute.
    for key in [
        "pi_9",
        "stripe:refund:ch_9:0:500",
        "stripe:dispute:dp_9",
        "stripe:dispute-reinstated:dp_9",
    ] {
        deduct(&mut c, "gateway-user", CREDIT, key).await.unwrap();
    }
    // The payment, its refund and its dispute still apply, each once.
    let paid = record(
        &mut c,
        event(Kind::PaymentSucceeded, "pi_9", "buyer", 2500, ""),
    )
    .await;
    assert_eq!(outcome(&paid), Said::Applied);
    let refund = record(&mut c, event(Kind::Refunded, "pi_9", "", 500, "ch_9")).await;
    assert_eq!(outcome(&refund), Said::Applied);
    let dispute = record(
        &mut c,
        event(Kind::DisputeFundsWithdrawn, "pi_9", "", 500, "dp_9"),
    )
    .await;
    assert_eq!(outcome(&dispute), Said::Applied);
    let won = record(
        &mut c,
        event(Kind::DisputeFundsReinstated, "pi_9", "", 500, "dp_9"),
    )
    .await;
    assert_eq!(outcome(&won), Said::Applied);
    assert_eq!(balance(&mut c, "buyer").await, 20 * CREDIT);
    assert_eq!(balance(&mut c, "gateway-user").await, 6 * CREDIT);
    // And a caller retrying its deduction keyed `pi_9` still gets its own entry back.
    let retry = deduct(&mut c, "gateway-user", CREDIT, "pi_9")
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_audit_clean(&db, &["buyer", "gateway-user"]).await;
}

async fn nul_and_control_characters_are_refused_before_any_write(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "hank", 10 * CREDIT, "g-hank").await;
    let deduct = |user: &str, key: &str, description: &str| pb::DeductRequest {
        user_id: user.into(),
        amount_micros: CREDIT,
        idempotency_key: key.into(),
        description: description.into(),
    };
    for request in [
        deduct("hank", "k\0", ""),
        deduct("hank\0", "k1", ""),
        deduct("hank", "k2", "a\0b"),
        deduct("hank\u{1b}", "k3", ""),
    ] {
        let status = c.deduct(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let outcomes = c
        .deduct_batch(pb::DeductBatchRequest {
            items: vec![
                deduct("hank", "ok-1", ""),
                deduct("hank", "bad\0", ""),
                deduct("hank", "ok-2", "x\0"),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    assert!(matches!(outcomes[0].result, Some(Outcome::Applied(_))));
    assert!(
        matches!(&outcomes[1].result, Some(Outcome::Invalid(i)) if i.code == "invalid_idempotency_key")
    );
    assert!(
        matches!(&outcomes[2].result, Some(Outcome::Invalid(i)) if i.code == "invalid_description")
    );
    for status in [
        c.add_credits(pb::AddCreditsRequest {
            user_id: "hank\0".into(),
            amount_micros: CREDIT,
            idempotency_key: "g2".into(),
            kind: pb::CreditKind::Grant.into(),
            description: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.adjust(pb::AdjustRequest {
            user_id: "hank".into(),
            amount_micros: CREDIT,
            idempotency_key: "adj\0".into(),
            reason: "why".into(),
        })
        .await
        .unwrap_err(),
        c.purchase(pb::PurchaseRequest {
            user_id: "hank\u{7}".into(),
            amount_credits: 25,
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.get_balance(pb::GetBalanceRequest {
            user_id: "\0".into(),
        })
        .await
        .unwrap_err(),
        c.record_payment_event(event(Kind::PaymentSucceeded, "pi_nul", "u\0", 100, ""))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    assert_eq!(balance(&mut c, "hank").await, 9 * CREDIT);
    assert_audit_clean(&db, &["hank"]).await;
}

/// Makes the database itself refuse one key (a constraint or trigger of the scratch
/// database), as it would refuse any write it cannot store.
async fn refuse_key_in_database(db: &TestDb, key: &str) {
    match db.backend {
        Backend::Postgres => {
            let pool = reeve_runtime::db::postgres_pool(&db.url, 1).await.unwrap();
            sqlx::query(&format!(
                "ALTER TABLE credit_ledger ADD CONSTRAINT refuse_one_key CHECK (idempotency_key <> '{key}')"
            ))
            .execute(&pool)
            .await
            .unwrap();
        }
        Backend::Sqlite => {
            let pool = reeve_runtime::db::sqlite_pool(&db.url).await.unwrap();
            sqlx::query(&format!(
                "CREATE TRIGGER refuse_one_key BEFORE INSERT ON credit_ledger \
                 WHEN NEW.idempotency_key = '{key}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            ))
            .execute(&pool)
            .await
            .unwrap();
        }
    }
}

async fn a_write_the_database_refuses_fails_alone_among_concurrent_deductions(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "ivy", 1_000 * CREDIT, "g-ivy").await;
    refuse_key_in_database(&db, "poison").await;
    let addr = server.local_addr;
    let results = join_all((0..300).map(|i| async move {
        let mut c = client(addr).await;
        let key = if i == 150 {
            "poison".to_owned()
        } else {
            format!("honest-{i}")
        };
        deduct(&mut c, "ivy", CREDIT, &key)
            .await
            .map(|_| ())
            .map_err(|status| (i, status.code()))
    }))
    .await;
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, 150);
    assert_eq!(balance(&mut c, "ivy").await, 701 * CREDIT);
    assert_audit_clean(&db, &["ivy"]).await;
}

async fn a_key_refused_for_want_of_credits_is_free_again_alone_and_in_a_batch(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "jo", 4 * CREDIT, "g-jo").await;
    let deduct = |micros: i64| pb::DeductRequest {
        user_id: "jo".into(),
        amount_micros: micros,
        idempotency_key: "llm-1".into(),
        description: String::new(),
    };
    // Alone: refused, then the same key with a smaller amount applies.
    assert_eq!(
        c.deduct(deduct(5 * CREDIT)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let alone = c.deduct(deduct(3 * CREDIT)).await.unwrap().into_inner();
    assert!(!alone.duplicate);
    // In one batch: the same rule.
    grant(&mut c, "jo", 4 * CREDIT, "g-jo-2").await;
    let outcomes = c
        .deduct_batch(pb::DeductBatchRequest {
            items: vec![
                pb::DeductRequest {
                    idempotency_key: "llm-2".into(),
                    ..deduct(9 * CREDIT)
                },
                pb::DeductRequest {
                    idempotency_key: "llm-2".into(),
                    ..deduct(2 * CREDIT)
                },
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    assert!(matches!(outcomes[0].result, Some(Outcome::Insufficient(_))));
    assert!(
        matches!(outcomes[1].result, Some(Outcome::Applied(_))),
        "{:?}",
        outcomes[1]
    );
    assert_eq!(balance(&mut c, "jo").await, 3 * CREDIT);
}

async fn crossing_batches_sharing_keys_never_answer_internal(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    for round in 0..40 {
        let users = [format!("x-{round}"), format!("y-{round}")];
        for user in &users {
            grant(&mut c, user, 1_000 * CREDIT, &format!("g-{user}")).await;
        }
        let addr = server.local_addr;
        let answers = join_all(users.iter().enumerate().map(|(side, user)| async move {
            let mut keys: Vec<usize> = (0..200).collect();
            if side == 1 {
                keys.reverse();
            }
            let items = keys
                .into_iter()
                .map(|k| pb::DeductRequest {
                    user_id: user.clone(),
                    amount_micros: CREDIT,
                    idempotency_key: format!("shared-{round}-{k}"),
                    description: String::new(),
                })
                .collect();
            client(addr)
                .await
                .deduct_batch(pb::DeductBatchRequest { items })
                .await
        }))
        .await;
        let mut applied: HashMap<String, usize> = HashMap::new();
        for answer in answers {
            let outcomes = match answer {
                Ok(reply) => reply.into_inner().outcomes,
                Err(status) => {
                    assert_ne!(status.code(), Code::Internal, "round {round}: {status:?}");
                    assert!(matches!(status.code(), Code::Aborted | Code::Unavailable));
                    continue;
                }
            };
            for outcome in outcomes {
                match outcome.result {
                    Some(Outcome::Applied(_)) => {
                        *applied.entry(outcome.idempotency_key).or_default() += 1
                    }
                    Some(Outcome::Invalid(i)) => assert_eq!(i.code, "idempotency_key_reused"),
                    other => panic!("{other:?}"),
                }
            }
        }
        assert!(applied.values().all(|n| *n == 1));
        let total: i64 = balance(&mut c, &users[0]).await + balance(&mut c, &users[1]).await;
        assert_eq!(
            total,
            (2_000 - applied.len() as i64) * CREDIT,
            "round {round}"
        );
    }
}

/// Runs only the migrations up to `last` (copied to a folder of their own, so their
/// checksums match the real ones), then `statements`, as an older release left them.
async fn old_schema(db: &TestDb, last: u32, statements: &[&str]) {
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(match db.backend {
        Backend::Postgres => "migrations/postgres",
        Backend::Sqlite => "migrations/sqlite",
    });
    let dir = tempfile::tempdir().unwrap();
    for file in std::fs::read_dir(&source).unwrap() {
        let name = file.unwrap().file_name().into_string().unwrap();
        let version: u32 = name.split('_').next().unwrap().parse().unwrap();
        if version <= last {
            std::fs::copy(source.join(&name), dir.path().join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    match db.backend {
        Backend::Postgres => {
            let pool = reeve_runtime::db::postgres_pool(&db.url, 1).await.unwrap();
            migrator.run(&pool).await.unwrap();
            for statement in statements {
                sqlx::query(statement).execute(&pool).await.unwrap();
            }
        }
        Backend::Sqlite => {
            let pool = reeve_runtime::db::sqlite_pool(&db.url).await.unwrap();
            migrator.run(&pool).await.unwrap();
            for statement in statements {
                sqlx::query(statement).execute(&pool).await.unwrap();
            }
        }
    }
}

/// A ledger written the old way, before key sources (migration 1001 only).
async fn old_ledger(db: &TestDb) {
    let rows = "INSERT INTO credit_ledger (user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, created_at_us) VALUES \
        ('old', 'purchase', 25000000, 25000000, 'pi_old', 'Stripe payment pi_old', 1), \
        ('old', 'adjustment', -5000000, 20000000, 'stripe:refund:ch_old:0:500', 'refund', 2), \
        ('old', 'adjustment', -10000000, 10000000, 'stripe:dispute:dp_old', 'dispute', 3), \
        ('old', 'deduction', -1000000, 9000000, 'pi_used_by_gateway', '', 4)";
    let account = "INSERT INTO credit_accounts (user_id, balance_micros, updated_at_us) VALUES ('old', 9000000, 4)";
    old_schema(db, 1001, &[rows, account]).await;
}

/// Lots whose `held_micros` an earlier release left above what held holds reserve
/// (an expired hold's reservations deleted, its amount still held) are recounted by
/// migration 1008; one whose count is right keeps it.
async fn a_lot_held_for_a_hold_gone_is_recounted_by_migration(backend: Backend) {
    let db = TestDb::new(backend).await;
    old_schema(
        &db,
        1007,
        &[
            "INSERT INTO credit_ledger (user_id, kind, amount_micros, balance_after_micros, idempotency_key, key_source, description, created_at_us) VALUES \
                ('drift', 'grant', 10000000, 10000000, 'g1', 'caller', '', 1), \
                ('drift', 'grant', 5000000, 15000000, 'g2', 'caller', '', 2)",
            "INSERT INTO credit_accounts (user_id, balance_micros, updated_at_us) VALUES ('drift', 15000000, 2)",
            // Lots 1 and 2 of a fresh database.
            "INSERT INTO credit_lots (user_id, category, priority, source, original_micros, remaining_micros, held_micros, created_at_us) VALUES \
                ('drift', 'paid', 50, 'g1', 10000000, 10000000, 4000000, 1), \
                ('drift', 'paid', 50, 'g2', 5000000, 5000000, 2000000, 2)",
            "INSERT INTO credit_holds (hold_id, user_id, amount_micros, status, created_at_us, expires_at_us, resolved_at_us) VALUES \
                ('gone', 'drift', 4000000, 'expired', 1, 3, 3), \
                ('kept', 'drift', 2000000, 'held', 2, 9000000000000000, NULL)",
            "INSERT INTO credit_hold_reservations (hold_id, lot_id, amount_micros, position) VALUES ('kept', 2, 2000000, 0)",
        ],
    )
    .await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    let answer = common::balance(&mut c, "drift").await;
    assert_eq!(
        (
            answer.balance_micros,
            answer.held_micros,
            answer.available_micros
        ),
        (15 * CREDIT, 2 * CREDIT, 13 * CREDIT)
    );
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let held: Vec<(i64, i64)> = store
        .lots("drift", true, 3)
        .await
        .unwrap()
        .iter()
        .map(|lot| (lot.id, lot.held.0))
        .collect();
    assert_eq!(held, [(1, 0), (2, 2 * CREDIT)]);
    // All of what is not held can be spent.
    let spent = deduct(&mut c, "drift", 13 * CREDIT, "all-but-held")
        .await
        .unwrap();
    assert_eq!(spent.entry.unwrap().balance_after_micros, 2 * CREDIT);
    assert_audit_clean(&db, &["drift"]).await;
}

async fn a_pre_namespace_ledger_keeps_its_keys_after_migration(backend: Backend) {
    let db = TestDb::new(backend).await;
    old_ledger(&db).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    assert_eq!(balance(&mut c, "old").await, 9 * CREDIT);
    // The old balance became one paid lot without expiry; history is as it was.
    let lots = c
        .list_lots(pb::ListLotsRequest {
            user_id: "old".into(),
            include_spent: true,
        })
        .await
        .unwrap()
        .into_inner()
        .lots;
    assert_eq!(lots.len(), 1);
    assert_eq!(lots[0].category, pb::CreditCategory::Paid as i32);
    assert_eq!(
        (lots[0].original_micros, lots[0].remaining_micros),
        (9 * CREDIT, 9 * CREDIT)
    );
    assert!(lots[0].expires_at.is_none());
    let history = c
        .history(pb::HistoryRequest {
            user_id: "old".into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(history.len(), 4);
    assert_eq!(history[0].balance_after_micros, 9 * CREDIT);
    // The old purchase still deduplicates its webhook…
    let paid = record(
        &mut c,
        event(Kind::PaymentSucceeded, "pi_old", "old", 2500, ""),
    )
    .await;
    assert_eq!(outcome(&paid), Said::Duplicate);
    // …the old refund counts toward the charge's refunds (5 of 8 already debited)…
    let refund = record(&mut c, event(Kind::Refunded, "pi_old", "", 800, "ch_old")).await;
    assert_eq!(refund.entry.unwrap().amount_micros, -3 * CREDIT);
    // …the old dispute is given back exactly once…
    record(
        &mut c,
        event(Kind::DisputeFundsReinstated, "pi_old", "", 1000, "dp_old"),
    )
    .await;
    let again = record(
        &mut c,
        event(Kind::DisputeFundsWithdrawn, "pi_old", "", 1000, "dp_old"),
    )
    .await;
    assert_eq!(outcome(&again), Said::Duplicate);
    // …and the gateway's old deduction keyed `pi_…` is still its own.
    let retry = deduct(&mut c, "old", CREDIT, "pi_used_by_gateway")
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(balance(&mut c, "old").await, 16 * CREDIT);
    assert_audit_clean(&db, &["old"]).await;
}

/// An operator's long write transaction holds the SQLite file (say, the `sqlite3` shell
/// left in `BEGIN IMMEDIATE`). A deduction waits SQLite's busy timeout once and
/// answers UNAVAILABLE (retryable), not after waiting as long again for every retry
/// round, and never INTERNAL; nothing is written, and the same key applies once when
/// the file is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_sqlite_file_answers_unavailable_once_and_loses_nothing() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = db.start().await;
    let addr = server.local_addr;
    let mut c = client(addr).await;
    grant(&mut c, "ola", 10 * CREDIT, "g-ola").await;
    let mut holder = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE; UPDATE credit_accounts SET balance_micros = balance_micros")
        .execute(&mut holder)
        .await
        .unwrap();
    let single = tokio::spawn(async move {
        let mut c = client(addr).await;
        deduct(&mut c, "ola", CREDIT, "while-held").await
    });
    let batch = tokio::spawn(async move {
        client(addr)
            .await
            .deduct_batch(pb::DeductBatchRequest {
                items: vec![pb::DeductRequest {
                    user_id: "ola".into(),
                    amount_micros: CREDIT,
                    idempotency_key: "batch-while-held".into(),
                    description: String::new(),
                }],
            })
            .await
    });
    // One busy timeout (10 s) each, not eight: a hang fails here instead of the suite.
    let limit = std::time::Duration::from_secs(40);
    let single = tokio::time::timeout(limit, single)
        .await
        .expect("a single deduction against a held file answers")
        .unwrap()
        .unwrap_err();
    assert_eq!(single.code(), Code::Unavailable, "{single:?}");
    let batch = tokio::time::timeout(limit, batch)
        .await
        .expect("a batch against a held file answers")
        .unwrap()
        .unwrap_err();
    assert_eq!(batch.code(), Code::Unavailable, "{batch:?}");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    assert_eq!(balance(&mut c, "ola").await, 10 * CREDIT, "nothing written");
    for _ in 0..2 {
        deduct(&mut c, "ola", CREDIT, "while-held").await.unwrap();
    }
    assert_eq!(balance(&mut c, "ola").await, 9 * CREDIT, "applied once");
}

/// Holds made before their reservations moved into their rows (PostgreSQL migration
/// 1009; SQLite keeps its reservations table): a held hold keeps its lots in position
/// order (not lot order) and reserves them, its settle draws from them and frees the
/// rest, and a hold resolved before keeps reserving nothing.
async fn a_holds_reservations_survive_their_move_into_its_row(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut old = vec![
        "INSERT INTO credit_ledger (user_id, kind, amount_micros, balance_after_micros, idempotency_key, key_source, description, created_at_us) VALUES \
            ('mover', 'grant', 10000000, 10000000, 'g1', 'caller', '', 1), \
            ('mover', 'grant', 5000000, 15000000, 'g2', 'caller', '', 2), \
            ('mover', 'deduction', -1000000, 14000000, 'settle:done', 'caller', '', 3)",
        "INSERT INTO credit_accounts (user_id, balance_micros, updated_at_us) VALUES ('mover', 14000000, 3)",
        // Lots 1 and 2 of a fresh database; 1 paid the settled hold's million and holds
        // 3 of `moving`'s millions and the one of `stale`, 2 the other 5 of `moving`.
        "INSERT INTO credit_lots (user_id, category, priority, source, original_micros, remaining_micros, held_micros, created_at_us) VALUES \
            ('mover', 'promotional', 10, 'g1', 10000000, 9000000, 4000000, 1), \
            ('mover', 'paid', 50, 'g2', 5000000, 5000000, 5000000, 2)",
        // `stale` is still marked held, past its instant (no sweep ran).
        "INSERT INTO credit_holds (hold_id, user_id, amount_micros, status, settled_micros, created_at_us, expires_at_us, resolved_at_us) VALUES \
            ('moving', 'mover', 8000000, 'held', NULL, 4, 9000000000000000, NULL), \
            ('stale', 'mover', 1000000, 'held', NULL, 4, 5, NULL), \
            ('done', 'mover', 2000000, 'settled', 1000000, 3, 9000000000000000, 3)",
        // Position order differs from lot order: lot 2 first.
        "INSERT INTO credit_hold_reservations (hold_id, lot_id, amount_micros, position) VALUES \
            ('moving', 1, 3000000, 1), ('moving', 2, 5000000, 0), ('stale', 1, 1000000, 0)",
    ];
    if backend == Backend::Postgres {
        // A row a resolved hold should not have kept: the migration moves only the
        // reservations of held holds (SQLite keeps its table, so it would be read).
        old.push(
            "INSERT INTO credit_hold_reservations (hold_id, lot_id, amount_micros, position) VALUES \
                ('done', 1, 1000000, 0)",
        );
    }
    old_schema(&db, 1008, &old).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let moving = store.hold("moving").await.unwrap().unwrap();
    assert_eq!(
        moving.reservations,
        [
            (2, reeve_runtime::Micros(5 * CREDIT)),
            (1, reeve_runtime::Micros(3 * CREDIT))
        ]
    );
    assert!(
        store
            .hold("done")
            .await
            .unwrap()
            .unwrap()
            .reservations
            .is_empty()
    );
    let balance = common::balance(&mut c, "mover").await;
    assert_eq!(
        (
            balance.balance_micros,
            balance.held_micros,
            balance.available_micros
        ),
        (14 * CREDIT, 8 * CREDIT, 6 * CREDIT)
    );
    // What is not held can be spent, not a micro more.
    let over = deduct(&mut c, "mover", 6 * CREDIT + 1, "over")
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::FailedPrecondition);
    // The settle draws from the reserved lots in their order and frees the rest.
    let settled = c
        .settle_hold(pb::SettleHoldRequest {
            hold_id: "moving".into(),
            amount_micros: 6 * CREDIT,
            description: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let entry = settled.entry.unwrap();
    assert_eq!(entry.balance_after_micros, 8 * CREDIT);
    let draws: Vec<(i64, i64)> = entry
        .draws
        .iter()
        .map(|draw| (draw.lot_id, draw.amount_micros))
        .collect();
    assert_eq!(draws, [(2, 5 * CREDIT), (1, CREDIT)]);
    assert!(
        store
            .hold("moving")
            .await
            .unwrap()
            .unwrap()
            .reservations
            .is_empty()
    );
    let lots: Vec<(i64, i64, i64)> = store
        .lots("mover", true, 3)
        .await
        .unwrap()
        .iter()
        .map(|lot| (lot.id, lot.remaining.0, lot.held.0))
        .collect();
    assert_eq!(lots, [(1, 8 * CREDIT, 0), (2, 0, 0)]);
    // The settle's plan expired `stale` on the way: it reserves nothing any more.
    let stale = store.hold("stale").await.unwrap().unwrap();
    assert_eq!(stale.status, credits_svc::holds::HoldStatus::Expired);
    assert!(stale.reservations.is_empty());
    let all = deduct(&mut c, "mover", 8 * CREDIT, "all").await.unwrap();
    assert_eq!(all.entry.unwrap().balance_after_micros, 0);
    assert_audit_clean(&db, &["mover"]).await;
}
