//! How good are the labels: accuracy, per-class precision / recall / F1,
//! the most-confused pairs, calibration, and the score threshold that
//! reaches a target precision, from records whose true label is known.
//!
//! Definitions (the independent check, `tests/eval_check.py`, computes
//! the same with numpy from the samples in the JSON report):
//! - **prediction**: the top-1 label; **confidence**: its score (the
//!   softmax over the label set's classes);
//! - **top-k accuracy**: the true label is among the first k labels;
//! - **per class** c: precision = TP / (TP + FP), recall = TP / (TP + FN),
//!   F1 = 2PR / (P + R); 0 where a denominator is 0 (scikit-learn's
//!   `zero_division=0`); over the classes of the label set;
//! - **ECE**: [`ECE_BINS`] equal-width bins of confidence, bin i holding
//!   (i/B, (i+1)/B] (0 in the first); the sum over bins of
//!   |bin| / n · |accuracy(bin) − mean confidence(bin)|;
//! - **threshold for precision p**: among the distinct confidences t, the
//!   lowest such that the records with confidence ≥ t are right at least
//!   a share p of the time; coverage is their share of all records. A
//!   record at or above the threshold is auto-accepted; the rest go to a
//!   person.

pub mod output;

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

/// Bins of the reliability diagram and the ECE.
pub const ECE_BINS: usize = 15;

/// One record with a known true label: its labels, best first.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// The record's id.
    pub id: String,
    /// The true label.
    pub truth: String,
    /// (label, score), best first (all classes, or the top k written).
    pub ranked: Vec<(String, f64)>,
}

/// Per-class figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassFigures {
    /// The class.
    pub class: String,
    /// Records whose true label it is.
    pub support: usize,
    /// TP / (TP + FP).
    pub precision: f64,
    /// TP / (TP + FN).
    pub recall: f64,
    /// Harmonic mean of the two.
    pub f1: f64,
}

/// One bin of the reliability diagram.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bin {
    /// Lower edge (exclusive, except the first bin's 0).
    pub lo: f64,
    /// Upper edge (inclusive).
    pub hi: f64,
    /// Records in it.
    pub count: usize,
    /// Their accuracy (0 when empty).
    pub accuracy: f64,
    /// Their mean confidence (0 when empty).
    pub confidence: f64,
}

/// The threshold that reaches a target precision.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Operating {
    /// The precision asked for.
    pub target: f64,
    /// The lowest confidence threshold that reaches it; `None`: no
    /// threshold does.
    pub threshold: Option<f64>,
    /// The precision of the records at or above it.
    pub precision: f64,
    /// Their share of all records.
    pub coverage: f64,
}

/// A point of the precision–coverage curve (at each distinct confidence).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CurvePoint {
    /// The threshold.
    pub threshold: f64,
    /// Share of records accepted.
    pub coverage: f64,
    /// Precision of the accepted ones.
    pub precision: f64,
}

/// Everything `clipstream eval` reports for one label set.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    /// Records evaluated.
    pub records: usize,
    /// k of the top-k accuracy (5, or fewer when fewer labels were kept).
    pub k: usize,
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-k accuracy.
    pub topk: f64,
    /// Mean over classes of precision, recall, F1.
    pub macro_precision: f64,
    /// Macro recall.
    pub macro_recall: f64,
    /// Macro F1.
    pub macro_f1: f64,
    /// Per class, in the label set's order.
    pub classes: Vec<ClassFigures>,
    /// (true, predicted, count), most frequent first, at most 10.
    pub confused: Vec<(String, String, usize)>,
    /// The confusion matrix: `matrix[true][predicted]`, classes in order.
    pub matrix: Vec<Vec<usize>>,
    /// Expected calibration error.
    pub ece: f64,
    /// The reliability diagram.
    pub bins: Vec<Bin>,
    /// Per target precision.
    pub operating: Vec<Operating>,
    /// The precision–coverage curve.
    pub curve: Vec<CurvePoint>,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// The figures of `samples` (each with a true label among `classes` and at
/// least one ranked label) for the label set `classes`.
pub fn evaluate(samples: &[Sample], classes: &[String], targets: &[f64]) -> Metrics {
    let n = samples.len();
    let k = samples
        .iter()
        .map(|s| s.ranked.len())
        .min()
        .unwrap_or(0)
        .min(5);
    let index: HashMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let mut matrix = vec![vec![0usize; classes.len()]; classes.len()];
    // Records per true class, whatever they were predicted as (a
    // prediction outside the label set is a miss, not a lost record).
    let mut support = vec![0usize; classes.len()];
    let (mut right, mut in_k) = (0, 0);
    let mut scored: Vec<(f64, bool)> = Vec::with_capacity(n);
    for s in samples {
        let Some((pred, conf)) = s.ranked.first() else {
            continue;
        };
        if let Some(&t) = index.get(s.truth.as_str()) {
            support[t] += 1;
        }
        let ok = *pred == s.truth;
        right += usize::from(ok);
        in_k += usize::from(s.ranked.iter().take(k).any(|(l, _)| *l == s.truth));
        if let (Some(&t), Some(&p)) = (index.get(s.truth.as_str()), index.get(pred.as_str())) {
            matrix[t][p] += 1;
        }
        scored.push((*conf, ok));
    }
    let classes_fig: Vec<ClassFigures> = classes
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let tp = matrix[c][c];
            let predicted: usize = matrix.iter().map(|row| row[c]).sum();
            let support = support[c];
            let precision = ratio(tp, predicted);
            let recall = ratio(tp, support);
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            ClassFigures {
                class: name.clone(),
                support,
                precision,
                recall,
                f1,
            }
        })
        .collect();
    let mean = |f: fn(&ClassFigures) -> f64| {
        if classes_fig.is_empty() {
            0.0
        } else {
            classes_fig.iter().map(f).sum::<f64>() / classes_fig.len() as f64
        }
    };
    let mut confused: Vec<(String, String, usize)> = Vec::new();
    for (t, row) in matrix.iter().enumerate() {
        for (p, &count) in row.iter().enumerate() {
            if t != p && count > 0 {
                confused.push((classes[t].clone(), classes[p].clone(), count));
            }
        }
    }
    confused.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1))));
    confused.truncate(10);

    let (ece, bins) = calibration(&scored);
    let curve = curve(&scored);
    let operating = targets
        .iter()
        .map(|&target| {
            // The lowest threshold: the point of most coverage that reaches it.
            match curve.iter().rev().find(|p| p.precision >= target) {
                Some(p) => Operating {
                    target,
                    threshold: Some(p.threshold),
                    precision: p.precision,
                    coverage: p.coverage,
                },
                None => Operating {
                    target,
                    threshold: None,
                    precision: 0.0,
                    coverage: 0.0,
                },
            }
        })
        .collect();
    Metrics {
        records: n,
        k,
        top1: ratio(right, n),
        topk: ratio(in_k, n),
        macro_precision: mean(|c| c.precision),
        macro_recall: mean(|c| c.recall),
        macro_f1: mean(|c| c.f1),
        classes: classes_fig,
        confused,
        matrix,
        ece,
        bins,
        operating,
        curve,
    }
}

/// The ECE and the reliability diagram of (confidence, right) pairs.
fn calibration(scored: &[(f64, bool)]) -> (f64, Vec<Bin>) {
    let mut count = [0usize; ECE_BINS];
    let mut right = [0usize; ECE_BINS];
    let mut conf = [0f64; ECE_BINS];
    for &(c, ok) in scored {
        // (i/B, (i+1)/B]: ceil(c·B) − 1, clamped (0 and below to bin 0).
        let i = ((c * ECE_BINS as f64).ceil() as i64 - 1).clamp(0, ECE_BINS as i64 - 1) as usize;
        count[i] += 1;
        right[i] += usize::from(ok);
        conf[i] += c;
    }
    let n = scored.len();
    let mut ece = 0.0;
    let bins = (0..ECE_BINS)
        .map(|i| {
            let accuracy = ratio(right[i], count[i]);
            let confidence = if count[i] == 0 {
                0.0
            } else {
                conf[i] / count[i] as f64
            };
            ece += ratio(count[i], n) * (accuracy - confidence).abs();
            Bin {
                lo: i as f64 / ECE_BINS as f64,
                hi: (i + 1) as f64 / ECE_BINS as f64,
                count: count[i],
                accuracy,
                confidence,
            }
        })
        .collect();
    (ece, bins)
}

/// Precision and coverage at each distinct confidence, highest first.
fn curve(scored: &[(f64, bool)]) -> Vec<CurvePoint> {
    let mut sorted = scored.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let n = sorted.len();
    let mut out = Vec::new();
    let (mut accepted, mut right) = (0, 0);
    let mut i = 0;
    while i < n {
        let t = sorted[i].0;
        // Every record tied at this confidence is accepted with it.
        while i < n && sorted[i].0.total_cmp(&t).is_eq() {
            accepted += 1;
            right += usize::from(sorted[i].1);
            i += 1;
        }
        out.push(CurvePoint {
            threshold: t,
            coverage: ratio(accepted, n),
            precision: ratio(right, accepted),
        });
    }
    out
}

/// Why records were left out of an evaluation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Skipped {
    /// Without the ground-truth field.
    pub no_truth: usize,
    /// With a true label that is not a class of the label set, by label.
    pub unknown_truth: BTreeMap<String, usize>,
    /// Without labels (no image, an unreadable one, or a dead letter).
    pub no_labels: usize,
    /// With a score that is not a number (NaN, infinite): a broken model
    /// or file.
    pub bad_scores: usize,
}

impl Skipped {
    /// All of them.
    pub fn total(&self) -> usize {
        self.no_truth
            + self.no_labels
            + self.bad_scores
            + self.unknown_truth.values().sum::<usize>()
    }
}

/// The true label of a record from its attributes (a JSON object), if the
/// field is there and is text.
pub fn truth_of(attributes: &serde_json::Value, field: &str) -> Option<String> {
    match attributes.get(field)? {
        serde_json::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// A record before it is admitted: id, true label (if any), ranked labels.
pub type Candidate = (String, Option<String>, Vec<(String, f64)>);

/// Keeps the samples that can be evaluated against `classes`, counting
/// the others.
pub fn admit(candidates: Vec<Candidate>, classes: &[String]) -> (Vec<Sample>, Skipped) {
    let known: std::collections::HashSet<&str> = classes.iter().map(String::as_str).collect();
    let mut skipped = Skipped::default();
    let mut out = Vec::new();
    for (id, truth, ranked) in candidates {
        let Some(truth) = truth else {
            skipped.no_truth += 1;
            continue;
        };
        if !known.contains(truth.as_str()) {
            *skipped.unknown_truth.entry(truth).or_default() += 1;
            continue;
        }
        if ranked.is_empty() {
            skipped.no_labels += 1;
            continue;
        }
        if ranked.iter().any(|(_, s)| !s.is_finite()) {
            skipped.bad_scores += 1;
            continue;
        }
        out.push(Sample { id, truth, ranked });
    }
    (out, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(truth: &str, ranked: &[(&str, f64)]) -> Sample {
        Sample {
            id: String::new(),
            truth: truth.into(),
            ranked: ranked.iter().map(|(l, s)| (l.to_string(), *s)).collect(),
        }
    }

    #[test]
    fn figures_of_a_small_case_worked_by_hand() {
        let classes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let samples = [
            sample("a", &[("a", 0.9), ("b", 0.1)]),
            sample("a", &[("b", 0.6), ("a", 0.4)]),
            sample("b", &[("b", 0.8), ("c", 0.2)]),
            sample("c", &[("c", 0.5), ("a", 0.5)]),
        ];
        let m = evaluate(&samples, &classes, &[0.9, 1.0]);
        assert_eq!(m.k, 2);
        assert_eq!((m.top1, m.topk), (0.75, 1.0));
        // a: TP 1, FP 0, FN 1; b: TP 1, FP 1, FN 0; c: TP 1.
        assert_eq!(
            m.classes
                .iter()
                .map(|c| (c.precision, c.recall))
                .collect::<Vec<_>>(),
            [(1.0, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
        assert_eq!(m.confused, [("a".into(), "b".into(), 1)]);
        // Thresholds: 0.9 (1/1), 0.8 (2/2), 0.6 (2/3), 0.5 (3/4).
        let pts: Vec<(f64, f64)> = m.curve.iter().map(|p| (p.threshold, p.precision)).collect();
        assert_eq!(pts, [(0.9, 1.0), (0.8, 1.0), (0.6, 2.0 / 3.0), (0.5, 0.75)]);
        assert_eq!(m.operating[0].threshold, Some(0.8));
        assert_eq!(m.operating[0].coverage, 0.5);
        assert_eq!(m.operating[1].threshold, Some(0.8));
        // Bins of 1/15: 0.9 → 13, 0.8 → 11 ((0.7333, 0.8]), 0.6 → 8, 0.5 → 7.
        let filled: Vec<(usize, usize)> = m
            .bins
            .iter()
            .enumerate()
            .filter(|(_, b)| b.count > 0)
            .map(|(i, b)| (i, b.count))
            .collect();
        assert_eq!(filled, [(7, 1), (8, 1), (11, 1), (13, 1)]);
        let ece = (0.1 + 0.2 + 0.6 + 0.5) / 4.0;
        assert!((m.ece - ece).abs() < 1e-12, "{}", m.ece);
    }

    #[test]
    fn an_unreachable_precision_says_so() {
        let classes: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let samples = [sample("a", &[("b", 0.9)]), sample("b", &[("b", 0.7)])];
        let m = evaluate(&samples, &classes, &[0.99, 0.5]);
        assert_eq!(m.operating[0].threshold, None);
        assert_eq!(m.operating[1].threshold, Some(0.7));
        let m = evaluate(&samples[..1], &classes, &[0.5]);
        assert_eq!(m.operating[0].threshold, None);
    }

    #[test]
    fn a_prediction_outside_the_label_set_is_a_miss_of_its_true_class() {
        let classes: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let samples = [
            sample("a", &[("a", 0.9)]),
            sample("a", &[("zebra", 0.8)]),
            sample("b", &[("b", 0.7)]),
        ];
        let m = evaluate(&samples, &classes, &[]);
        assert_eq!((m.classes[0].support, m.classes[0].recall), (2, 0.5));
        assert_eq!(m.classes[0].precision, 1.0);
        assert_eq!(m.top1, 2.0 / 3.0);
    }

    #[test]
    fn scores_that_are_not_numbers_are_counted_not_evaluated() {
        let classes: Vec<String> = ["a"].map(String::from).to_vec();
        let (kept, skipped) = admit(
            vec![
                ("1".into(), Some("a".into()), vec![("a".into(), f64::NAN)]),
                (
                    "2".into(),
                    Some("a".into()),
                    vec![("a".into(), f64::INFINITY)],
                ),
                ("3".into(), Some("a".into()), vec![("a".into(), 0.5)]),
            ],
            &classes,
        );
        assert_eq!((kept.len(), skipped.bad_scores), (1, 2));
        // And the curve ends even if one got through.
        let m = evaluate(
            &[sample("a", &[("a", f64::NAN)]), sample("a", &[("a", 0.5)])],
            &classes,
            &[0.5],
        );
        assert_eq!(m.curve.len(), 2);
    }

    #[test]
    fn records_that_cannot_be_evaluated_are_counted() {
        let classes: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let (kept, skipped) = admit(
            vec![
                ("1".into(), Some("a".into()), vec![("a".into(), 1.0)]),
                ("2".into(), None, vec![("a".into(), 1.0)]),
                ("3".into(), Some("zebra".into()), vec![("a".into(), 1.0)]),
                ("4".into(), Some("b".into()), vec![]),
            ],
            &classes,
        );
        assert_eq!(kept.len(), 1);
        assert_eq!(
            (
                skipped.no_truth,
                skipped.no_labels,
                skipped.unknown_truth["zebra"]
            ),
            (1, 1, 1)
        );
        assert_eq!(skipped.total(), 3);
    }
}
