//! Zero-shot classification: a label set is class names plus prompt
//! templates; each class embedding is the normalised mean of its normalised
//! prompt embeddings (CLIP's prompt ensembling); an image's scores are
//! `softmax(logit_scale · cosine)` over the classes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::embedding::{EmbeddingBatch, dot, l2_normalize_rows};
use crate::error::ModelError;

/// The default logit scale: CLIP's learned temperature saturates at 100.
pub const DEFAULT_LOGIT_SCALE: f32 = 100.0;

/// A label set, as written in a TOML file:
///
/// ```toml
/// templates = ["a photo of a {}.", "a drawing of a {}."]  # {} = class name
/// classes = ["red circle", "blue square"]
/// logit_scale = 100.0                                     # optional
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelSet {
    /// Prompt templates; `{}` is replaced by the class name. Default: `["{}"]`.
    #[serde(default = "default_templates")]
    pub templates: Vec<String>,
    /// Class names, in output order.
    pub classes: Vec<String>,
    /// Multiplies cosines before the softmax. Default 100.
    #[serde(default)]
    pub logit_scale: Option<f32>,
}

fn default_templates() -> Vec<String> {
    vec!["{}".to_string()]
}

impl LabelSet {
    /// Reads and validates a label set file.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::Labels {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let set: LabelSet = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        set.validate()
            .map_err(|problems| bad(problems.join("; ")))?;
        Ok(set)
    }

    /// Every problem of the set, or `Ok`.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.classes.is_empty() {
            problems.push("`classes` is empty".to_string());
        }
        if self.templates.is_empty() {
            problems.push("`templates` is empty".to_string());
        }
        for t in &self.templates {
            if t.matches("{}").count() != 1 {
                problems.push(format!("template {t:?} must contain `{{}}` exactly once"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.classes {
            if c.trim().is_empty() {
                problems.push("a class name is empty".to_string());
            } else if !seen.insert(c) {
                problems.push(format!("class {c:?} is listed twice"));
            }
        }
        if let Some(s) = self.logit_scale
            && !(s.is_finite() && s > 0.0)
        {
            problems.push(format!("`logit_scale` must be positive, got {s}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// All prompts, class-major: class 0 × every template, then class 1, ...
    pub fn prompts(&self) -> Vec<String> {
        self.classes
            .iter()
            .flat_map(|c| self.templates.iter().map(move |t| t.replacen("{}", c, 1)))
            .collect()
    }
}

/// One label of a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    /// Class name.
    pub label: String,
    /// Softmax probability.
    pub score: f32,
}

/// Class embeddings computed once, applied to any number of images.
#[derive(Debug, Clone)]
pub struct ZeroShotHead {
    classes: Vec<String>,
    class_embeds: EmbeddingBatch,
    logit_scale: f32,
    /// Where the label set came from, if a file.
    pub source: Option<PathBuf>,
}

impl ZeroShotHead {
    /// Builds the head from the embeddings of `set.prompts()` (in that order).
    pub fn from_prompt_embeddings(set: &LabelSet, prompts: &EmbeddingBatch) -> Self {
        let per_class = set.templates.len();
        let dim = prompts.dim;
        assert_eq!(
            prompts.len(),
            set.classes.len() * per_class,
            "one embedding per prompt"
        );
        let mut data = vec![0f32; set.classes.len() * dim];
        for (c, out) in data.chunks_exact_mut(dim).enumerate() {
            let mut acc = vec![0f64; dim];
            for t in 0..per_class {
                for (a, &v) in acc.iter_mut().zip(prompts.row(c * per_class + t)) {
                    *a += f64::from(v);
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = (a / per_class as f64) as f32;
            }
        }
        l2_normalize_rows(&mut data, dim);
        ZeroShotHead {
            classes: set.classes.clone(),
            class_embeds: EmbeddingBatch { dim, data },
            logit_scale: set.logit_scale.unwrap_or(DEFAULT_LOGIT_SCALE),
            source: None,
        }
    }

    /// Embeds the prompts with `model`'s text tower and builds the head.
    pub fn build(
        set: &LabelSet,
        model: &mut crate::clip_model::ClipModel,
    ) -> Result<Self, ModelError> {
        let prompts = set.prompts();
        let mut data = Vec::new();
        let mut dim = 0;
        for chunk in prompts.chunks(64) {
            let b = model.embed_texts(chunk)?;
            dim = b.dim;
            data.extend(b.data);
        }
        Ok(Self::from_prompt_embeddings(
            set,
            &EmbeddingBatch { dim, data },
        ))
    }

    /// Class names in score order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The class embeddings.
    pub fn class_embeddings(&self) -> &EmbeddingBatch {
        &self.class_embeds
    }

    /// Softmax probabilities over the classes for one unit image embedding.
    pub fn scores(&self, image: &[f32]) -> Vec<f32> {
        let logits: Vec<f64> = self
            .class_embeds
            .rows()
            .map(|c| f64::from(self.logit_scale * dot(image, c)))
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|e| (e / sum) as f32).collect()
    }

    /// The `k` best classes, best first (ties keep class order).
    pub fn top_k(&self, image: &[f32], k: usize) -> Vec<Label> {
        let scores = self.scores(image);
        let mut idx: Vec<usize> = (0..scores.len()).collect();
        idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        idx.into_iter()
            .take(k)
            .map(|i| Label {
                label: self.classes[i].clone(),
                score: scores[i],
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> LabelSet {
        LabelSet {
            templates: vec!["a {}".into(), "the {}".into()],
            classes: vec!["x".into(), "y".into()],
            logit_scale: None,
        }
    }

    #[test]
    fn prompts_are_class_major() {
        assert_eq!(set().prompts(), vec!["a x", "the x", "a y", "the y"]);
    }

    #[test]
    fn class_embedding_is_normalised_mean_of_prompts() {
        let prompts = EmbeddingBatch {
            dim: 2,
            data: vec![1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0],
        };
        let head = ZeroShotHead::from_prompt_embeddings(&set(), &prompts);
        let c0 = head.class_embeddings().row(0);
        let s = std::f32::consts::FRAC_1_SQRT_2;
        assert!((c0[0] - s).abs() < 1e-6 && (c0[1] - s).abs() < 1e-6);
        assert_eq!(head.class_embeddings().row(1), &[0.0, 1.0]);
        let scores = head.scores(&[0.0, 1.0]);
        assert!((scores.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        // logits 100*0.7071 vs 100*1.0
        let expected = 1.0 / (1.0 + (100.0f64 * (f64::from(s) - 1.0)).exp());
        assert!((f64::from(scores[1]) - expected).abs() < 1e-6);
        assert_eq!(head.top_k(&[0.0, 1.0], 1)[0].label, "y");
    }

    #[test]
    fn validation_lists_every_problem() {
        let bad = LabelSet {
            templates: vec!["no placeholder".into()],
            classes: vec!["a".into(), "a".into(), " ".into()],
            logit_scale: Some(-1.0),
        };
        let problems = bad.validate().expect_err("invalid");
        assert_eq!(problems.len(), 4, "{problems:?}");
    }
}
