//! Progress on stderr while a person watches: a spinner naming the level
//! being run and one line per finished level. When stderr is not a terminal
//! (a CI log, a file) only the lines are printed, plainly; nothing with
//! --quiet.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

pub struct Progress {
    bar: ProgressBar,
    /// Lines go straight to stderr: nobody watches a spinner in a log.
    plain: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        let target = if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("valid template"),
        );
        if !bar.is_hidden() {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        let plain = !quiet && !std::io::stderr().is_terminal();
        Progress { bar, plain }
    }

    /// What is running now.
    pub fn status(&self, msg: String) {
        self.bar.set_message(msg);
    }

    /// A line that stays above the spinner.
    pub fn line(&self, msg: String) {
        if self.plain {
            eprintln!("{msg}");
        } else {
            self.bar.println(msg);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
