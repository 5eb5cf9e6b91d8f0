//! Percentiles, the human-readable table, and the `GOAL` lines that close
//! every run: `GOAL <name> measured=<value> target=<value> met|short`.

use std::{fmt::Write, time::Duration};

/// The `p`th percentile (0–100) of sorted samples; zero when there are none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// What a goal asks of its measured value.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
    /// Reported, not judged.
    Report,
}

#[derive(Debug, Clone)]
pub struct Goal {
    pub name: &'static str,
    /// `None` when the figure could not be measured (printed as `n/a`, short).
    pub measured: Option<f64>,
    pub unit: &'static str,
    pub target: Target,
    /// The run did not complete (deadline, dropped peers): never met.
    pub incomplete: bool,
}

impl Goal {
    pub fn met(&self) -> bool {
        if self.incomplete {
            return false;
        }
        match (self.measured, self.target) {
            (Some(v), Target::AtMost(t)) => v <= t,
            (Some(v), Target::AtLeast(t)) => v >= t,
            (Some(_), Target::Report) => true,
            (None, _) => false,
        }
    }

    pub fn line(&self) -> String {
        let measured = match self.measured {
            Some(v) => format!("{}{}", self.fmt_judged(v), self.unit),
            None => "n/a".into(),
        };
        let target = match self.target {
            Target::AtMost(t) | Target::AtLeast(t) => format!("{t}"),
            Target::Report => "report".into(),
        };
        let verdict = if self.met() { "met" } else { "short" };
        format!(
            "GOAL {} measured={measured} target={target} {verdict}",
            self.name
        )
    }

    /// `v` as [`fmt_num`] prints it, with more decimals where fewer would
    /// read as the other verdict: 1.2504 against "at most 1.25" is short,
    /// and printed 1.2504, not 1.25.
    fn fmt_judged(&self, v: f64) -> String {
        let met = self.met();
        let mut shown = fmt_num(v);
        let mut decimals = shown.split('.').nth(1).map_or(0, str::len);
        while decimals < 6 {
            let read: f64 = shown.parse().unwrap_or(v);
            let reads_met = match self.target {
                Target::AtMost(t) => read <= t,
                Target::AtLeast(t) => read >= t,
                Target::Report => met,
            };
            if reads_met == met {
                break;
            }
            decimals += 1;
            shown = format!("{v:.decimals$}");
        }
        shown
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Everything one run found.
#[derive(Debug, Default)]
pub struct Report {
    /// (figure, tincan, baseline, ratio or remark)
    rows: Vec<[String; 4]>,
    notes: Vec<String>,
    /// Machine-readable `RESULT key=value` pairs, for docs/benchmarks.md.
    results: Vec<(String, f64)>,
    goals: Vec<Goal>,
}

impl Report {
    pub fn row(&mut self, figure: &str, tincan: String, baseline: String, ratio: String) {
        self.rows.push([figure.into(), tincan, baseline, ratio]);
    }

    pub fn note(&mut self, note: String) {
        tracing::info!(%note);
        self.notes.push(note);
    }

    pub fn result(&mut self, key: &str, value: f64) {
        self.results.push((key.into(), value));
    }

    pub fn goal(&mut self, goal: Goal) {
        self.goals.push(goal);
    }

    pub fn goals(&self) -> &[Goal] {
        &self.goals
    }

    /// The table, the notes, the results, and last the goal lines.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let header = [
            "figure".to_string(),
            "tincan".into(),
            "raw quinn".into(),
            "ratio".into(),
        ];
        let mut widths = header.clone().map(|h| h.len());
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in std::iter::once(&header).chain(&self.rows) {
            let _ = writeln!(
                out,
                "{:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}",
                row[0],
                row[1],
                row[2],
                row[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3]
            );
        }
        out.push('\n');
        for note in &self.notes {
            let _ = writeln!(out, "NOTE {note}");
        }
        for (key, value) in &self.results {
            let _ = writeln!(out, "RESULT {key}={value}");
        }
        for goal in &self.goals {
            let _ = writeln!(out, "{}", goal.line());
        }
        out
    }
}

/// Microseconds with one decimal.
pub fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// Bytes in KiB / MiB as fits.
pub fn bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_picks_the_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_micros(51));
        assert_eq!(percentile(&s, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn goal_lines_have_the_documented_form() {
        let g = Goal {
            name: "direct_rtt",
            measured: Some(1.1),
            unit: "",
            target: Target::AtMost(1.25),
            incomplete: false,
        };
        assert_eq!(g.line(), "GOAL direct_rtt measured=1.10 target=1.25 met");
        let g = Goal {
            name: "relay_throughput",
            measured: None,
            unit: "",
            target: Target::AtLeast(0.5),
            incomplete: false,
        };
        assert_eq!(
            g.line(),
            "GOAL relay_throughput measured=n/a target=0.5 short"
        );
    }

    #[test]
    fn a_value_that_rounds_onto_the_target_shows_the_digits_that_decide() {
        let goal = |measured, target| Goal {
            name: "g",
            measured: Some(measured),
            unit: "",
            target,
            incomplete: false,
        };
        let line = |measured, target| goal(measured, target).line();
        assert_eq!(
            line(1.2504, Target::AtMost(1.25)),
            "GOAL g measured=1.2504 target=1.25 short"
        );
        assert_eq!(
            line(1.2496, Target::AtMost(1.25)),
            "GOAL g measured=1.25 target=1.25 met"
        );
        assert_eq!(
            line(0.79996, Target::AtLeast(0.8)),
            "GOAL g measured=0.79996 target=0.8 short"
        );
        assert_eq!(
            line(0.8312, Target::AtLeast(0.8)),
            "GOAL g measured=0.831 target=0.8 met"
        );
    }
}
