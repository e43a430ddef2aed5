//! What an MCP server writes to stderr: every line goes to the node's log, and the last
//! few are kept, so that when the server fails to start or dies, its state (what
//! `flotilla nodes` shows, and the hub's answer to a call of a tool nobody offers) says
//! why in the server's own words ("No module named mcp_server_git"), not only the
//! handshake's "connection closed".

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt},
    sync::watch,
};

/// Lines kept.
const LINES: usize = 5;
/// Longest line kept or logged; the rest of a longer line is dropped.
const LINE_BYTES: usize = 512;

/// The last lines one run of a server wrote to stderr. Cheap to clone.
#[derive(Clone)]
pub struct StderrTail {
    server: Arc<str>,
    lines: Arc<Mutex<VecDeque<String>>>,
    /// True once the server closed its stderr (it exited).
    closed: watch::Sender<bool>,
}

impl StderrTail {
    pub fn new(server: &str) -> Self {
        Self {
            server: server.into(),
            lines: Arc::default(),
            closed: watch::Sender::new(false),
        }
    }

    /// Reads `stderr` to its end on a task of its own.
    pub fn follow(&self, stderr: impl AsyncRead + Unpin + Send + 'static) {
        let tail = self.clone();
        tokio::spawn(async move {
            tail.read(stderr).await;
            tail.closed.send_replace(true);
        });
    }

    async fn read(&self, mut stderr: impl AsyncRead + Unpin) {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        let mut cut = false;
        loop {
            let n = match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                if b == b'\n' {
                    self.push(&line);
                    line.clear();
                    cut = false;
                } else if line.len() < LINE_BYTES {
                    line.push(b);
                } else if !cut {
                    cut = true;
                }
            }
        }
        if !line.is_empty() {
            self.push(&line);
        }
    }

    fn push(&self, raw: &[u8]) {
        let text = String::from_utf8_lossy(raw);
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        tracing::info!(server = %self.server, "stderr: {text}");
        let mut lines = self.lines.lock().expect("stderr tail lock");
        if lines.len() == LINES {
            lines.pop_front();
        }
        lines.push_back(text.to_owned());
    }

    /// The lines kept, oldest first, joined for one line of text ("" if none).
    pub fn text(&self) -> String {
        let lines = self.lines.lock().expect("stderr tail lock");
        lines.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// `text`, once the server closed stderr (or after `wait`: a server that is still up).
    pub async fn text_when_closed(&self, wait: Duration) -> String {
        let mut closed = self.closed.subscribe();
        let _ = tokio::time::timeout(wait, closed.wait_for(|c| *c)).await;
        self.text()
    }

    /// `why`, with what the server last wrote to stderr, if anything.
    pub async fn explain(&self, why: String) -> String {
        match self.text_when_closed(Duration::from_millis(500)).await {
            t if t.is_empty() => why,
            t => format!("{why}; its stderr said: {t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_last_lines_are_kept_bounded_and_long_lines_cut() {
        let tail = StderrTail::new("demo");
        let mut text = String::new();
        for i in 0..8 {
            text.push_str(&format!("line {i}\n"));
        }
        text.push_str(&"x".repeat(10_000));
        text.push_str("\nTraceback: No module named 'mcp_server_git'");
        tail.follow(std::io::Cursor::new(text.into_bytes()));
        let got = tail.text_when_closed(Duration::from_secs(5)).await;
        let lines: Vec<&str> = got.split(" | ").collect();
        assert_eq!(lines.len(), LINES, "{got}");
        assert_eq!(lines[0], "line 5");
        assert_eq!(lines[3].len(), LINE_BYTES, "a long line is cut");
        assert_eq!(lines[4], "Traceback: No module named 'mcp_server_git'");
        assert_eq!(
            tail.explain("cannot start".into()).await,
            format!("cannot start; its stderr said: {got}")
        );
        assert_eq!(
            StderrTail::new("quiet")
                .explain("cannot start".into())
                .await,
            "cannot start"
        );
    }
}
