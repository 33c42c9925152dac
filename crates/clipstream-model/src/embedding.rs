//! Embeddings: batches of L2-normalised rows, and their dot product.

/// L2-normalised embeddings, row-major `[len, dim]`.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingBatch {
    /// Embedding width.
    pub dim: usize,
    /// `len * dim` values.
    pub data: Vec<f32>,
}

impl EmbeddingBatch {
    /// No rows.
    pub fn empty() -> Self {
        EmbeddingBatch {
            dim: 0,
            data: Vec::new(),
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }
    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
    /// Iterates rows.
    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.data.chunks_exact(self.dim.max(1))
    }
}

/// Normalises each row to unit L2 norm (in f64, rounded once).
pub fn l2_normalize_rows(data: &mut [f32], dim: usize) {
    for row in data.chunks_exact_mut(dim.max(1)) {
        let norm = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            for v in row.iter_mut() {
                *v = (f64::from(*v) / norm) as f32;
            }
        }
    }
}

/// Cosine similarity of two unit vectors (their dot product).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
