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
            Some(v) => format!("{}{}", fmt_num(v), self.unit),
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
}
