//! The recorder's write-ahead file: what makes an accepted item survive `kill -9`.
//!
//! ## Format
//! Append-only, one JSON object per line, each line ending in `\n`:
//!
//! ```text
//! {"op":"deduct","seq":7,"user_id":"alice","amount_micros":1500,"idempotency_key":"llm-call-1","description":""}
//! {"op":"settle_hold","seq":8,"hold_id":"llm-call-2","user_id":"alice","amount_micros":900,"description":""}
//! {"op":"done","seq":7}
//! ```
//!
//! One op per [`Charge`] variant (`deduct`, `settle_hold`); `done` lines serve both.
//!
//! - An item line is written, and the file `fdatasync`ed, *before* `record` returns
//!   (group commit: one writer thread writes every line waiting and syncs once for
//!   all of them, so 256 concurrent callers share one sync).
//! - A `done` line is written (and synced) once the item's outcome is final (applied,
//!   duplicate, insufficient or invalid), *before* the outcome handler hears of it.
//!   A whole-batch refusal (say, a token without the deduct scope) writes no `done`: the
//!   item stays to be replayed at the next start.
//! - `seq` numbers the items of one file; it never repeats within a file.
//!
//! ## Recovery and compaction
//! At open, every complete line is read; the items without a `done` are the ones to
//! replay, in their original order, with their original keys (the server answers
//! `duplicate` for any that had been applied before the crash, so nothing is applied
//! twice). A last line without its `\n` is a write the crash cut short: its `record`
//! never returned, so it is dropped. Any other unreadable line stops the open with an
//! error: money is never guessed at. The file is then rewritten with only the items to
//! replay (write a temporary file, sync, rename over, sync the folder), and while
//! running it is rewritten the same way whenever it has grown past a threshold and is
//! mostly `done` lines; when nothing is pending it is simply truncated.
//!
//! An item whose line was written but whose `record` had not yet returned when the
//! process died is replayed too (the caller asked for it; the key keeps it single).
//! An item `record` refused (buffer full, closed) is never written. One process per
//! file: two recorders sharing a file would replay each other's items.
//!
//! This module does file I/O only; it never talks to a service.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::recorder::Charge;

/// Rewrite the file once it is larger than this and at least 4× the pending items.
const COMPACT_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("write-ahead file {path}: line {line} is unreadable ({reason}); refusing to guess")]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("the write-ahead file failed earlier and accepts nothing more")]
    Failed,
}

/// One line of the file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Deduct {
        seq: u64,
        user_id: String,
        amount_micros: i64,
        idempotency_key: String,
        #[serde(default)]
        description: String,
    },
    SettleHold {
        seq: u64,
        hold_id: String,
        user_id: String,
        amount_micros: i64,
        #[serde(default)]
        description: String,
    },
    Done {
        seq: u64,
    },
}

impl Line {
    fn of(seq: u64, charge: &Charge) -> Line {
        match charge {
            Charge::Deduct(d) => Line::Deduct {
                seq,
                user_id: d.user_id.clone(),
                amount_micros: d.amount_micros,
                idempotency_key: d.idempotency_key.clone(),
                description: d.description.clone(),
            },
            Charge::SettleHold(s) => Line::SettleHold {
                seq,
                hold_id: s.hold_id.clone(),
                user_id: s.user_id.clone(),
                amount_micros: s.amount_micros,
                description: s.description.clone(),
            },
        }
    }

    fn encode(&self) -> Vec<u8> {
        // Serialising these plain fields cannot fail.
        let mut bytes = serde_json::to_vec(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}

enum Command {
    Append(Charge, oneshot::Sender<Result<u64, WalError>>),
    Done(Vec<u64>, oneshot::Sender<Result<(), WalError>>),
    Close(oneshot::Sender<Result<(), WalError>>),
}

/// A handle on the writer thread; cheap to clone.
#[derive(Clone)]
pub(crate) struct Wal {
    commands: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wal(..)")
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads `bytes` (a whole file): the pending items by seq, and the highest seq seen.
fn recover(path: &Path, bytes: &[u8]) -> Result<(BTreeMap<u64, Line>, u64), WalError> {
    let mut pending = BTreeMap::new();
    let mut max_seq = 0;
    let complete = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(last) => &bytes[..=last],
        None => &[][..],
    };
    for (index, raw) in complete.split(|b| *b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        let line: Line = serde_json::from_slice(raw).map_err(|e| WalError::Corrupt {
            path: path.to_owned(),
            line: index + 1,
            reason: e.to_string(),
        })?;
        match line {
            Line::Deduct { seq, .. } | Line::SettleHold { seq, .. } => {
                max_seq = max_seq.max(seq);
                pending.insert(seq, line);
            }
            Line::Done { seq } => {
                max_seq = max_seq.max(seq);
                pending.remove(&seq);
            }
        }
    }
    Ok((pending, max_seq))
}

/// Replaces `path` with exactly `lines`, atomically (temporary file, sync, rename,
/// sync of the folder), and returns the file opened for appending.
fn rewrite(path: &Path, lines: &BTreeMap<u64, Line>) -> Result<(File, u64), WalError> {
    let temporary = path.with_extension("compacting");
    let mut bytes = Vec::new();
    for line in lines.values() {
        bytes.extend(line.encode());
    }
    {
        let mut file = File::create(&temporary).map_err(io_error(&temporary))?;
        file.write_all(&bytes).map_err(io_error(&temporary))?;
        file.sync_all().map_err(io_error(&temporary))?;
    }
    std::fs::rename(&temporary, path).map_err(io_error(path))?;
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(folder)
            .and_then(|f| f.sync_all())
            .map_err(io_error(folder))?;
    }
    let file = OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_error(path))?;
    Ok((file, bytes.len() as u64))
}

fn charge_of(line: &Line) -> Option<Charge> {
    match line {
        Line::Deduct {
            user_id,
            amount_micros,
            idempotency_key,
            description,
            ..
        } => Some(Charge::Deduct(crate::recorder::Deduction {
            user_id: user_id.clone(),
            amount_micros: *amount_micros,
            idempotency_key: idempotency_key.clone(),
            description: description.clone(),
        })),
        Line::SettleHold {
            hold_id,
            user_id,
            amount_micros,
            description,
            ..
        } => Some(Charge::SettleHold(crate::recorder::Settlement {
            hold_id: hold_id.clone(),
            user_id: user_id.clone(),
            amount_micros: *amount_micros,
            description: description.clone(),
        })),
        Line::Done { .. } => None,
    }
}

impl Wal {
    /// Opens (or creates) the file, recovers the items to replay (in order, with their
    /// seq), compacts it, and starts the writer thread.
    pub(crate) fn open(path: &Path) -> Result<(Wal, Vec<(u64, Charge)>), WalError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error(path)(e)),
        };
        let (pending, max_seq) = recover(path, &bytes)?;
        let (file, size) = rewrite(path, &pending)?;
        let replay = pending
            .iter()
            .filter_map(|(seq, line)| charge_of(line).map(|c| (*seq, c)))
            .collect();
        metrics::gauge!("reeve_client_recorder_wal_items").set(pending.len() as f64);
        let (commands, receiver) = mpsc::unbounded_channel();
        let writer = Writer {
            path: path.to_owned(),
            file,
            size,
            pending,
            pending_bytes: size,
            next_seq: max_seq + 1,
            failed: false,
        };
        std::thread::Builder::new()
            .name("reeve-recorder-wal".to_owned())
            .spawn(move || writer.run(receiver))
            .map_err(io_error(path))?;
        Ok((Wal { commands }, replay))
    }

    /// Writes `charge` durably; its seq once synced.
    pub(crate) async fn append(&self, charge: Charge) -> Result<u64, WalError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Append(charge, reply))
            .map_err(|_| WalError::Failed)?;
        answer.await.map_err(|_| WalError::Failed)?
    }

    /// Marks items final, durably.
    pub(crate) async fn done(&self, seqs: Vec<u64>) -> Result<(), WalError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Done(seqs, reply))
            .map_err(|_| WalError::Failed)?;
        answer.await.map_err(|_| WalError::Failed)?
    }

    /// Compacts (truncates when nothing is pending) and stops the writer.
    pub(crate) async fn close(&self) -> Result<(), WalError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Close(reply))
            .map_err(|_| WalError::Failed)?;
        answer.await.map_err(|_| WalError::Failed)?
    }
}

struct Writer {
    path: PathBuf,
    file: File,
    size: u64,
    pending: BTreeMap<u64, Line>,
    pending_bytes: u64,
    next_seq: u64,
    failed: bool,
}

enum Reply {
    Append(oneshot::Sender<Result<u64, WalError>>, u64),
    Done(oneshot::Sender<Result<(), WalError>>),
}

impl Writer {
    fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut group = Vec::new();
        while let Some(first) = commands.blocking_recv() {
            group.push(first);
            while group.len() < 4096 {
                match commands.try_recv() {
                    Ok(more) => group.push(more),
                    Err(_) => break,
                }
            }
            if self.write_group(&mut group) {
                return;
            }
        }
    }

    /// Writes and syncs one group, then answers it; true when a Close was served.
    fn write_group(&mut self, group: &mut Vec<Command>) -> bool {
        let mut bytes = Vec::new();
        let mut replies = Vec::new();
        let mut close = None;
        for command in group.drain(..) {
            match command {
                Command::Append(charge, reply) => {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let line = Line::of(seq, &charge);
                    let encoded = line.encode();
                    self.pending_bytes += encoded.len() as u64;
                    bytes.extend(encoded);
                    self.pending.insert(seq, line);
                    replies.push(Reply::Append(reply, seq));
                }
                Command::Done(seqs, reply) => {
                    for seq in seqs {
                        if let Some(line) = self.pending.remove(&seq) {
                            self.pending_bytes = self
                                .pending_bytes
                                .saturating_sub(line.encode().len() as u64);
                        }
                        bytes.extend(Line::Done { seq }.encode());
                    }
                    replies.push(Reply::Done(reply));
                }
                Command::Close(reply) => close = Some(reply),
            }
        }
        let written = if self.failed {
            Err(WalError::Failed)
        } else {
            self.file
                .write_all(&bytes)
                .and_then(|()| self.file.sync_data())
                .map_err(io_error(&self.path))
        };
        if let Err(error) = &written {
            // What reached the file is unknown now: accept nothing more.
            tracing::error!(%error, "write-ahead file failed; the recorder accepts no more items");
            self.failed = true;
        } else {
            self.size += bytes.len() as u64;
        }
        metrics::gauge!("reeve_client_recorder_wal_items").set(self.pending.len() as f64);
        for reply in replies {
            match reply {
                Reply::Append(reply, seq) => {
                    let _ =
                        reply.send(written.as_ref().map(|()| seq).map_err(|_| WalError::Failed));
                }
                Reply::Done(reply) => {
                    let _ = reply.send(written.as_ref().copied().map_err(|_| WalError::Failed));
                }
            }
        }
        let compact = !self.failed
            && (close.is_some()
                || (self.size > COMPACT_BYTES && self.size > 4 * self.pending_bytes));
        let compacted = if compact { self.compact() } else { Ok(()) };
        if let Some(reply) = close {
            let _ = reply.send(if self.failed {
                Err(WalError::Failed)
            } else {
                compacted
            });
            return true;
        }
        if let Err(error) = compacted {
            tracing::error!(%error, "write-ahead file compaction failed");
            self.failed = true;
        }
        false
    }

    fn compact(&mut self) -> Result<(), WalError> {
        if self.pending.is_empty() {
            self.file.set_len(0).map_err(io_error(&self.path))?;
            self.file.sync_all().map_err(io_error(&self.path))?;
            self.size = 0;
            self.pending_bytes = 0;
            return Ok(());
        }
        let (file, size) = rewrite(&self.path, &self.pending)?;
        self.file = file;
        self.size = size;
        self.pending_bytes = size;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::recorder::{Deduction, Settlement};

    fn deduction(key: &str) -> Charge {
        Charge::Deduct(Deduction::new("alice", 10, key))
    }

    fn keys(replay: &[(u64, Charge)]) -> Vec<String> {
        replay
            .iter()
            .map(|(_, c)| match c {
                Charge::Deduct(d) => d.idempotency_key.clone(),
                Charge::SettleHold(s) => format!("settle:{}", s.hold_id),
            })
            .collect()
    }

    #[tokio::test]
    async fn items_without_done_are_replayed_in_order_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recorder.wal");
        let (wal, replay) = Wal::open(&path).unwrap();
        assert!(replay.is_empty());
        let a = wal.append(deduction("a")).await.unwrap();
        let b = wal.append(deduction("b")).await.unwrap();
        let c = wal.append(deduction("c")).await.unwrap();
        wal.done(vec![b]).await.unwrap();
        assert!(a < b && b < c);
        drop(wal); // as a crash would: no close

        let (wal, replay) = Wal::open(&path).unwrap();
        assert_eq!(keys(&replay), ["a", "c"]);
        // New items never reuse a seq of the file.
        let d = wal.append(deduction("d")).await.unwrap();
        assert!(d > c);
        wal.done(vec![a, c, d]).await.unwrap();
        wal.close().await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        let (_wal, replay) = Wal::open(&path).unwrap();
        assert!(replay.is_empty());
    }

    #[tokio::test]
    async fn settles_and_deductions_share_the_file_and_replay_as_what_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recorder.wal");
        let (wal, _) = Wal::open(&path).unwrap();
        let settle = Charge::SettleHold(
            Settlement::new("hold-1", "alice", 0).with_description("released by cost 0"),
        );
        let a = wal.append(deduction("a")).await.unwrap();
        wal.append(settle.clone()).await.unwrap();
        let c = wal
            .append(Charge::SettleHold(Settlement::new("hold-2", "bob", 7)))
            .await
            .unwrap();
        wal.done(vec![a, c]).await.unwrap();
        drop(wal);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(r#"{"op":"settle_hold","seq":2,"hold_id":"hold-1","user_id":"alice","amount_micros":0,"description":"released by cost 0"}"#), "{text}");

        let (_wal, replay) = Wal::open(&path).unwrap();
        assert_eq!(replay, vec![(2, settle)]);
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_a_corrupt_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recorder.wal");
        let whole = Line::of(1, &deduction("kept")).encode();
        let mut bytes = whole.clone();
        bytes.extend_from_slice(br#"{"op":"deduct","seq":2,"user_id":"al"#);
        std::fs::write(&path, &bytes).unwrap();
        let (_wal, replay) = Wal::open(&path).unwrap();
        assert_eq!(keys(&replay), ["kept"]);
        assert_eq!(std::fs::read(&path).unwrap(), whole);

        let mut bad = b"not json\n".to_vec();
        bad.extend(whole);
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            Wal::open(&path),
            Err(WalError::Corrupt { line: 1, .. })
        ));
    }
}
