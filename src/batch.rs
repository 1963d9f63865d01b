//! A batch of per-example gradients given as per-parameter segments (B x d_k each), never
//! concatenated: the kernels walk the segments in order, as if they were one row of width sum d_k.

use crate::elem::GradElem;
use crate::error::{GrabError, Result};
use ndarray::ArrayView2;

#[derive(Debug, Clone, Copy)]
pub struct Segment<'a, G> {
    data: &'a [G],
    width: usize,
}

#[derive(Debug, Clone)]
pub struct Batch<'a, G> {
    segments: Vec<Segment<'a, G>>,
    rows: usize,
    dim: usize,
}

impl<'a, G: GradElem> Batch<'a, G> {
    /// Segments must be C-contiguous (B x d_k) views with the same B. Checked, not assumed.
    pub fn from_views(views: &[ArrayView2<'a, G>]) -> Result<Self> {
        if views.is_empty() {
            return Err(GrabError::shape(
                "expected at least one gradient segment, got an empty list",
            ));
        }
        let rows = views[0].nrows();
        let mut segments = Vec::with_capacity(views.len());
        let mut dim = 0usize;
        for (k, v) in views.iter().enumerate() {
            if v.nrows() != rows {
                return Err(GrabError::shape(format!(
                    "every gradient segment must have the same number of rows (examples): segment 0 has {rows}, segment {k} has {}",
                    v.nrows()
                )));
            }
            let data = v.to_slice().ok_or_else(|| {
                GrabError::new(
                    crate::error::ErrorKind::Shape,
                    format!("gradient segment {k} is not C-contiguous (strides {:?}); pass a contiguous buffer", v.strides()),
                )
            })?;
            dim += v.ncols();
            segments.push(Segment {
                data,
                width: v.ncols(),
            });
        }
        Ok(Batch {
            segments,
            rows,
            dim,
        })
    }

    /// The same batch typed as f32 when G is f32 (None otherwise): lets f32-only kernels take a
    /// generic caller's batch without copying.
    pub fn as_f32(&self) -> Option<Batch<'a, f32>> {
        (std::any::TypeId::of::<G>() == std::any::TypeId::of::<f32>()).then(|| Batch {
            segments: self
                .segments
                .iter()
                .map(|sg| Segment {
                    data: crate::elem::as_f32(sg.data).expect("G is f32"),
                    width: sg.width,
                })
                .collect(),
            rows: self.rows,
            dim: self.dim,
        })
    }

    /// One flat (B x d) slice: a convenience for tests and single-buffer callers.
    pub fn from_slice(data: &'a [G], rows: usize, dim: usize) -> Result<Self> {
        if rows.checked_mul(dim) != Some(data.len()) {
            return Err(GrabError::shape(format!(
                "expected {rows} x {dim} = {} values, got {}",
                rows.saturating_mul(dim),
                data.len()
            )));
        }
        Ok(Batch {
            segments: vec![Segment { data, width: dim }],
            rows,
            dim,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// d: the total width, summed over segments.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Row `i` as its per-segment pieces, in segment order.
    pub fn row(&self, i: usize) -> Row<'_, 'a, G> {
        Row {
            batch: self,
            index: i,
        }
    }
}

/// One example's gradient, as slices into the caller's segments (no copy).
#[derive(Clone, Copy)]
pub struct Row<'b, 'a, G> {
    batch: &'b Batch<'a, G>,
    index: usize,
}

impl<'b, 'a, G: GradElem> Row<'b, 'a, G> {
    /// (offset in the flat d-vector, slice) per segment.
    pub fn pieces(&self) -> impl Iterator<Item = (usize, &'a [G])> + 'b {
        let i = self.index;
        let mut offset = 0usize;
        self.batch.segments.iter().map(move |s| {
            let o = offset;
            offset += s.width;
            (o, &s.data[i * s.width..(i + 1) * s.width])
        })
    }
}
