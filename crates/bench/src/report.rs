//! What a run printed, kept for `--markdown`: a value passed down to each scenario.

#[derive(Default)]
pub struct Report {
    text: String,
}

impl Report {
    /// Prints `line` and keeps it.
    pub fn say(&mut self, line: String) {
        println!("{line}");
        self.text.push_str(&line);
        self.text.push('\n');
    }

    /// Everything said so far, one line each.
    pub fn text(&self) -> &str {
        &self.text
    }
}
