//! How a call's events are shown to people: on a terminal, one live line (a spinner with
//! the task's state and time, a bar once the tool reports progress with a total); written
//! to a file or a pipe, one plain line per event. Scripts (`-o json`) see none.

use std::{io::IsTerminal, time::Duration};

use flotilla_proto as pb;
use indicatif::{ProgressBar, ProgressStyle};

pub(crate) enum Progress {
    Quiet,
    Lines,
    Live(ProgressBar),
}

impl Progress {
    /// For people (`people`), live when stderr is a terminal; otherwise nothing.
    pub(crate) fn new(people: bool) -> Self {
        if !people {
            return Self::Quiet;
        }
        if !std::io::stderr().is_terminal() {
            return Self::Lines;
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>3} {msg}")
                .expect("a valid progress template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Self::Live(bar)
    }

    pub(crate) fn event(&self, ev: &pb::TaskEvent) {
        match self {
            Self::Quiet => {}
            Self::Lines => eprintln!("  {}", describe(ev)),
            Self::Live(bar) => {
                if let (pb::EventKind::Progress, Some(total)) = (ev.kind(), ev.total) {
                    if total > 0.0 && bar.length().is_none() {
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{spinner} {elapsed:>3} [{bar:30}] {pos}/{len} {msg}",
                            )
                            .expect("a valid progress template")
                            .progress_chars("=> "),
                        );
                    }
                    if total > 0.0 {
                        bar.set_length(total.round() as u64);
                        bar.set_position(ev.progress.round().max(0.0) as u64);
                        // The bar shows the figures; the tool's own words go beside it.
                        bar.set_message(ev.message.clone());
                        return;
                    }
                }
                bar.set_message(describe(ev));
            }
        }
    }

    /// Clears the live line (the result is printed after it).
    pub(crate) fn finish(&self) {
        if let Self::Live(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// One event in words.
pub(crate) fn describe(ev: &pb::TaskEvent) -> String {
    match ev.kind() {
        pb::EventKind::Progress => {
            let total = ev.total.map(|t| format!("/{t}")).unwrap_or_default();
            let msg = if ev.message.is_empty() {
                String::new()
            } else {
                format!(" {}", ev.message)
            };
            format!("progress {}{total}{msg}", ev.progress)
        }
        pb::EventKind::Assigned => format!("assigned to {} (attempt {})", ev.node_id, ev.attempt),
        pb::EventKind::Queued if !ev.message.is_empty() => format!("queued again: {}", ev.message),
        kind => kind.name().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_words() {
        let ev = |kind: pb::EventKind| pb::TaskEvent {
            kind: kind as i32,
            ..Default::default()
        };
        let mut p = ev(pb::EventKind::Progress);
        p.progress = 2.0;
        p.total = Some(5.0);
        p.message = "cloning".into();
        assert_eq!(describe(&p), "progress 2/5 cloning");
        let mut a = ev(pb::EventKind::Assigned);
        a.node_id = "edge-1".into();
        a.attempt = 2;
        assert_eq!(describe(&a), "assigned to edge-1 (attempt 2)");
        let mut q = ev(pb::EventKind::Queued);
        assert_eq!(describe(&q), pb::EventKind::Queued.name());
        q.message = "node edge-1 was lost".into();
        assert_eq!(describe(&q), "queued again: node edge-1 was lost");
    }
}
