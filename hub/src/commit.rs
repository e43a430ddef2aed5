//! Group commit: commands that arrive while earlier ones are being committed share one Raft
//! entry (`Command::Batch`). Nothing waits to fill a batch: a command goes out as soon as a
//! commit slot is free, together with whatever queued behind it, so a lone write costs what
//! it did and a busy hub makes fewer, larger entries. Each entry costs a log append,
//! replication to every hub, an apply and the apply hooks, so fewer entries mean less work
//! per call.
//!
//! A write may itself be a `Command::Batch` of commands that must share an entry (a
//! submission and its assignment): it joins a batch as one unit, its commands kept together
//! and in order, and is answered with the `Response::Batch` of its own commands.

use std::sync::Arc;

use openraft::error::{ClientWriteError, Fatal, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::{
    raft::{HubNode, Raft},
    state::{Command, Response},
};

pub type WriteError = RaftError<u64, ClientWriteError<u64, HubNode>>;
type Reply = oneshot::Sender<Result<Response, WriteError>>;

/// Entries being committed at once.
const IN_FLIGHT: usize = 4;
/// Most commands in one entry.
const MAX_BATCH: usize = 128;
/// Most bytes (as `Command::approx_bytes` counts them) in one entry: far below what one
/// Raft message between hubs may carry, whatever the commands.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Commands waiting for a commit slot; beyond it writers wait to queue.
const QUEUE: usize = 4096;

/// The write path into Raft. Cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    raft: Raft,
    tx: mpsc::Sender<(Command, Reply)>,
}

impl GroupCommit {
    /// Starts the committer on `raft` (it ends when every handle is dropped).
    pub fn start(raft: Raft) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft.clone(), rx));
        Self { raft, tx }
    }

    /// Commits `cmd` (alone or with others) and returns what applying it answered.
    pub async fn write(&self, cmd: Command) -> Result<Response, WriteError> {
        if !groupable(&cmd) {
            return self.raft.client_write(cmd).await.map(|r| r.data);
        }
        let (reply, answer) = oneshot::channel();
        if self.tx.send((cmd, reply)).await.is_err() {
            return Err(RaftError::Fatal(Fatal::Stopped));
        }
        answer
            .await
            .unwrap_or(Err(RaftError::Fatal(Fatal::Stopped)))
    }
}

/// Whether `cmd` may share an entry: a batchable command, or a batch of them.
fn groupable(cmd: &Command) -> bool {
    match cmd {
        Command::Batch(cmds) => cmds.iter().all(Command::batchable),
        c => c.batchable(),
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<(Command, Reply)>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // A command taken from the queue that did not fit the last batch: it starts the next.
    let mut held = None;
    loop {
        let first = match held.take() {
            Some(c) => c,
            None => match rx.recv().await {
                Some(c) => c,
                None => return,
            },
        };
        // While every slot is busy, more commands queue up behind `first`.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.0.approx_bytes();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let Ok(next) = rx.try_recv() else { break };
            bytes += next.0.approx_bytes();
            if bytes > MAX_BATCH_BYTES {
                held = Some(next);
                break;
            }
            batch.push(next);
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            commit(&raft, batch).await;
            drop(slot);
        });
    }
}

async fn commit(raft: &Raft, mut batch: Vec<(Command, Reply)>) {
    if batch.len() == 1 {
        let (cmd, reply) = batch.pop().expect("one command");
        let _ = reply.send(raft.client_write(cmd).await.map(|r| r.data));
        return;
    }
    // Units of several commands are flattened into the entry; `shape` remembers how many
    // commands each writer gave (`None`: one command, answered as itself).
    let mut cmds = Vec::new();
    let mut replies = Vec::with_capacity(batch.len());
    for (cmd, reply) in batch {
        match cmd {
            Command::Batch(unit) => {
                replies.push((reply, Some(unit.len())));
                cmds.extend(unit);
            }
            c => {
                replies.push((reply, None));
                cmds.push(c);
            }
        }
    }
    match raft.client_write(Command::Batch(cmds)).await {
        Ok(r) => {
            let answers = match r.data {
                Response::Batch(answers) => answers,
                other => vec![other],
            };
            // `apply` answers every command of a batch, in order.
            let mut answers = answers.into_iter();
            for (reply, shape) in replies {
                let answer = match shape {
                    None => answers.next(),
                    Some(n) => Some(Response::Batch(answers.by_ref().take(n).collect())),
                };
                let _ = reply.send(answer.ok_or(RaftError::Fatal(Fatal::Panicked)));
            }
        }
        Err(e) => {
            for (reply, _) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
