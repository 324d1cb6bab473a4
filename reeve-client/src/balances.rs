//! Balance questions coalesced: [`BalanceReader::get`] asks for one user's balance,
//! and the questions waiting together go to credits-svc as one `GetBalances` call (up
//! to 256 users; two calls in flight). For a caller answering many concurrent balance
//! requests (the bridge), this pays one gRPC call per batch instead of one per
//! question. No question waits for a timer: a lone one is sent at once.
//!
//! Each answer is the one `GetBalance` would give (a lone question is a `GetBalance`
//! call). A batch refused as a whole for an invalid id is asked again one question at
//! a time, so only that question fails; any other failure (after the client's
//! retries) answers every question of the batch.
//!
//! A credits-svc that does not know `GetBalances` yet (older than this crate, during a
//! rolling upgrade that reached the caller first) answers it `UNIMPLEMENTED`: that
//! batch's questions then go as concurrent `GetBalance` calls, each with its own
//! answer or error. Nothing remembers the refusal: behind a load balancer, old and
//! new servers answer in turn.

use reeve_proto::credits::v1 as pb;
use reeve_runtime::group_commit::{BatchFn, GroupCommit};
use tonic::{Code, Status};

use crate::credits::CreditsClient;

/// Users per `GetBalances` call at most (the service takes up to 1,000).
const MAX_BATCH: usize = 256;
/// `GetBalances` calls in flight at once.
const WORKERS: usize = 2;

/// A cheap-to-clone handle to the coalescing workers; they stop when every handle is
/// dropped. Must be made inside a Tokio runtime.
#[derive(Clone)]
pub struct BalanceReader {
    inner: GroupCommit<String, Answer, Status>,
}

/// One question's answer: its own, when the batch was asked as `GetBalance` calls.
type Answer = Result<pb::GetBalanceResponse, Status>;

impl std::fmt::Debug for BalanceReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalanceReader").finish_non_exhaustive()
    }
}

impl BalanceReader {
    /// Questions asked through `client` (its retry policy applies to each batch).
    pub fn new(client: CreditsClient) -> BalanceReader {
        let run: BatchFn<String, Answer, Status> = std::sync::Arc::new(move |user_ids| {
            let client = client.clone();
            Box::pin(async move { ask(&client, user_ids).await })
        });
        BalanceReader {
            inner: GroupCommit::start_isolating(WORKERS, MAX_BATCH, run, one_bad_id),
        }
    }

    /// The user's balance, as `GetBalance` answers it.
    pub async fn get(&self, user_id: impl Into<String>) -> Result<pb::GetBalanceResponse, Status> {
        self.inner
            .submit(user_id.into())
            .await
            .map_err(|_| Status::unavailable("the balance reader has stopped"))??
    }
}

/// A refusal that may come from one id of the batch: ask each alone.
fn one_bad_id(status: &Status) -> bool {
    status.code() == Code::InvalidArgument
}

async fn ask(client: &CreditsClient, user_ids: Vec<String>) -> Result<Vec<Answer>, Status> {
    // A lone question (a quiet moment, or one asked again alone) is a `GetBalance`.
    if let [user_id] = user_ids.as_slice() {
        let answer = client
            .get_balance(pb::GetBalanceRequest {
                user_id: user_id.clone(),
            })
            .await;
        return Ok(vec![answer]);
    }
    let asked = user_ids.len();
    let balances = match client
        .get_balances(pb::GetBalancesRequest {
            user_ids: user_ids.clone(),
        })
        .await
    {
        Ok(answer) => answer.balances,
        Err(status) if status.code() == Code::Unimplemented => {
            tracing::debug!(
                questions = asked,
                "credits-svc does not know GetBalances; asking GetBalance for each"
            );
            metrics::counter!("reeve_client_balance_fallback_batches_total").increment(1);
            return Ok(futures::future::join_all(
                user_ids
                    .into_iter()
                    .map(|user_id| client.get_balance(pb::GetBalanceRequest { user_id })),
            )
            .await);
        }
        Err(status) => return Err(status),
    };
    if balances.len() != asked {
        return Err(Status::internal(format!(
            "credits-svc answered {} balances for {asked} users",
            balances.len()
        )));
    }
    Ok(balances.into_iter().map(Ok).collect())
}
