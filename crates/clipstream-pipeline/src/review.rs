//! Review routing: which labels a person must check.
//!
//! With `[model] review_min_score` and/or `review_min_margin`, each row
//! with labels is accepted or routed to review: routed when its top-1
//! score is below the minimum score, or its margin to the second label is
//! below the minimum margin. `clipstream eval` prints the score that
//! reaches a target precision, ready to paste.
//!
//! Rows carry the decision (`needs_review`, `review_reason`); routed
//! records also go to the review topic (`[sink.kafka] review_topic`) or,
//! for a local run, to `_review.jsonl` beside the Parquet files, with the
//! image URI and the top labels, so a labeling tool can pick them up.

use std::cmp::Ordering::{Equal, Greater};

use clipstream_model::zero_shot::Label;

use crate::stats::labels::ReviewDecision;

/// The thresholds of `[model]`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReviewPolicy {
    /// Route rows whose top-1 score is below this.
    pub min_score: Option<f32>,
    /// Route rows whose top-1 score is less than this above the second's.
    pub min_margin: Option<f32>,
}

/// What became of a row's labels.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Confident enough: no person needs to look.
    Accepted,
    /// A person should check; why.
    Routed(String),
}

impl ReviewPolicy {
    /// Whether any threshold is set.
    pub fn active(&self) -> bool {
        self.min_score.is_some() || self.min_margin.is_some()
    }

    /// Labels to compute per row so that the margin can be decided (the
    /// row keeps its `top_k`).
    pub fn labels_needed(&self, top_k: usize) -> usize {
        if self.min_margin.is_some() {
            top_k.max(2)
        } else {
            top_k
        }
    }

    /// The decision for labels ranked best first; `None` without a
    /// threshold or without labels.
    pub fn decide(&self, ranked: &[Label]) -> Option<Decision> {
        if !self.active() {
            return None;
        }
        let best = ranked.first()?;
        let mut why = Vec::new();
        // "Not at least": a score that is not a number is never enough.
        let below = |x: f32, min: f32| !matches!(x.partial_cmp(&min), Some(Greater | Equal));
        if let Some(min) = self.min_score
            && below(best.score, min)
        {
            why.push(format!(
                "top-1 score {:.4} below review_min_score {min}",
                best.score
            ));
        }
        if let Some(min) = self.min_margin {
            // With one class there is no second label: the margin is the
            // whole score.
            let second = ranked.get(1).map_or(0.0, |l| l.score);
            let margin = best.score - second;
            if below(margin, min) {
                why.push(format!(
                    "margin {margin:.4} to the second label below review_min_margin {min}"
                ));
            }
        }
        Some(if why.is_empty() {
            Decision::Accepted
        } else {
            Decision::Routed(why.join("; "))
        })
    }
}

/// A routed record, as a labeling tool reads it (`_review.jsonl`, the
/// review topic; the topic's message adds the model id): its id, image,
/// labels and why. The text is left out: the id leads to it, and a long one
/// must not make the message too big for the topic.
pub fn line(row: &crate::record::OutputRow) -> serde_json::Value {
    serde_json::json!({
        "id": row.id,
        "image_uri": row.image_uri,
        "labels": row.labels.as_deref().unwrap_or_default().iter()
            .map(|l| serde_json::json!({"label": l.label, "score": l.score}))
            .collect::<Vec<_>>(),
        "review_reason": row.review_reason,
        "source": &*row.source,
        "partition": row.partition,
        "offset": row.offset,
        "processed_at_ms": row.processed_at_ms,
    })
}

/// `clipstream_review_total`, by decision.
#[derive(Debug)]
pub struct ReviewMetrics {
    decisions: prometheus::IntCounterVec,
}

impl ReviewMetrics {
    pub(crate) fn register(r: &crate::stats::register::Register) -> Self {
        let decisions = r.counter_vec(
            "clipstream_review_total",
            "Labelled rows by review decision (accepted, routed to a person), with [model] review thresholds.",
            &["decision"],
        );
        for d in ReviewDecision::ALL {
            decisions.with_label_values(&[d.as_str()]);
        }
        ReviewMetrics { decisions }
    }

    /// Counts a labelled row's decision.
    pub fn decided(&self, routed: bool) {
        let d = if routed {
            ReviewDecision::Routed
        } else {
            ReviewDecision::Accepted
        };
        self.decisions.with_label_values(&[d.as_str()]).inc();
    }

    /// Rows routed to review so far.
    pub fn routed(&self) -> u64 {
        self.decisions
            .with_label_values(&[ReviewDecision::Routed.as_str()])
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(scores: &[f32]) -> Vec<Label> {
        scores
            .iter()
            .enumerate()
            .map(|(i, &score)| Label {
                label: format!("c{i}"),
                score,
            })
            .collect()
    }

    #[test]
    fn rows_below_a_threshold_are_routed_with_the_reason() {
        let p = ReviewPolicy {
            min_score: Some(0.8),
            min_margin: Some(0.3),
        };
        assert_eq!(p.decide(&labels(&[0.9, 0.05])), Some(Decision::Accepted));
        let Some(Decision::Routed(why)) = p.decide(&labels(&[0.7, 0.2])) else {
            panic!("not routed")
        };
        assert!(
            why.contains("top-1 score 0.7000 below review_min_score 0.8"),
            "{why}"
        );
        let Some(Decision::Routed(why)) = p.decide(&labels(&[0.85, 0.6])) else {
            panic!("not routed")
        };
        assert!(why.contains("margin 0.2500"), "{why}");
        // A score that is not a number is never accepted.
        assert!(matches!(
            p.decide(&labels(&[f32::NAN, 0.1])),
            Some(Decision::Routed(_))
        ));
        assert_eq!(p.decide(&[]), None);
        assert_eq!(ReviewPolicy::default().decide(&labels(&[0.1])), None);
        assert_eq!(p.labels_needed(1), 2);
    }
}
