//! The metered call: reserve credits with a hold, run the caller's work, then settle
//! the cost the work reports through the [`Recorder`] (batched into SettleHoldBatch),
//! or release the hold when the work fails or its future is dropped.
//!
//! What this module must never do:
//! - **Run work without a live hold.** A refused hold (insufficient credits, an id
//!   already resolved) returns before the work starts.
//! - **Charge a call twice.** The hold id is the key of the hold and of its settle: a
//!   retried Hold answers the same hold, a resent batch or a replayed write-ahead line
//!   answers the stored settle. A hold id already settled, released or expired is
//!   refused ([`MeteredError::AlreadyResolved`]) instead of running the work again.
//! - **Lose the cost of finished work.** Once the work has returned its cost, the
//!   settle is handed to the recorder on a task of its own, so dropping the caller's
//!   future from then on cannot cancel the hand-over half-way. If the recorder no longer
//!   accepts (closing, write-ahead file failed), the settle is sent directly, same key.
//! - **Leave a hold reserving after a failure or a drop.** It is released (on a
//!   spawned task after a drop). The hold's time to live is the backstop: an expired
//!   hold charges nothing.

use std::future::Future;
use std::time::Duration;

use reeve_proto::credits::v1 as pb;
use tonic::{Code, Status};

use crate::credits::{CreditsClient, Refusal};
use crate::recorder::{Charge, Recorder, Settlement};

/// What to reserve for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub user_id: String,
    /// Unique per call (e.g. `llm:<request id>`): the key of the hold and its settle.
    pub hold_id: String,
    /// The most the call may cost.
    pub amount_micros: i64,
    pub description: String,
}

impl Reservation {
    pub fn new(
        user_id: impl Into<String>,
        hold_id: impl Into<String>,
        amount_micros: i64,
    ) -> Reservation {
        Reservation {
            user_id: user_id.into(),
            hold_id: hold_id.into(),
            amount_micros,
            description: String::new(),
        }
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Reservation {
        self.description = description.into();
        self
    }
}

/// The live hold, handed to the work (a long stream extends it).
#[derive(Debug, Clone)]
pub struct HeldCredits {
    hold: pb::Hold,
    credits: CreditsClient,
}

impl HeldCredits {
    pub fn hold_id(&self) -> &str {
        &self.hold.hold_id
    }

    pub fn amount_micros(&self) -> i64 {
        self.hold.amount_micros
    }

    /// The hold as granted.
    pub fn hold(&self) -> &pb::Hold {
        &self.hold
    }

    /// Moves the hold's expiry to now + `ttl` (whole seconds, 1–86,400).
    pub async fn extend(&self, ttl: Duration) -> Result<pb::Hold, Status> {
        let answer = self
            .credits
            .extend_hold(pb::ExtendHoldRequest {
                hold_id: self.hold.hold_id.clone(),
                ttl_seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            })
            .await?;
        Ok(answer.hold.unwrap_or_default())
    }
}

/// Why a metered call did not end in a settled cost.
#[derive(Debug, thiserror::Error)]
pub enum MeteredError<E> {
    /// The hold was refused: the user cannot cover `required_micros` now. Nothing ran.
    #[error(
        "insufficient credits: {required_micros} required, {balance_micros} balance, {held_micros} held"
    )]
    Insufficient {
        balance_micros: i64,
        held_micros: i64,
        required_micros: i64,
    },
    /// The hold id was used by a call that has already ended. Nothing ran again.
    #[error("hold {hold_id} is already {status:?}")]
    AlreadyResolved {
        hold_id: String,
        status: pb::HoldStatus,
    },
    /// The hold was refused for another reason (invalid request, service down after
    /// retries, hold id reused for another request). Nothing ran.
    #[error("hold refused: {0}")]
    Hold(Status),
    /// The work failed; its hold was released.
    #[error("the metered work failed: {0}")]
    Work(E),
    /// The work reported a negative cost; its hold was released.
    #[error("the metered work reported a negative cost ({0} micros)")]
    NegativeCost(i64),
    /// The work finished but its cost could not be handed over (neither the recorder
    /// nor a direct settle took it). The hold expires at its time to live.
    #[error("the call's cost ({cost_micros} micros) could not be settled: {message}")]
    Settle { cost_micros: i64, message: String },
}

/// Runs metered calls: `Hold` → work → settle through the recorder, or release.
#[derive(Debug, Clone)]
pub struct Meter {
    credits: CreditsClient,
    recorder: Recorder,
    ttl_seconds: i64,
}

impl Meter {
    /// Holds through `credits`, settles through `recorder` (which must flush to the same
    /// credits-svc). Holds live 600 s unless [`Meter::ttl`] says otherwise.
    pub fn new(credits: CreditsClient, recorder: Recorder) -> Meter {
        Meter {
            credits,
            recorder,
            ttl_seconds: 600,
        }
    }

    /// How long a hold reserves if nobody settles or releases it (1–86,400 s): make
    /// it longer than the slowest call plus the recorder's flush delay.
    pub fn ttl(mut self, ttl: Duration) -> Meter {
        self.ttl_seconds = i64::try_from(ttl.as_secs())
            .unwrap_or(86_400)
            .clamp(1, 86_400);
        self
    }

    /// Reserves `reservation`, runs `work` (which returns its value and its real cost
    /// in micros), and hands the cost to the recorder as the hold's settle; returns the
    /// value once the settle is accepted. A failed `work` releases the hold, and so does
    /// dropping this future before `work` has returned.
    pub async fn call<T, E, F, Fut>(
        &self,
        reservation: Reservation,
        work: F,
    ) -> Result<T, MeteredError<E>>
    where
        F: FnOnce(HeldCredits) -> Fut,
        Fut: Future<Output = Result<(T, i64), E>>,
    {
        let mut guard = ReleaseOnDrop {
            credits: self.credits.clone(),
            hold_id: reservation.hold_id.clone(),
            armed: true,
        };
        let answer = self
            .credits
            .hold(pb::HoldRequest {
                user_id: reservation.user_id.clone(),
                hold_id: reservation.hold_id.clone(),
                amount_micros: reservation.amount_micros,
                ttl_seconds: self.ttl_seconds,
                description: reservation.description.clone(),
            })
            .await;
        let hold = match answer {
            Ok(answer) => answer.hold.unwrap_or_default(),
            Err(status) => {
                // An answer reserved nothing of ours; after a transport failure the
                // hold may exist, so the guard releases it (a harmless NOT_FOUND if not).
                if !crate::retry::is_retryable_status(&status) {
                    guard.armed = false;
                }
                return Err(match Refusal::of(&status) {
                    Some(Refusal::Insufficient {
                        balance_micros,
                        held_micros,
                        required_micros,
                    }) => MeteredError::Insufficient {
                        balance_micros,
                        held_micros,
                        required_micros,
                    },
                    _ => MeteredError::Hold(status),
                });
            }
        };
        if hold.status() != pb::HoldStatus::Held {
            // A duplicate of a call that has ended: not ours to release or run again.
            guard.armed = false;
            return Err(MeteredError::AlreadyResolved {
                hold_id: reservation.hold_id,
                status: hold.status(),
            });
        }
        let held = HeldCredits {
            hold,
            credits: self.credits.clone(),
        };
        let (value, cost_micros) = match work(held).await {
            Ok(done) => done,
            Err(error) => {
                guard.release_now("work failed").await;
                return Err(MeteredError::Work(error));
            }
        };
        if cost_micros < 0 {
            guard.release_now("negative cost").await;
            return Err(MeteredError::NegativeCost(cost_micros));
        }
        // From here the settle owns the hold: never release it.
        guard.armed = false;
        let settlement = Settlement::new(reservation.hold_id, reservation.user_id, cost_micros)
            .with_description(reservation.description);
        let (recorder, credits) = (self.recorder.clone(), self.credits.clone());
        let handover = tokio::spawn(async move {
            let refused = match recorder
                .record_charge(Charge::SettleHold(settlement.clone()))
                .await
            {
                Ok(()) => return Ok(()),
                Err(refused) => refused,
            };
            tracing::warn!(hold_id = %settlement.hold_id, error = %refused, "the recorder refused a settle; sending it directly");
            metrics::counter!("reeve_client_metered_direct_settles_total").increment(1);
            credits
                .settle_hold(settlement.to_proto())
                .await
                .map(|_| ())
                .map_err(|status| format!("{refused}; then SettleHold: {status}"))
        });
        match handover.await {
            Ok(Ok(())) => Ok(value),
            Ok(Err(message)) => Err(MeteredError::Settle {
                cost_micros,
                message,
            }),
            Err(join) => Err(MeteredError::Settle {
                cost_micros,
                message: join.to_string(),
            }),
        }
    }
}

/// Releases the hold unless disarmed: when the work failed, or when the call's future
/// was dropped while the hold may exist and nothing settles it.
struct ReleaseOnDrop {
    credits: CreditsClient,
    hold_id: String,
    armed: bool,
}

impl ReleaseOnDrop {
    async fn release_now(&mut self, reason: &'static str) {
        self.armed = false;
        release(self.credits.clone(), self.hold_id.clone(), reason).await;
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (credits, hold_id) = (self.credits.clone(), std::mem::take(&mut self.hold_id));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(release(credits, hold_id, "dropped"));
            }
            Err(_) => {
                tracing::warn!(%hold_id, "metered call dropped outside a runtime; its hold expires at its time to live");
            }
        }
    }
}

/// Frees the hold; a hold not found yet (the Hold of a dropped call may still be on
/// its way) is tried again a few times. Whatever fails, the hold expires charging
/// nothing.
async fn release(credits: CreditsClient, hold_id: String, reason: &'static str) {
    for attempt in 1..=3u32 {
        let answer = credits
            .release_hold(pb::ReleaseHoldRequest {
                hold_id: hold_id.clone(),
            })
            .await;
        match answer {
            Ok(_) => {
                metrics::counter!("reeve_client_metered_released_total", "reason" => reason)
                    .increment(1);
                tracing::debug!(%hold_id, reason, "hold released");
                return;
            }
            Err(status) if status.code() == Code::NotFound && attempt < 3 => {
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
            }
            Err(status) => {
                tracing::warn!(%hold_id, reason, code = ?status.code(), message = status.message(), "hold not released; it expires at its time to live");
                return;
            }
        }
    }
}
