//! Progress for long operations that the service answers in one piece (a boot, a kernel
//! install): a spinner with what is happening, on a terminal only, so piped output and
//! scripts see nothing but the result. Pulls stream their own progress (`commands/image/pull.rs`).

use std::io::IsTerminal;
use std::time::Duration;

/// A spinner saying `message` on stderr while the caller waits; `None` when `quiet` or when
/// stderr is not a terminal. Cleared by [`done`].
pub fn spinner(message: String, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(message);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .expect("a valid progress template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

/// Clears a spinner from [`spinner`].
pub fn done(bar: Option<indicatif::ProgressBar>) {
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
